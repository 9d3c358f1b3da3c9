//! Bounded fuzzing of everything that parses client (or operator) input: protocol frames, topic
//! names and patterns, the WebSocket frame reader, and config files.
//!
//! Property tests with fixed case counts and no persisted failure files, so a run is repeatable in
//! time (well under a minute in a debug build) and can gate CI. The coverage-guided counterparts
//! are the cargo-fuzz targets in `fuzz/` (see `docs/conformance.md`); an input either finds that
//! crashes becomes a regression test at the end of this file.

use std::time::Duration;

use gateway::config::{Cli, Settings};
use gateway::protocol::{self, ErrorCode, Request};
use gateway::topic::{self, MAX_TOPIC_LEN, Pattern};
use gateway::ws_read::{Incoming, ReadError, WsReader};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

/// Case counts are fixed (not from `PROPTEST_CASES`) so the run time stays bounded.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

// ------------------------------------------------------------------------------------------------
// Topics and patterns
// ------------------------------------------------------------------------------------------------

/// What `topic::validate` must accept, written independently of it.
fn topic_is_valid(t: &str) -> bool {
    (1..=MAX_TOPIC_LEN).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        && t.split('.').all(|l| !l.is_empty())
}

/// What a subscribe or unsubscribe may name: a topic, or a pattern whose levels are names, `*`,
/// or (last) `>`.
fn subscription_is_valid(t: &str) -> bool {
    if topic_is_valid(t) {
        return true;
    }
    let levels: Vec<&str> = t.split('.').collect();
    (1..=MAX_TOPIC_LEN).contains(&t.len())
        && levels
            .iter()
            .enumerate()
            .all(|(i, l)| *l == "*" || (*l == ">" && i + 1 == levels.len()) || topic_is_valid(l))
}

/// Reference matcher: `*` is one level, `>` (last) one or more.
fn oracle_matches(pattern: &[&str], topic: &[&str]) -> bool {
    match (pattern.split_first(), topic.split_first()) {
        (None, None) => true,
        (Some((&">", [])), Some(_)) => true,
        (Some((&"*", p)), Some((_, t))) => oracle_matches(p, t),
        (Some((l, p)), Some((tl, t))) => l == tl && oracle_matches(p, t),
        _ => false,
    }
}

/// Strings close to topic syntax: allowed characters, dots, wildcards and a few strays.
fn topicish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c.]{0,12}",
        "[A-Za-z0-9_.:*>-]{0,40}",
        "[a-z*>. é\u{0}]{0,10}",
        "[a-z]{190,210}",
        any::<String>(),
    ]
}

/// A small alphabet of levels, so patterns and topics often meet.
fn levels(wild: bool) -> impl Strategy<Value = Vec<String>> {
    let level = if wild {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("ab".to_string()),
            Just("*".to_string()),
            Just(">".to_string()),
        ]
        .boxed()
    } else {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("ab".to_string())
        ]
        .boxed()
    };
    prop::collection::vec(level, 1..5)
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn topic_validate_agrees_with_the_rules(t in topicish()) {
        prop_assert_eq!(topic::validate(&t).is_ok(), topic_is_valid(&t), "{:?}", t);
    }

    #[test]
    fn pattern_parse_never_panics_and_matches_arbitrary_text(p in topicish(), t in topicish()) {
        if let Ok(pattern) = Pattern::parse(&p) {
            // `matches` expects a valid topic; anything else must still not panic.
            let _ = pattern.matches(&t);
            if topic_is_valid(&t) {
                let pl: Vec<&str> = p.split('.').collect();
                let tl: Vec<&str> = t.split('.').collect();
                prop_assert_eq!(pattern.matches(&t), oracle_matches(&pl, &tl), "{:?} vs {:?}", p, t);
            }
        }
    }

    #[test]
    fn pattern_matches_agrees_with_reference(p in levels(true), t in levels(false)) {
        let ps = p.join(".");
        let ts = t.join(".");
        let pl: Vec<&str> = p.iter().map(String::as_str).collect();
        let tl: Vec<&str> = t.iter().map(String::as_str).collect();
        match Pattern::parse(&ps) {
            Ok(pattern) => {
                prop_assert!(!pl[..pl.len() - 1].contains(&">"));
                prop_assert_eq!(pattern.matches(&ts), oracle_matches(&pl, &tl), "{} vs {}", ps, ts);
            }
            Err(_) => prop_assert!(pl[..pl.len() - 1].contains(&">"), "refused {}", ps),
        }
        // Every valid topic is a pattern that matches itself, and `>` matches everything.
        prop_assert!(Pattern::parse(&ts).unwrap().matches(&ts));
        prop_assert!(Pattern::parse(">").unwrap().matches(&ts));
    }
}

// ------------------------------------------------------------------------------------------------
// Protocol frames
// ------------------------------------------------------------------------------------------------

/// JSON values of all shapes, including deep ones.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        ".{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z]{0,4}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{}:{}", serde_json::to_string(&k).unwrap(), v))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

/// Request-like objects: known and unknown fields, right and wrong types, odd topics.
fn request_text() -> impl Strategy<Value = String> {
    let op = prop_oneof![
        Just("\"subscribe\"".to_string()),
        Just("\"unsubscribe\"".to_string()),
        Just("\"publish\"".to_string()),
        Just("\"ping\"".to_string()),
        Just("\"Subscribe\"".to_string()),
        json_value(),
    ];
    let topic = prop_oneof![
        topicish().prop_map(|t| serde_json::to_string(&t).unwrap()),
        json_value(),
        Just("\"a\\u002eb\"".to_string()),
        Just("\"\\ud800\"".to_string()),
    ];
    let since = prop_oneof![
        ("[a-z0-9]{0,6}", any::<u64>())
            .prop_map(|(e, o)| format!("{{\"epoch\":\"{e}\",\"offset\":{o}}}")),
        json_value(),
    ];
    let id = prop_oneof![
        json_value(),
        "[a-z]{250,260}".prop_map(|s| format!("\"{s}\""))
    ];
    let field = prop_oneof![
        op.prop_map(|v| format!("\"op\":{v}")),
        topic.prop_map(|v| format!("\"topic\":{v}")),
        json_value().prop_map(|v| format!("\"data\":{v}")),
        id.prop_map(|v| format!("\"id\":{v}")),
        since.prop_map(|v| format!("\"since\":{v}")),
        ("[a-z]{1,5}", json_value()).prop_map(|(k, v)| format!("\"{k}\":{v}")),
    ];
    (prop::collection::vec(field, 0..7), 0u8..8).prop_map(|(fields, noise)| {
        let mut s = format!("{{{}}}", fields.join(","));
        match noise {
            0 => {
                s.pop();
            }
            1 => s.insert(0, ' '),
            2 => s.push_str(" x"),
            _ => {}
        }
        s
    })
}

/// Checks what `parse` promises, for any input.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    let parsed = protocol::parse(text);
    if let Some(id) = parsed.id {
        prop_assert!(id.get().len() <= 256);
        prop_assert!(serde_json::from_str::<serde_json::Value>(id.get()).is_ok());
    }
    match &parsed.request {
        Ok(Request::Subscribe { topic, .. } | Request::Unsubscribe { topic }) => {
            prop_assert!(subscription_is_valid(topic), "accepted topic {:?}", topic);
        }
        Ok(Request::Publish { topic, data }) => {
            prop_assert!(topic_is_valid(topic), "accepted topic {:?}", topic);
            // `data` is forwarded raw: it must be one complete JSON value, kept byte for byte.
            prop_assert!(serde_json::from_str::<serde_json::Value>(data.get()).is_ok());
            prop_assert!(text.contains(data.get()));
        }
        Ok(Request::Ping) => {}
        Ok(Request::Refresh { .. }) => {}
        Err(e) => {
            // The error reply is valid JSON that echoes the id.
            let frame = protocol::error(parsed.id, e);
            let body = frame_payload(&frame);
            let v: serde_json::Value = serde_json::from_slice(body).expect("error reply is JSON");
            prop_assert_eq!(&v["op"], "error");
            prop_assert_eq!(&v["code"], e.code.as_str());
            if let Some(id) = parsed.id {
                let id: serde_json::Value = serde_json::from_str(id.get()).unwrap();
                prop_assert_eq!(&v["id"], &id);
            }
        }
    }
    Ok(())
}

/// The payload of an unmasked server frame.
fn frame_payload(f: &[u8]) -> &[u8] {
    match f[1] & 0x7f {
        126 => &f[4..],
        127 => &f[10..],
        _ => &f[2..],
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn protocol_parse_arbitrary_text(text in any::<String>()) {
        check_parse(&text)?;
    }

    #[test]
    fn protocol_parse_request_like_objects(text in request_text()) {
        check_parse(&text)?;
    }
}

#[test]
fn protocol_parse_survives_deep_nesting() {
    for depth in [127, 128, 129, 10_000, 200_000] {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        for text in [
            format!(r#"{{"op":"publish","topic":"a","data":{deep}}}"#),
            format!(r#"{{"op":"ping","id":{deep}}}"#),
            format!(r#"{{"op":"subscribe","topic":"a","since":{deep}}}"#),
            deep.clone(),
        ] {
            let p = protocol::parse(&text);
            if let Err(e) = &p.request {
                assert!(
                    matches!(e.code, ErrorCode::BadRequest),
                    "depth {depth}: {e:?}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// WebSocket frame reader
// ------------------------------------------------------------------------------------------------

/// Message cap for the reader under test (small, so 1009 is reachable).
const CAP: usize = 1024;

/// One client frame as the generator describes it.
#[derive(Clone, Debug)]
struct RawFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    /// `None`: sent unmasked.
    mask: Option<[u8; 4]>,
    /// Length field width: 0 = minimal, 1 = 16-bit, 2 = 64-bit (the wider ones even when short).
    len_width: u8,
    /// Declared length when it should differ from the payload (a lie, e.g. a huge length).
    declared: Option<u64>,
    payload: Vec<u8>,
}

impl RawFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push((self.fin as u8) << 7 | (self.rsv & 7) << 4 | (self.opcode & 0xf));
        let len = self.declared.unwrap_or(self.payload.len() as u64);
        let m = if self.mask.is_some() { 0x80 } else { 0 };
        match (self.len_width, len) {
            (0, 0..=125) => out.push(m | len as u8),
            (0 | 1, 0..=65535) => {
                out.push(m | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(m | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        match self.mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => ".{0,40}".prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 0..40),
        // Valid text cut at an arbitrary byte, so characters straddle fragments.
        1 => ("[a-zé€😀]{0,30}", any::<prop::sample::Index>()).prop_map(|(s, i)| {
            let b = s.into_bytes();
            let cut = i.index(b.len() + 1);
            b[..cut].to_vec()
        }),
        1 => (100usize..700).prop_map(|n| vec![b'x'; n]),
        1 => prop::collection::vec(any::<u8>(), 120..130),
    ]
}

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    (
        prop::bool::weighted(0.6),
        prop_oneof![12 => Just(0u8), 1 => 1u8..8],
        prop_oneof![
            4 => Just(1u8), 2 => Just(2u8), 4 => Just(0u8), 1 => Just(8u8),
            1 => Just(9u8), 1 => Just(10u8), 1 => 0u8..16
        ],
        prop_oneof![15 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)],
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop_oneof![
            30 => Just(None),
            1 => prop_oneof![Just(u64::MAX), Just(1u64 << 63), Just(CAP as u64 + 1), 0u64..200]
                .prop_map(Some)
        ],
        payload(),
    )
        .prop_map(
            |(fin, rsv, opcode, mask, len_width, declared, payload)| RawFrame {
                fin,
                rsv,
                opcode,
                mask,
                len_width,
                declared,
                payload,
            },
        )
}

/// Close frames: a code (allowed or not) and a reason (valid UTF-8 or not).
fn close_frame() -> impl Strategy<Value = RawFrame> {
    let code = prop_oneof![
        Just(1000u16),
        Just(1005u16),
        Just(1012u16),
        Just(3000u16),
        Just(4999u16),
        any::<u16>()
    ];
    let reason = prop_oneof![
        ".{0,10}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..10)
    ];
    (
        prop_oneof![3 => (code, reason).prop_map(Some), 1 => Just(None)],
        any::<[u8; 4]>(),
    )
        .prop_map(|(body, key)| {
            let payload = match body {
                Some((code, reason)) => [&code.to_be_bytes()[..], &reason].concat(),
                None => Vec::new(),
            };
            RawFrame {
                fin: true,
                rsv: 0,
                opcode: 8,
                mask: Some(key),
                len_width: 0,
                declared: None,
                payload,
            }
        })
}

/// How a reader run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Violation(u16),
    Gone,
    /// A close frame with this code (the reader is not asked for more after it).
    Close(u16),
}

/// What the reader should yield before it ends.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
}

/// What the model expects of a run.
struct Expected {
    /// Everything the reader yields before it ends.
    events: Vec<Event>,
    /// The acceptable ends. Where one frame breaks several rules, any of their close codes fits
    /// (which check comes first is the reader's business), and a frame cut short by the end of
    /// the stream may end either way.
    ends: Vec<End>,
    /// A frame lied about its length: the model gives up there, and only `events` before it count.
    desync: bool,
}

/// Reference model of RFC 6455 server-side reading as pubgate does it, over a stream of whole
/// frames cut off after `len` bytes. Written from the RFC, not from the reader.
fn model(frames: &[RawFrame], len: usize) -> Expected {
    let mut events = Vec::new();
    let mut partial: Option<(u8, Vec<u8>)> = None;
    let mut pos = 0usize;
    let utf8 = |b: &[u8]| std::str::from_utf8(b).is_ok();
    for f in frames {
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        let avail = len.saturating_sub(pos);
        pos += bytes.len();
        let truncated = avail < bytes.len();
        if avail < 2 {
            return Expected {
                events,
                ends: vec![End::Gone],
                desync: false,
            };
        }
        let declared = f.declared.unwrap_or(f.payload.len() as u64);
        let known = matches!(f.opcode, 0 | 1 | 2 | 8 | 9 | 10);
        let control = f.opcode >= 8;
        let p = &f.payload;

        // Rules a reader can check from the header alone.
        let mut faults = Vec::new();
        if f.rsv != 0 || !known {
            faults.push(1002);
        }
        if known && control && (!f.fin || declared > 125) {
            faults.push(1002);
        }
        if declared > CAP as u64 {
            faults.push(1009);
        }
        if f.mask.is_none() {
            faults.push(1002);
        }
        let lie = declared != p.len() as u64;
        if lie && faults.is_empty() {
            return Expected {
                events,
                ends: Vec::new(),
                desync: true,
            };
        }
        // Rules on the payload and on the message so far (known opcodes only).
        if known && !lie {
            match f.opcode {
                1 | 2 => {
                    let ok = if f.fin { utf8(p) } else { utf8_prefix_ok(p) };
                    if f.opcode == 1 && !ok {
                        faults.push(1007);
                    }
                    if partial.is_some() {
                        faults.push(1002);
                    }
                }
                0 => match &partial {
                    None => faults.push(1002),
                    Some((op, buf)) => {
                        let whole = [&buf[..], p].concat();
                        if whole.len() > CAP {
                            faults.push(1009);
                        }
                        let ok = if f.fin {
                            utf8(&whole)
                        } else {
                            utf8_prefix_ok(&whole)
                        };
                        if *op == 1 && !ok {
                            faults.push(1007);
                        }
                    }
                },
                8 if p.len() == 1 => faults.push(1002),
                8 if p.len() >= 2 => {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    if !matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999) {
                        faults.push(1002);
                    }
                    if !utf8(&p[2..]) {
                        faults.push(1007);
                    }
                }
                _ => {}
            }
        }
        if truncated || !faults.is_empty() {
            let mut ends: Vec<End> = faults.into_iter().map(End::Violation).collect();
            if truncated {
                ends.push(End::Gone);
            }
            return Expected {
                events,
                ends,
                desync: false,
            };
        }
        match f.opcode {
            9 => events.push(Event::Ping(p.clone())),
            10 => events.push(Event::Pong),
            8 => {
                let code = if p.is_empty() {
                    1000
                } else {
                    u16::from_be_bytes([p[0], p[1]])
                };
                return Expected {
                    events,
                    ends: vec![End::Close(code)],
                    desync: false,
                };
            }
            1 | 2 if f.fin => events.push(if f.opcode == 1 {
                Event::Text(p.clone())
            } else {
                Event::Binary(p.clone())
            }),
            1 | 2 => partial = Some((f.opcode, p.clone())),
            _ => {
                let (op, mut buf) = partial.take().expect("checked above");
                buf.extend_from_slice(p);
                if !f.fin {
                    partial = Some((op, buf));
                } else if op == 1 {
                    events.push(Event::Text(buf));
                } else {
                    events.push(Event::Binary(buf));
                }
            }
        }
    }
    Expected {
        events,
        ends: vec![End::Gone],
        desync: false,
    }
}

/// Whether `b` is valid UTF-8 or a valid prefix of it (only an unfinished character at the end).
fn utf8_prefix_ok(b: &[u8]) -> bool {
    match std::str::from_utf8(b) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

/// Feeds `bytes` to a `WsReader` through an in-memory duplex whose buffer is `chunk` bytes (so
/// reads split headers and payloads anywhere) and collects what it yields.
fn run_reader(rt: &tokio::runtime::Runtime, bytes: Vec<u8>, chunk: usize) -> (Vec<Event>, End) {
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = client;
            // Fails with a broken pipe once the reader stops early: that is fine.
            let _ = client.write_all(&bytes).await;
        });
        let mut reader = WsReader::new(server, CAP);
        let mut events = Vec::new();
        // Every call consumes at least one frame header (2 bytes) or ends: bounded by the input.
        let end = loop {
            let next = tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .expect("WsReader::next hung on a finished stream");
            match next {
                Ok(Incoming::Text(t)) => {
                    assert!(t.len() <= CAP, "text message of {} bytes > cap", t.len());
                    assert!(std::str::from_utf8(&t).is_ok(), "invalid UTF-8 yielded");
                    events.push(Event::Text(t.to_vec()));
                }
                Ok(Incoming::Binary(b)) => {
                    assert!(b.len() <= CAP, "binary message of {} bytes > cap", b.len());
                    events.push(Event::Binary(b.to_vec()));
                }
                Ok(Incoming::Ping(p)) => {
                    assert!(p.len() <= 125, "ping payload of {} bytes", p.len());
                    events.push(Event::Ping(p.to_vec()));
                }
                Ok(Incoming::Pong) => events.push(Event::Pong),
                Ok(Incoming::Close(code)) => {
                    assert!(
                        matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999),
                        "close code {code} passed"
                    );
                    break End::Close(code);
                }
                Err(ReadError::Violation(code, reason)) => {
                    assert!(
                        matches!(code, 1002 | 1007 | 1009),
                        "violation closes with {code} ({reason})"
                    );
                    assert!(reason.len() <= 123);
                    break End::Violation(code);
                }
                Err(ReadError::Gone) => break End::Gone,
            }
        };
        drop(reader);
        let _ = writer.await;
        (events, end)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// A well-formed message, fragmented at random points, with pings and pongs between fragments.
fn valid_message() -> impl Strategy<Value = Vec<RawFrame>> {
    (
        prop::bool::ANY,
        prop_oneof![
            3 => "[a-zé€😀 ]{0,40}".prop_map(String::into_bytes),
            1 => "[a-z]{300,600}".prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>(), 0..60),
            1 => (1000usize..1050).prop_map(|n| vec![b'y'; n]),
        ],
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        prop::collection::vec(
            prop_oneof![Just(None), Just(Some(9u8)), Just(Some(10u8))],
            4,
        ),
        any::<[u8; 4]>(),
    )
        .prop_map(|(text, payload, cuts, controls, key)| {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
            cuts.push(payload.len());
            cuts.sort_unstable();
            let mut frames = Vec::new();
            let mut start = 0;
            for (n, &end) in cuts.iter().enumerate() {
                let opcode = match (n, text) {
                    (0, true) => 1,
                    (0, false) => 2,
                    _ => 0,
                };
                let mut f = masked_with(key, n + 1 == cuts.len(), opcode, &payload[start..end]);
                f.len_width = (end % 3) as u8;
                frames.push(f);
                if let Some(op) = controls[n] {
                    frames.push(masked_with(
                        key,
                        true,
                        op,
                        &payload[start..end.min(start + 125)],
                    ));
                }
                start = end;
            }
            frames
        })
}

fn masked_with(key: [u8; 4], fin: bool, opcode: u8, payload: &[u8]) -> RawFrame {
    RawFrame {
        fin,
        rsv: 0,
        opcode,
        mask: Some(key),
        len_width: 0,
        declared: None,
        payload: payload.to_vec(),
    }
}

/// Mostly well-formed conversations with one fault somewhere, and free-form frame sequences.
fn frames_strategy() -> impl Strategy<Value = Vec<RawFrame>> {
    let valid = || prop::collection::vec(valid_message(), 0..5).prop_map(|m| m.concat());
    prop_oneof![
        1 => valid(),
        2 => (valid(), prop_oneof![3 => raw_frame(), 1 => close_frame()], any::<prop::sample::Index>())
            .prop_map(|(mut frames, fault, at)| {
                let at = at.index(frames.len() + 1);
                frames.insert(at, fault);
                frames
            }),
        1 => prop::collection::vec(prop_oneof![8 => raw_frame(), 1 => close_frame()], 0..12),
    ]
}

proptest! {
    #![proptest_config(config(1500))]

    /// Well-formed and malformed frame sequences: the reader yields exactly what the model says
    /// and ends the same way.
    #[test]
    fn ws_reader_matches_the_model(
        frames in frames_strategy(),
        cut in any::<prop::sample::Index>(),
        truncate in prop::bool::weighted(0.2),
        chunk in prop_oneof![Just(1usize), 2usize..16, Just(4096usize)],
    ) {
        let rt = runtime();
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode(&mut bytes);
        }
        let len = if truncate { cut.index(bytes.len() + 1) } else { bytes.len() };
        bytes.truncate(len);
        let want = model(&frames, len);
        let (events, end) = run_reader(&rt, bytes, chunk);
        if want.desync {
            // After the lie the reader takes payload bytes for frames: only what came before
            // can be compared.
            prop_assert!(events.starts_with(&want.events), "{:?} vs {:?}", events, want.events);
        } else {
            prop_assert_eq!(events, want.events);
            prop_assert!(want.ends.contains(&end), "ended {:?}, expected one of {:?}", end, want.ends);
        }
    }

    /// The same sequences with bytes flipped, and plain noise: only the invariants hold.
    #[test]
    fn ws_reader_survives_mutated_streams(
        frames in frames_strategy(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        noise in prop::collection::vec(any::<u8>(), 0..300),
        chunk in prop_oneof![Just(1usize), 2usize..16, Just(4096usize)],
    ) {
        let rt = runtime();
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode(&mut bytes);
        }
        if !bytes.is_empty() {
            for (i, x) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
        }
        run_reader(&rt, bytes, chunk);
        run_reader(&rt, noise, chunk);
    }
}

// ------------------------------------------------------------------------------------------------
// Config files
// ------------------------------------------------------------------------------------------------

/// Values of every TOML type, sensible and not.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(2),
            Just(63),
            Just(64),
            Just(65536)
        ]
        .prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("1.5".to_string()),
        Just("nan".to_string()),
        prop_oneof![
            Just("\"1s\""),
            Just("\"0s\""),
            Just("\"5m\""),
            Just("\"99999999999999999999h\""),
            Just("\"18446744073709551615s\""),
            Just("\"soon\""),
            Just("\"127.0.0.1:0\""),
            Just("\"[::1]:0\""),
            Just("\"/echo\""),
            Just("\"/ws\""),
            Just("\"memory\""),
            Just("\"redis\""),
            Just("\"drop_oldest\""),
            Just("\"json\""),
            Just("\"\""),
        ]
        .prop_map(str::to_string),
        ".{0,12}".prop_map(|s| toml_string(&s)),
        prop::collection::vec("[a-z>*.]{0,6}", 0..3).prop_map(|v| {
            let items: Vec<String> = v.iter().map(|s| toml_string(s)).collect();
            format!("[{}]", items.join(","))
        }),
        Just("{ a = 1 }".to_string()),
    ]
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

const SECTIONS: &[(&str, &[&str])] = &[
    (
        "server",
        &[
            "listen",
            "metrics_listen",
            "echo_path",
            "max_connections",
            "handshake_timeout",
            "ping_interval",
            "idle_timeout",
            "allowed_origins",
            "bogus",
        ],
    ),
    (
        "limits",
        &[
            "max_message_size",
            "max_subscriptions",
            "send_queue_frames",
            "send_queue_bytes",
            "slow_consumer",
            "max_batch_messages",
            "max_batch_bytes",
            "max_json_depth",
            "subscribe_rate",
            "subscribe_burst",
        ],
    ),
    ("broker", &["kind", "url", "prefix", "unsubscribe_delay"]),
    ("tls", &["cert", "key"]),
    (
        "auth",
        &[
            "anonymous",
            "anonymous_subscribe",
            "anonymous_publish",
            "jwt_secret",
            "api_keys",
        ],
    ),
    ("drain", &["grace"]),
    ("history", &["size", "ttl"]),
    ("log", &["format", "level"]),
    ("nosuchsection", &["x"]),
];

fn config_text() -> impl Strategy<Value = String> {
    let entry = (
        0..SECTIONS.len(),
        any::<prop::sample::Index>(),
        toml_value(),
    )
        .prop_map(|(s, k, v)| {
            let (section, keys) = SECTIONS[s];
            (section, keys[k.index(keys.len())], v)
        });
    prop::collection::vec(entry, 0..8).prop_map(|entries| {
        // Group by section so the TOML is well-formed apart from duplicate keys.
        let mut out = String::new();
        for (section, _) in SECTIONS {
            let mut seen = Vec::new();
            let lines: Vec<String> = entries
                .iter()
                .filter(|(s, k, _)| {
                    s == section && !seen.contains(k) && {
                        seen.push(*k);
                        true
                    }
                })
                .map(|(_, k, v)| format!("{k} = {v}\n"))
                .collect();
            if !lines.is_empty() {
                out.push_str(&format!("[{section}]\n"));
                out.extend(lines);
            }
        }
        out
    })
}

/// Loads `text` as the `--config` file.
fn load(dir: &std::path::Path, text: &str) -> Result<Settings, String> {
    let path = dir.join("pubgate.toml");
    std::fs::write(&path, text).unwrap();
    let cli = Cli {
        config: Some(path),
        ..Cli::default()
    };
    Settings::load(&cli).map_err(|e| e.to_string())
}

fn check_config(dir: &std::path::Path, text: &str) -> Result<(), TestCaseError> {
    match load(dir, text) {
        Ok(s) => {
            // What `validate` promises about a loaded config.
            // max_connections 0 means "as many as the open-files limit allows".
            prop_assert!(!s.server.ping_interval.is_zero());
            prop_assert!(s.server.idle_timeout > s.server.ping_interval);
            prop_assert!(s.limits.max_message_size >= 64);
            prop_assert!(
                s.limits.send_queue_bytes
                    >= s.limits.max_message_size + gateway::config::MESSAGE_FRAME_OVERHEAD
            );
            prop_assert!(s.limits.subscribe_rate >= 1 && s.limits.subscribe_burst >= 1);
            prop_assert!(s.limits.max_batch_bytes >= s.limits.max_message_size);
            prop_assert!(s.limits.max_json_depth >= 1);
            prop_assert!(s.auth.api_keys.iter().all(|k| !k.trim().is_empty()));
        }
        Err(e) => prop_assert!(e.starts_with("config: ") && e.len() > 10, "{}", e),
    }
    Ok(())
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pubgate-fuzz-cfg-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn config_load_structured(text in config_text()) {
        let dir = temp_dir();
        let r = check_config(&dir, &text);
        std::fs::remove_dir_all(&dir).unwrap();
        r?;
    }

    #[test]
    fn config_load_arbitrary_text(text in prop_oneof![any::<String>(), "[\\[\\]a-z_=\".0-9 \n]{0,60}"]) {
        let dir = temp_dir();
        let r = check_config(&dir, &text);
        std::fs::remove_dir_all(&dir).unwrap();
        r?;
    }
}

// ------------------------------------------------------------------------------------------------
// Regressions: inputs the fuzzers found (each one crashed or misbehaved before its fix)
// ------------------------------------------------------------------------------------------------

/// Encodes frames for the regression tests.
fn stream(frames: &[RawFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    out
}

fn masked(fin: bool, opcode: u8, payload: &[u8]) -> RawFrame {
    RawFrame {
        fin,
        rsv: 0,
        opcode,
        mask: Some([0x37, 0xfa, 0x21, 0x3d]),
        len_width: 0,
        declared: None,
        payload: payload.to_vec(),
    }
}

#[test]
fn regression_unmasked_client_frame_is_refused_with_1002() {
    // fastwebsockets 0.10 reads unmasked client frames as if nothing were wrong.
    let mut f = masked(true, 1, b"hi");
    f.mask = None;
    let (events, end) = run_reader(&runtime(), stream(&[f]), 4096);
    assert!(events.is_empty());
    assert_eq!(end, End::Violation(1002));
}

#[test]
fn regression_invalid_utf8_in_a_first_fragment_fails_fast() {
    // Before: accepted until the last fragment (fastwebsockets skips text frames without FIN).
    let (events, end) = run_reader(
        &runtime(),
        stream(&[masked(false, 1, &[0xce, 0xba, 0xf4, 0x90])]),
        4096,
    );
    assert!(events.is_empty());
    assert_eq!(end, End::Violation(1007));
}

#[test]
fn regression_oversized_pong_and_close_are_refused() {
    let rt = runtime();
    let (_, end) = run_reader(&rt, stream(&[masked(true, 10, &[0; 126])]), 4096);
    assert_eq!(end, End::Violation(1002));
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(&[b'a'; 124]);
    let (_, end) = run_reader(&rt, stream(&[masked(true, 8, &close)]), 4096);
    assert_eq!(end, End::Violation(1002));
}
