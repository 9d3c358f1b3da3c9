//! The client protocol: JSON text frames in, JSON text frames out.
//!
//! Parsing borrows from the received frame; `id` and `data` are kept as raw JSON and echoed or
//! forwarded byte for byte, never re-serialized.

use std::borrow::Cow;

use broker_bridge::{Message, Offset, Position};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::frame::{FrameBuilder, OpCode};
use crate::topic::Target;

mod wild;
pub use wild::{WildSince, wildcard_ack};

/// The stable error codes of the protocol (extend, never rename).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not valid JSON or misses a required field.
    BadRequest,
    /// `op` names no known operation.
    UnknownOp,
    /// The topic name breaks the naming rules.
    InvalidTopic,
    /// Unsubscribe from a topic the connection is not subscribed to.
    NotSubscribed,
    /// The connection holds `limits.max_subscriptions` topics already.
    TooManySubscriptions,
    /// A publish larger than `limits.max_message_size`.
    MessageTooLarge,
    /// The connection's credentials do not allow this.
    Forbidden,
    /// Too many requests.
    RateLimited,
    /// The broker cannot be reached; nothing was published or subscribed.
    BrokerUnavailable,
    /// A server-side fault.
    Internal,
    /// Subscribe to a topic the connection is already subscribed to.
    AlreadySubscribed,
    /// The node cannot take this connection now (connection limit, draining): try another node.
    Unavailable,
    /// No HTTP route at this path.
    NotFound,
    /// The route exists, but not for this HTTP method.
    MethodNotAllowed,
    /// A `refresh` carried a token that does not verify; the connection keeps its old one.
    InvalidToken,
    /// The node's broker cannot do this (wildcard subscriptions on Redis Cluster).
    Unsupported,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BrokerUnavailable => "broker_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Unsupported => "unsupported",
        }
    }

    /// The HTTP status the same condition gets on the HTTP API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidTopic | ErrorCode::UnknownOp => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::MessageTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::BrokerUnavailable | ErrorCode::Unavailable => 503,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::NotSubscribed
            | ErrorCode::TooManySubscriptions
            | ErrorCode::AlreadySubscribed => 409,
            ErrorCode::Internal => 500,
            ErrorCode::InvalidToken => 401,
            ErrorCode::Unsupported => 501,
        }
    }
}

/// A protocol-level failure to report to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// The stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl ProtocolError {
    /// Makes an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

/// Where a resuming subscriber left off.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// The epoch of the last message the client has.
    pub epoch: String,
    /// The offset of the last message the client has, at most [`MAX_EXACT_OFFSET`] (see
    /// [`parse_offset`]).
    #[serde(deserialize_with = "offset_from_json")]
    pub offset: Offset,
}

/// The largest offset the Redis broker's scripts hold exactly: Lua numbers are doubles, exact up to
/// 2^53 - 1.
pub const MAX_EXACT_OFFSET: Offset = (1 << 53) - 1;

/// Reads an offset a client sent (a resume's `since.offset`, the `since` of `GET /v1/history`): a
/// non-negative integer in decimal digits, anything else is `None`.
///
/// Offsets past [`MAX_EXACT_OFFSET`], up to any number of digits, come back as that value. No topic
/// gets that far (it is 285 years at a million messages a second), so such an offset is beyond the
/// topic's latest one and the answer is the same as for any offset the topic never reached
/// (`recovered:false`, an incomplete history page); clamped, it is also a number the broker's
/// scripts compare exactly, where 2^53 + 10 or 2^64 - 1 came back from Lua changed and failed the
/// read as `broker_unavailable`.
pub fn parse_offset(text: &str) -> Option<Offset> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits only: parsing fails only past u64::MAX, which is past the limit as well.
    Some(
        text.parse::<Offset>()
            .map_or(MAX_EXACT_OFFSET, |o| o.min(MAX_EXACT_OFFSET)),
    )
}

/// `since.offset` as [`parse_offset`] reads it, from its JSON text (so `41.0`, `-1`, `"41"` and
/// `1e3` are refused, and integers past u64 are clamped rather than refused).
fn offset_from_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Offset, D::Error> {
    let raw = Box::<RawValue>::deserialize(d)?;
    parse_offset(raw.get()).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "since.offset must be a non-negative integer, got {}",
            truncate(raw.get(), 64)
        ))
    })
}

/// A parsed client request.
#[derive(Debug)]
pub enum Request<'a> {
    /// Start receiving a topic.
    Subscribe {
        /// The topic.
        topic: Cow<'a, str>,
        /// Resume point, if any.
        since: Option<Since>,
        /// A wildcard's resume point, if any.
        wild_since: Option<WildSince>,
    },
    /// Stop receiving a topic.
    Unsubscribe {
        /// The topic.
        topic: Cow<'a, str>,
    },
    /// Publish `data` to a topic.
    Publish {
        /// The topic.
        topic: Cow<'a, str>,
        /// The raw JSON value.
        data: &'a RawValue,
    },
    /// Liveness check.
    Ping,
    /// Replace the connection's token (and with it its permissions and expiry).
    Refresh {
        /// The new JWT.
        token: Cow<'a, str>,
    },
}

/// A parsed frame: the echoed `id` (raw JSON) and the request, or the error to answer with.
pub struct Parsed<'a> {
    /// The request's `id`, echoed in the reply.
    pub id: Option<&'a RawValue>,
    /// The request, or why it is not one.
    pub request: Result<Request<'a>, ProtocolError>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    // Read in `build_request`, so that a bad `since` is answered with the request's id.
    #[serde(borrow)]
    since: Option<&'a RawValue>,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Parsed<'_> {
    let env: Envelope<'_> = match serde_json::from_str(text) {
        Ok(env) => env,
        Err(e) => {
            return Parsed {
                id: None,
                request: Err(ProtocolError::new(
                    ErrorCode::BadRequest,
                    format!("frame is not a valid request object: {e}"),
                )),
            };
        }
    };
    let id = env.id.filter(|id| id.get().len() <= 256);
    let request = build_request(env);
    Parsed { id, request }
}

fn build_request(env: Envelope<'_>) -> Result<Request<'_>, ProtocolError> {
    let bad = |m: &str| ProtocolError::new(ErrorCode::BadRequest, m);
    if env.id.is_some_and(|id| id.get().len() > 256) {
        return Err(bad("id must be at most 256 bytes of JSON"));
    }
    let op = env.op.ok_or_else(|| bad("missing \"op\""))?;
    let topic = || {
        let topic = env.topic.clone().ok_or_else(|| bad("missing \"topic\""))?;
        crate::topic::validate(&topic)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidTopic, e.to_string()))?;
        Ok::<_, ProtocolError>(topic)
    };
    // What a subscribe or unsubscribe names: a topic or a wildcard.
    let target = || {
        let name = env.topic.clone().ok_or_else(|| bad("missing \"topic\""))?;
        let target = crate::topic::parse_target(&name)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidTopic, e.to_string()))?;
        Ok::<_, ProtocolError>((name, target))
    };
    match &*op {
        "subscribe" => {
            let (topic, target) = target()?;
            if let (Some(raw), Target::Wildcard(pattern)) = (env.since, &target) {
                let wild_since = Some(WildSince::parse(raw, pattern)?);
                return Ok(Request::Subscribe {
                    topic,
                    since: None,
                    wild_since,
                });
            }
            let since = match env.since {
                None => None,
                Some(raw) => Some(serde_json::from_str::<Since>(raw.get()).map_err(|e| {
                    bad(&format!(
                        "since must be {{\"epoch\":…,\"offset\":…}} with a non-negative integer offset: {e}"
                    ))
                })?),
            };
            Ok(Request::Subscribe {
                topic,
                since,
                wild_since: None,
            })
        }
        "unsubscribe" => Ok(Request::Unsubscribe { topic: target()?.0 }),
        "publish" => {
            let topic = topic()?;
            let data = env.data.ok_or_else(|| bad("missing \"data\""))?;
            Ok(Request::Publish { topic, data })
        }
        "ping" => Ok(Request::Ping),
        "refresh" => Ok(Request::Refresh {
            token: env.token.ok_or_else(|| bad("missing \"token\""))?,
        }),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownOp,
            format!("unknown op {:?}", truncate(other, 64)),
        )),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn start(op: &str, id: Option<&RawValue>, hint: usize) -> FrameBuilder {
    let mut b = FrameBuilder::with_capacity(hint + 48);
    b.put(b"{\"op\":\"");
    b.put(op.as_bytes());
    b.put(b"\"");
    if let Some(id) = id {
        b.put(b",\"id\":");
        b.put(id.get().as_bytes());
    }
    b
}

/// `{"op":"ack","id":…,"topic":…,"epoch":…,"offset":…[,"recovered":…]}`
pub fn ack(
    id: Option<&RawValue>,
    topic: &str,
    position: &Position,
    recovered: Option<bool>,
) -> Bytes {
    let mut b = start("ack", id, topic.len() + 64);
    b.put(b",\"topic\":");
    b.put_json_str(topic);
    b.put(b",\"epoch\":");
    b.put_json_str(position.epoch.as_str());
    b.put(b",\"offset\":");
    b.put_u64(position.offset);
    put_recovered(&mut b, recovered);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"ack","id":…,"topic":…}` for an unsubscribe (a wildcard subscribe's is
/// [`wildcard_ack`]).
/// `,"recovered":…` of a resume's ack, when it is one.
fn put_recovered(b: &mut FrameBuilder, recovered: Option<bool>) {
    if let Some(r) = recovered {
        b.put(if r {
            b",\"recovered\":true"
        } else {
            b",\"recovered\":false"
        });
    }
}

pub fn unsubscribe_ack(id: Option<&RawValue>, topic: &str) -> Bytes {
    let mut b = start("ack", id, topic.len());
    b.put(b",\"topic\":");
    b.put_json_str(topic);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"ack","id":…,"exp":…}` for a refresh: the new token's expiry.
pub fn refresh_ack(id: Option<&RawValue>, exp: u64) -> Bytes {
    let mut b = start("ack", id, 24);
    b.put(b",\"exp\":");
    b.put_u64(exp);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"unsubscribed","topic":…,"reason":…}`: the server ended a subscription (a refreshed
/// token no longer allows the topic: reason `forbidden`).
pub fn unsubscribed(topic: &str, reason: &str) -> Bytes {
    let mut b = start("unsubscribed", None, topic.len() + reason.len() + 24);
    b.put(b",\"topic\":");
    b.put_json_str(topic);
    b.put(b",\"reason\":");
    b.put_json_str(reason);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"pong","id":…}`
pub fn pong(id: Option<&RawValue>) -> Bytes {
    let mut b = start("pong", id, 0);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"error","id":…,"code":…,"message":…}`
pub fn error(id: Option<&RawValue>, err: &ProtocolError) -> Bytes {
    let mut b = start("error", id, err.message.len() + 32);
    b.put(b",\"code\":\"");
    b.put(err.code.as_str().as_bytes());
    b.put(b"\",\"message\":");
    b.put_json_str(&err.message);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"message","topic":…,"offset":…,"data":…}`: the frame every subscriber of a topic shares.
pub fn message(msg: &Message) -> Bytes {
    let mut b = FrameBuilder::with_capacity(msg.topic.len() + msg.data.len() + 64);
    b.put(b"{\"op\":\"message\",\"topic\":");
    b.put_json_str(&msg.topic);
    if let Some(p) = &msg.position {
        // The first message of an epoch names it: a subscriber acknowledged on a topic that did
        // not exist yet (epoch "0") learns the epoch to resume with from here.
        if p.offset == 1 {
            b.put(b",\"epoch\":");
            b.put_json_str(p.epoch.as_str());
        }
        b.put(b",\"offset\":");
        b.put_u64(p.offset);
    }
    b.put(b",\"data\":");
    b.put(&msg.data);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// `{"op":"gap","topic":…,"epoch":…,"offset":…}`: messages of the topic before `offset + 1` in
/// `epoch` that the subscriber has not received may be lost; its live stream continues with
/// `offset + 1`. The subscriber resubscribes with `since` to fetch what history still holds.
pub fn gap(topic: &str, resume: &Position) -> Bytes {
    let mut b = FrameBuilder::with_capacity(topic.len() + resume.epoch.as_str().len() + 64);
    b.put(b"{\"op\":\"gap\",\"topic\":");
    b.put_json_str(topic);
    b.put(b",\"epoch\":");
    b.put_json_str(resume.epoch.as_str());
    b.put(b",\"offset\":");
    b.put_u64(resume.offset);
    b.put(b"}");
    b.finish(OpCode::Text)
}

/// JSON body `{"code":…,"message":…}` for HTTP error responses.
pub fn http_error_body(err: &ProtocolError) -> String {
    serde_json::json!({"code": err.code.as_str(), "message": err.message}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_bridge::Epoch;

    fn payload(f: &Bytes) -> serde_json::Value {
        let start = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&f[start..]).unwrap()
    }

    #[test]
    fn parses_each_op_and_keeps_raw_id_and_data() {
        let p = parse(r#"{"op":"publish","topic":"chat.r1","data":{"b":1, "a":[2]},"id":"x-1"}"#);
        assert_eq!(p.id.unwrap().get(), "\"x-1\"");
        match p.request.unwrap() {
            Request::Publish { topic, data } => {
                assert_eq!(topic, "chat.r1");
                assert_eq!(data.get(), r#"{"b":1, "a":[2]}"#);
            }
            other => panic!("{other:?}"),
        }
        let p = parse(r#"{"op":"subscribe","topic":"a","since":{"epoch":"e","offset":41}}"#);
        match p.request.unwrap() {
            Request::Subscribe { since, .. } => assert_eq!(since.unwrap().offset, 41),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"op":"ping","id":5}"#).request,
            Ok(Request::Ping)
        ));
    }

    #[test]
    fn errors_carry_codes() {
        let code = |s: &str| parse(s).request.unwrap_err().code;
        assert_eq!(code("nope"), ErrorCode::BadRequest);
        assert_eq!(code("[1]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"id":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":"fly","id":1}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"op":"subscribe"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a b"}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"publish","topic":"a"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topic":"a","since":{"epoch":"e"}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(parse(r#"{"op":"fly","id":7}"#).id.unwrap().get(), "7");
    }

    #[test]
    fn resume_offsets_past_2_pow_53_are_clamped_and_non_integers_refused() {
        let since = |offset: &str| {
            let text = format!(
                r#"{{"op":"subscribe","topic":"a","id":3,"since":{{"epoch":"e","offset":{offset}}}}}"#
            );
            let p = parse(&text);
            assert_eq!(p.id.map(|id| id.get()), Some("3"), "{offset}");
            match p.request {
                Ok(Request::Subscribe { since, .. }) => Ok(since.map(|s| s.offset)),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.code),
            }
        };
        let max = Ok(Some(MAX_EXACT_OFFSET));
        assert_eq!(since("0"), Ok(Some(0)));
        assert_eq!(since("41"), Ok(Some(41)));
        assert_eq!(since("9007199254740991"), max);
        assert_eq!(since("9007199254741002"), max);
        assert_eq!(since("18446744073709551615"), max);
        assert_eq!(since("123456789012345678901234567890"), max);
        for bad in [
            "-1", "-0", "1.5", "41.0", "1e3", "\"41\"", "[]", "true", "null",
        ] {
            assert_eq!(since(bad), Err(ErrorCode::BadRequest), "{bad}");
        }
        let p = parse(r#"{"op":"subscribe","topic":"a","id":4,"since":{"epoch":"e"}}"#);
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
        let p = parse(r#"{"op":"subscribe","topic":"a","since":null}"#);
        assert!(matches!(
            p.request,
            Ok(Request::Subscribe { since: None, .. })
        ));
        assert_eq!(parse_offset("007"), Some(7));
        assert_eq!(parse_offset(""), None);
        assert_eq!(parse_offset("+1"), None);
    }

    #[test]
    fn replies_are_valid_json() {
        let pos = Position {
            epoch: Epoch::new("ab"),
            offset: 41,
        };
        let id = RawValue::from_string("1".into()).unwrap();
        let v = payload(&ack(Some(&id), "t.a", &pos, Some(false)));
        assert_eq!(
            v,
            serde_json::json!({"op":"ack","id":1,"topic":"t.a","epoch":"ab","offset":41,"recovered":false})
        );
        let err = ProtocolError::new(ErrorCode::Forbidden, "no \"way\"");
        let v = payload(&error(None, &err));
        assert_eq!(v["code"], "forbidden");
        assert_eq!(v["message"], "no \"way\"");
        let msg = Message {
            topic: "t".into(),
            position: Some(pos),
            data: Bytes::from_static(b"{\"x\": 1}"),
        };
        let f = message(&msg);
        assert!(f.ends_with(b"\"data\":{\"x\": 1}}"));
        assert_eq!(payload(&f)["offset"], 42 - 1);
        let v = payload(&gap("t.a", msg.position.as_ref().unwrap()));
        assert_eq!(
            v,
            serde_json::json!({"op":"gap","topic":"t.a","epoch":"ab","offset":41})
        );
    }
}
