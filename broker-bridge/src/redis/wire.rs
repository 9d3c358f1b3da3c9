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
//! * Redis Cluster only, for wildcard subscriptions ([`super::watch`]): the watch set of hash slot
//!   `s` is the ZSET `{prefix}~watch:{TAG_s}`, and a topic below a watched prefix is also published
//!   (classic `PUBLISH`) on `{prefix}~w:<topic>`, which nodes pattern-subscribe. `~` never occurs in
//!   a topic, so these names collide with no topic's.
//! * A message published through a gateway is `pg1 <epoch> <offset> <tag>\n<data>` (see [`tag`]);
//!   anything else on a topic channel is a raw publish and is delivered as `data` without an
//!   offset. Payloads starting with `pg1 ` are reserved: one that does not verify is dropped.

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

    /// The channel prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
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

    /// The key of one hash slot's watch set (cluster), from that slot's tag.
    pub fn watch_key(&self, tag: &str) -> String {
        format!("{}~watch:{{{tag}}}", self.prefix)
    }

    /// The classic channel a cluster publish also uses when the topic is below a watched prefix.
    pub fn watch_channel(&self, topic: &str) -> String {
        format!("{}{WATCH_CHANNEL}{topic}", self.prefix)
    }

    /// The `PSUBSCRIBE` pattern of the channels of every topic below `prefix` (of every topic for
    /// the empty prefix): the topic channels on a single Redis, the watch channels on a cluster.
    /// Topic characters are never glob characters; the channel prefix is escaped. Redis's `*`
    /// spans levels, so this is exactly "below the prefix".
    pub fn prefix_pattern(&self, prefix: &str) -> String {
        let mut glob = self.escaped_prefix();
        if !prefix.is_empty() {
            glob.push_str(prefix);
            glob.push('.');
        }
        glob.push('*');
        glob
    }

    /// The prefix a pattern of [`Names::prefix_pattern`] was made for.
    pub fn prefix_of_pattern<'a>(&self, pattern: &'a str) -> Option<&'a str> {
        let rest = pattern.strip_prefix(self.escaped_prefix().as_str())?;
        if rest == "*" {
            return Some("");
        }
        rest.strip_suffix(".*")
    }

    /// The channel prefix with glob characters escaped, and on a cluster the watch channels' mark.
    fn escaped_prefix(&self) -> String {
        let mut glob = String::with_capacity(self.prefix.len() + 8);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                glob.push('\\');
            }
            glob.push(c);
        }
        if self.cluster {
            glob.push_str(WATCH_CHANNEL);
        }
        glob
    }

    /// The topic a channel belongs to, or `None` for a channel that is not a topic channel. A
    /// pattern subscription brings whatever channel names raw publishers made up, so the name must
    /// be a valid topic (1–200 characters of `A-Z a-z 0-9 _ . : -`, no empty level).
    pub fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.prefix.as_str())?;
        let topic = if self.cluster {
            match rest.strip_prefix(WATCH_CHANNEL) {
                Some(watched) => watched,
                None => rest.strip_prefix('{')?.strip_suffix('}')?,
            }
        } else {
            rest
        };
        is_topic(topic).then_some(topic)
    }
}

/// What follows the prefix in a watch channel's name (cluster; [`Names::watch_channel`]).
const WATCH_CHANNEL: &str = "~w:";

/// Whether `name` is a valid topic name: the gateway's rules (1–200 characters of
/// `A-Z a-z 0-9 _ . : -`, `.` between non-empty levels).
pub fn is_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && !name.split('.').any(str::is_empty)
}

/// How many hex digits of the SHA-1 a message tag keeps (64 bits).
pub const TAG_LEN: usize = 16;

/// A message tag: the first [`TAG_LEN`] hex digits of `sha1(salt + " " + offset + "\n" + data)`,
/// where `salt` is the secret of the topic's epoch, kept in its epoch key. Only someone who can read
/// the topic's keys can make one, so a raw publisher (who may `PUBLISH`) cannot forge a position.
pub type Tag = [u8; TAG_LEN];

/// Computes the tag of a gateway message (the publish script computes the same in Lua).
pub fn tag(salt: &str, offset: Offset, data: &[u8]) -> Tag {
    use sha1::{Digest, Sha1};
    let offset = offset.to_string();
    let digest = Sha1::new()
        .chain_update(salt.as_bytes())
        .chain_update(b" ")
        .chain_update(offset.as_bytes())
        .chain_update(b"\n")
        .chain_update(data)
        .finalize();
    let mut out = [0u8; TAG_LEN];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in digest.iter().take(TAG_LEN / 2).enumerate() {
        out[2 * i] = HEX[(byte >> 4) as usize];
        out[2 * i + 1] = HEX[(byte & 0xf) as usize];
    }
    out
}

/// One decoded channel payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Epoch, offset and tag, for messages published through a gateway. The tag is not checked
    /// here: that needs the epoch's salt. A message of a pubgate older than tags has none.
    pub position: Option<(Position, Option<Tag>)>,
    /// The JSON `data` (valid JSON, valid UTF-8).
    pub data: Bytes,
}

/// Why a channel payload is not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// It starts like a gateway message (`pg1 `) but its header is malformed.
    #[error("malformed gateway header")]
    Header,
    /// A gateway message whose data is not valid JSON.
    #[error("gateway message data is not JSON")]
    Data,
    /// A gateway message whose tag does not match: forged, or of an epoch that is gone.
    #[error("gateway message tag does not verify")]
    Forged,
}

impl Rejected {
    /// The label of the rejection in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Header => "header",
            Rejected::Data => "data",
            Rejected::Forged => "forged",
        }
    }
}

/// Decodes a payload read from a topic channel.
///
/// A gateway message (`pg1 <epoch> <offset> <tag>\n<data>`) yields its position, tag and data,
/// without copying; its data must be valid JSON. A payload that starts with `pg1 ` is reserved for
/// gateway messages and rejected when malformed. Anything else is a raw publish: valid JSON is
/// passed through unchanged, and a payload that is not valid JSON becomes a JSON string of its text
/// (invalid UTF-8 replaced by U+FFFD), so subscribers always receive valid JSON in a text frame.
pub fn decode(payload: Bytes) -> Result<Decoded, Rejected> {
    if payload.starts_with(MAGIC) {
        let (position, tag, start) = parse_header(&payload).ok_or(Rejected::Header)?;
        let data = payload.slice(start..);
        if !is_json(&data) {
            return Err(Rejected::Data);
        }
        return Ok(Decoded {
            position: Some((position, tag)),
            data,
        });
    }
    if is_json(&payload) {
        return Ok(Decoded {
            position: None,
            data: payload,
        });
    }
    let text = String::from_utf8_lossy(&payload);
    // Serializing a string into a Vec cannot fail.
    let json = serde_json::to_vec(&*text).unwrap_or_else(|_| b"null".to_vec());
    Ok(Decoded {
        position: None,
        data: Bytes::from(json),
    })
}

/// Whether `data` is one valid JSON value in valid UTF-8.
fn is_json(data: &[u8]) -> bool {
    serde_json::from_slice::<&serde_json::value::RawValue>(data).is_ok()
}

/// Parses `pg1 <epoch> <offset> <tag>\n` (or `pg1 <epoch> <offset>\n`, as pubgate wrote it
/// before tags); returns the position, the tag and where `data` starts.
fn parse_header(payload: &[u8]) -> Option<(Position, Option<Tag>, usize)> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&payload[MAGIC.len()..newline]).ok()?;
    let mut parts = header.split(' ');
    let epoch = parts.next()?;
    let offset = parts.next()?;
    let tag = parts.next();
    if parts.next().is_some()
        || epoch.is_empty()
        || epoch.len() > 64
        || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
        || offset.is_empty()
        || offset.len() > 20
        || !offset.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let tag = match tag {
        None => None,
        Some(tag)
            if tag.len() == TAG_LEN
                && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(tag.as_bytes());
            Some(t)
        }
        Some(_) => return None,
    };
    let offset: Offset = offset.parse().ok()?;
    Some((
        Position {
            epoch: Epoch::new(epoch),
            offset,
        },
        tag,
        newline + 1,
    ))
}

/// Encodes a gateway message the way the publish script does (used by tests and tools).
pub fn encode(epoch: &str, offset: Offset, salt: &str, data: &[u8]) -> Vec<u8> {
    let tag = tag(salt, offset, data);
    let mut out = Vec::with_capacity(MAGIC.len() + epoch.len() + 48 + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(epoch.as_bytes());
    out.push(b' ');
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(&tag);
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
        assert_eq!(cluster.watch_key("3x"), "pubgate:~watch:{3x}");
        assert_eq!(cluster.watch_channel("a.b"), "pubgate:~w:a.b");
        assert_eq!(cluster.topic_of("pubgate:~w:a.b"), Some("a.b"));
        assert_eq!(cluster.topic_of("pubgate:~w:a..b"), None);
        assert_eq!(cluster.topic_of("pubgate:~w:"), None);
        assert_eq!(cluster.prefix_pattern("a"), "pubgate:~w:a.*");
        assert_eq!(cluster.prefix_pattern(""), "pubgate:~w:*");
        assert_eq!(cluster.prefix_of_pattern("pubgate:~w:a.*"), Some("a"));
        assert_eq!(cluster.prefix_of_pattern("pubgate:a.*"), None);
    }

    #[test]
    fn raw_channel_names_must_be_topics() {
        let n = Names::new("pubgate:", false);
        for bad in [
            "scores.a b",
            "scores..x",
            "scores.\u{202e}x",
            "scores.x\"",
            "",
            "a.",
        ] {
            assert_eq!(n.topic_of(&format!("pubgate:{bad}")), None, "{bad:?}");
        }
        assert_eq!(n.topic_of(&format!("pubgate:{}", "a".repeat(201))), None);
        assert!(
            n.topic_of(&format!("pubgate:{}", "a".repeat(200)))
                .is_some()
        );
    }

    #[test]
    fn prefix_patterns_escape_the_channel_prefix_and_round_trip() {
        let n = Names::new("pg*[1]:", false);
        assert_eq!(n.prefix_pattern("scores"), "pg\\*\\[1\\]:scores.*");
        assert_eq!(n.prefix_pattern(""), "pg\\*\\[1\\]:*");
        assert_eq!(n.prefix_of_pattern(&n.prefix_pattern("a.b")), Some("a.b"));
        assert_eq!(n.prefix_of_pattern(&n.prefix_pattern("")), Some(""));
        assert_eq!(n.prefix_of_pattern("pubgate:a.*"), None);
    }

    #[test]
    fn gateway_messages_round_trip() {
        let raw = encode("00ab", 42, "5a17", br#"{"home":3}"#);
        let d = decode(Bytes::from(raw)).unwrap();
        let (p, t) = d.position.unwrap();
        assert_eq!(p.epoch.as_str(), "00ab");
        assert_eq!(p.offset, 42);
        assert_eq!(t, Some(tag("5a17", 42, br#"{"home":3}"#)));
        assert_ne!(
            t,
            Some(tag("5a18", 42, br#"{"home":3}"#)),
            "another salt, another tag"
        );
        assert_ne!(
            t,
            Some(tag("5a17", 43, br#"{"home":3}"#)),
            "another offset, another tag"
        );
        assert_eq!(&d.data[..], br#"{"home":3}"#);
        // Data may itself contain newlines and spaces.
        let d = decode(Bytes::from(encode("e", 1, "00", b"[1,\n 2]"))).unwrap();
        assert_eq!(&d.data[..], b"[1,\n 2]");
    }

    #[test]
    fn tag_matches_the_lua_formula() {
        // What Redis answers to `EVAL "return redis.sha1hex('s 7\nnull')" 0`.
        assert_eq!(&tag("s", 7, b"null")[..], b"a09cd4ae6d08ecac");
    }

    #[test]
    fn forged_and_malformed_gateway_payloads_are_rejected() {
        assert_eq!(
            decode(Bytes::from_static(b"pg1 bad header")),
            Err(Rejected::Header)
        );
        let untagged = decode(Bytes::from_static(b"pg1 e1 5\n{}")).unwrap();
        assert_eq!(
            untagged.position.map(|(p, t)| (p.offset, t)),
            Some((5, None)),
            "no tag: an older pubgate (or a forgery), checked against history"
        );
        assert_eq!(
            decode(Bytes::from_static(b"pg1 e1 5 xyz\n{}")),
            Err(Rejected::Header)
        );
        let not_json = encode("e1", 5, "00", b"{not json");
        assert_eq!(decode(Bytes::from(not_json)), Err(Rejected::Data));
        let bad_utf8 = encode("e1", 5, "00", b"\"\xff\"");
        assert_eq!(decode(Bytes::from(bad_utf8)), Err(Rejected::Data));
        let huge = b"pg1 e1 99999999999999999999999 0123456789abcdef\n1".to_vec();
        assert_eq!(decode(Bytes::from(huge)), Err(Rejected::Header));
    }

    #[test]
    fn raw_json_passes_through_and_other_payloads_become_strings() {
        let d = decode(Bytes::from_static(br#" {"home":3} "#)).unwrap();
        assert_eq!(d.position, None);
        assert_eq!(&d.data[..], br#" {"home":3} "#);
        let d = decode(Bytes::from_static(b"hello \"world\"")).unwrap();
        assert_eq!(&d.data[..], br#""hello \"world\"""#);
        let d = decode(Bytes::from_static(b"\xff")).unwrap();
        assert_eq!(&d.data[..], "\"\u{fffd}\"".as_bytes());
        let d = decode(Bytes::from_static(b"42")).unwrap();
        assert_eq!(&d.data[..], b"42");
    }
}
