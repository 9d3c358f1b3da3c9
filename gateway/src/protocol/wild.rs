//! A wildcard subscription's resume (`since: {time, topics}`) and its ack (`time`).
//!
//! Parsed apart from a topic's `since` because it is a different promise: the client names the
//! moment of its previous wildcard ack and the last position of each topic it saw; the node
//! replays what every matching topic got since (see `docs/topics.md`).

use std::collections::HashMap;

use broker_bridge::{MAX_DIRECTORY_TOPICS, Offset};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ErrorCode, ProtocolError, Since, parse_offset, put_recovered, start, truncate};
use crate::frame::OpCode;
use crate::topic::Pattern;

/// Where a resuming wildcard subscriber left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WildSince {
    /// The `time` of the client's previous wildcard ack (ms on the broker's clock).
    pub time: u64,
    /// The last position the client processed of each topic it saw, at most
    /// [`MAX_DIRECTORY_TOPICS`], each a topic the pattern matches.
    pub topics: HashMap<String, Since>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw<'a> {
    #[serde(borrow)]
    time: &'a RawValue,
    #[serde(default)]
    topics: HashMap<String, Since>,
}

impl WildSince {
    /// Reads a wildcard's `since` for `pattern`: `bad_request` for anything malformed, a map
    /// larger than [`MAX_DIRECTORY_TOPICS`], or a topic the pattern does not match.
    pub fn parse(raw: &RawValue, pattern: &Pattern) -> Result<WildSince, ProtocolError> {
        let bad = |m: String| ProtocolError::new(ErrorCode::BadRequest, m);
        let r: Raw<'_> = serde_json::from_str(raw.get()).map_err(|e| {
            bad(format!(
                "a wildcard's since must be {{\"time\":…,\"topics\":{{\"<topic>\":{{\"epoch\":…,\"offset\":…}},…}}}}: {e}"
            ))
        })?;
        let time = parse_offset(r.time.get()).ok_or_else(|| {
            bad(format!(
                "since.time must be a non-negative integer (the time of the previous ack), got {}",
                truncate(r.time.get(), 64)
            ))
        })?;
        if r.topics.len() > MAX_DIRECTORY_TOPICS {
            return Err(bad(format!(
                "since.topics may name at most {MAX_DIRECTORY_TOPICS} topics"
            )));
        }
        if let Some(t) = r
            .topics
            .keys()
            .find(|t| crate::topic::validate(t).is_err() || !pattern.matches(t))
        {
            return Err(bad(format!(
                "since.topics names {:?}, which the pattern does not match",
                truncate(t, 64)
            )));
        }
        Ok(WildSince {
            time,
            topics: r.topics,
        })
    }
}

/// `{"op":"ack","id":…,"topic":<pattern>[,"time":…][,"recovered":…]}`: a wildcard subscribe's
/// ack, with the broker's time at which every later message is delivered live (absent when the
/// clock could not be read: the subscription is live all the same, but cannot be resumed).
pub fn wildcard_ack(
    id: Option<&RawValue>,
    pattern: &str,
    time: Option<Offset>,
    recovered: Option<bool>,
) -> Bytes {
    let mut b = start("ack", id, pattern.len() + 48);
    b.put(b",\"topic\":");
    b.put_json_str(pattern);
    if let Some(time) = time {
        b.put(b",\"time\":");
        b.put_u64(time);
    }
    put_recovered(&mut b, recovered);
    b.put(b"}");
    b.finish(OpCode::Text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WildSince, ErrorCode> {
        let raw: Box<RawValue> = serde_json::from_str(text).expect("json");
        let pattern = Pattern::parse("scores.*").expect("pattern");
        WildSince::parse(&raw, &pattern).map_err(|e| e.code)
    }

    #[test]
    fn reads_the_time_and_the_topics_and_refuses_forgeries() {
        let s = parse(r#"{"time":1733540000123,"topics":{"scores.a":{"epoch":"e","offset":5}}}"#)
            .expect("valid");
        assert_eq!(s.time, 1733540000123);
        assert_eq!(s.topics["scores.a"].offset, 5);
        assert_eq!(parse(r#"{"time":7}"#).map(|s| s.topics.len()), Ok(0));
        for bad in [
            r#"{"topics":{}}"#,
            r#"{"time":-1}"#,
            r#"{"time":"7"}"#,
            r#"{"time":7.5}"#,
            r#"{"time":7,"extra":1}"#,
            r#"{"time":7,"topics":[]}"#,
            r#"{"time":7,"topics":{"other.a":{"epoch":"e","offset":1}}}"#,
            r#"{"time":7,"topics":{"scores.a.b":{"epoch":"e","offset":1}}}"#,
            r#"{"time":7,"topics":{"scores.*":{"epoch":"e","offset":1}}}"#,
            r#"{"time":7,"topics":{"scores.a":{"epoch":"e","offset":-1}}}"#,
            r#"{"time":7,"topics":{"scores.a":{"epoch":"e"}}}"#,
            r#"{"epoch":"e","offset":3}"#,
        ] {
            assert_eq!(parse(bad), Err(ErrorCode::BadRequest), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_DIRECTORY_TOPICS)
            .map(|i| format!(r#""scores.t{i}":{{"epoch":"e","offset":1}}"#))
            .collect();
        let text = format!(r#"{{"time":7,"topics":{{{}}}}}"#, many.join(","));
        assert_eq!(parse(&text), Err(ErrorCode::BadRequest));
    }

    #[test]
    fn the_ack_carries_the_time() {
        let id: Box<RawValue> = serde_json::from_str("3").expect("id");
        let ack = wildcard_ack(Some(&id), "scores.*", Some(17), Some(true));
        let text = std::str::from_utf8(&ack[2..]).expect("utf8");
        let v: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"op":"ack","id":3,"topic":"scores.*","time":17,"recovered":true})
        );
    }
}
