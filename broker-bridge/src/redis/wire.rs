//! What pubgate puts into Redis: channel and key names, and the message encoding on a channel.
//!
//! Everything here is documented in `docs/broker.md` so other tools can interoperate; change it only
//! together with that page.
//!
//! * Channel of a topic: `{prefix}{topic}` on a single Redis (standalone or Sentinel), and
//!   `{prefix}{{topic}}` (a hash tag around the topic) on Redis Cluster, so the channel, the offset key
//!   and the history stream of a topic share one slot.
//! * Keys of a topic: the channel name plus `:epoch` (string), `:offset` (integer string) and
//!   `:history` (stream).
//! * A message published through a gateway is `pg1 <epoch> <offset>\n<data>`; anything else on a
//!   topic channel is a raw publish and is delivered as `data` without an offset.

use bytes::Bytes;

use crate::{Epoch, Offset, Position};

/// The marker that starts a message published through a gateway. Valid JSON never starts with `p`,
/// so a raw JSON publish cannot be mistaken for it.
pub const MAGIC: &[u8] = b"pg1 ";

/// Names of channels and keys under one prefix, for one deployment shape.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
    cluster: bool,
}

/// The three keys that hold a topic's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicKeys {
    /// The topic's current epoch (string).
    pub epoch: String,
    /// The offset of the latest message (integer string, `INCR`ed per publish).
    pub offset: String,
    /// Recent messages, one stream entry per offset with ID `<offset>-0`.
    pub history: String,
}

impl Names {
    /// Names under `prefix`; `cluster` adds hash tags so a topic's channel and keys share a slot.
    pub fn new(prefix: &str, cluster: bool) -> Self {
        Names {
            prefix: prefix.to_string(),
            cluster,
        }
    }

    /// Whether names carry cluster hash tags (and sharded pub/sub is used).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The channel a topic is published on.
    pub fn channel(&self, topic: &str) -> String {
        if self.cluster {
            format!("{}{{{}}}", self.prefix, topic)
        } else {
            format!("{}{}", self.prefix, topic)
        }
    }

    /// The keys of a topic.
    pub fn keys(&self, topic: &str) -> TopicKeys {
        let base = self.channel(topic);
        TopicKeys {
            epoch: format!("{base}:epoch"),
            offset: format!("{base}:offset"),
            history: format!("{base}:history"),
        }
    }

    /// The private channel on which a node sends canaries to itself. `#` cannot occur in a topic, so
    /// no topic channel collides with it.
    pub fn canary_channel(&self, node_id: &str) -> String {
        self.channel(&format!("#canary.{node_id}"))
    }

    /// The topic a channel belongs to, or `None` for a channel that is not a topic channel.
    pub fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.prefix.as_str())?;
        let topic = if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')?
        } else {
            rest
        };
        (!topic.is_empty() && !topic.starts_with('#')).then_some(topic)
    }
}

/// One decoded channel payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Epoch and offset, for messages published through a gateway.
    pub position: Option<Position>,
    /// The JSON `data`.
    pub data: Bytes,
}

/// Decodes a payload read from a topic channel.
///
/// A gateway message (`pg1 <epoch> <offset>\n<data>`) yields its position and data, without copying.
/// Anything else is a raw publish: valid JSON is passed through unchanged, and a payload that is not
/// valid JSON becomes a JSON string of its text (invalid UTF-8 replaced by U+FFFD), so subscribers
/// always receive valid JSON.
pub fn decode(payload: Bytes) -> Decoded {
    if let Some((position, start)) = parse_header(&payload) {
        return Decoded {
            position: Some(position),
            data: payload.slice(start..),
        };
    }
    if serde_json::from_slice::<&serde_json::value::RawValue>(&payload).is_ok() {
        return Decoded {
            position: None,
            data: payload,
        };
    }
    let text = String::from_utf8_lossy(&payload);
    // Serializing a string into a Vec cannot fail.
    let json = serde_json::to_vec(&*text).unwrap_or_else(|_| b"null".to_vec());
    Decoded {
        position: None,
        data: Bytes::from(json),
    }
}

/// Parses `pg1 <epoch> <offset>\n`; returns the position and where `data` starts.
fn parse_header(payload: &[u8]) -> Option<(Position, usize)> {
    let rest = payload.strip_prefix(MAGIC)?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let epoch = std::str::from_utf8(&rest[..space]).ok()?;
    if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let after = &rest[space + 1..];
    let newline = after.iter().position(|&b| b == b'\n')?;
    let offset: Offset = std::str::from_utf8(&after[..newline]).ok()?.parse().ok()?;
    let start = MAGIC.len() + space + 1 + newline + 1;
    Some((
        Position {
            epoch: Epoch::new(epoch),
            offset,
        },
        start,
    ))
}

/// Encodes a gateway message the way the publish script does (used by tests and tools).
pub fn encode(epoch: &str, offset: Offset, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + epoch.len() + 24 + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(epoch.as_bytes());
    out.push(b' ');
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_single_and_cluster() {
        let single = Names::new("pubgate:", false);
        assert_eq!(single.channel("scores.nba"), "pubgate:scores.nba");
        assert_eq!(
            single.keys("a:b").offset,
            "pubgate:a:b:offset",
            "keys end in a fixed suffix, so topics with ':' cannot collide"
        );
        assert_eq!(single.topic_of("pubgate:scores.nba"), Some("scores.nba"));
        assert_eq!(single.topic_of("other:scores.nba"), None);
        assert_eq!(single.topic_of(&single.canary_channel("n1")), None);

        let cluster = Names::new("pubgate:", true);
        assert_eq!(cluster.channel("scores.nba"), "pubgate:{scores.nba}");
        assert_eq!(cluster.keys("t").history, "pubgate:{t}:history");
        assert_eq!(cluster.topic_of("pubgate:{scores.nba}"), Some("scores.nba"));
        assert_eq!(cluster.topic_of("pubgate:scores.nba"), None);
        assert_eq!(cluster.canary_channel("n1"), "pubgate:{#canary.n1}");
    }

    #[test]
    fn gateway_messages_round_trip() {
        let raw = encode("00ab", 42, br#"{"home":3}"#);
        let d = decode(Bytes::from(raw));
        let p = d.position.unwrap();
        assert_eq!(p.epoch.as_str(), "00ab");
        assert_eq!(p.offset, 42);
        assert_eq!(&d.data[..], br#"{"home":3}"#);
        // Data may itself contain newlines and spaces.
        let d = decode(Bytes::from(encode("e", 1, b"[1,\n 2]")));
        assert_eq!(&d.data[..], b"[1,\n 2]");
    }

    #[test]
    fn raw_json_passes_through_and_other_payloads_become_strings() {
        let d = decode(Bytes::from_static(br#" {"home":3} "#));
        assert_eq!(d.position, None);
        assert_eq!(&d.data[..], br#" {"home":3} "#);
        let d = decode(Bytes::from_static(b"hello \"world\""));
        assert_eq!(&d.data[..], br#""hello \"world\"""#);
        let d = decode(Bytes::from_static(b"pg1 bad header"));
        assert_eq!(&d.data[..], br#""pg1 bad header""#);
        let d = decode(Bytes::from_static(b"\xff"));
        assert_eq!(&d.data[..], "\"\u{fffd}\"".as_bytes());
        let d = decode(Bytes::from_static(b"42"));
        assert_eq!(&d.data[..], b"42");
    }
}
