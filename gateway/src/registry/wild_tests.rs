//! A wildcard subscriber's held messages: released after its ack (or its resume's replay) once
//! per topic, and on overflow a gap frame per topic that lost some.

use std::collections::HashMap;

use broker_bridge::{Epoch, Message, MessageSink, Offset, Position};
use bytes::Bytes;
use serde_json::{Value, json};

use super::tests::{json_of, queue, registry};

fn at(offset: Offset) -> Position {
    Position {
        epoch: Epoch::new("e"),
        offset,
    }
}

fn message(topic: &str, offset: Offset) -> Message {
    Message {
        topic: topic.into(),
        position: Some(at(offset)),
        data: Bytes::from(format!("{{\"n\":{offset}}}")),
    }
}

fn msg(topic: &str, offset: Offset) -> Value {
    let mut v = json!({"op":"message","topic":topic,"offset":offset,"data":{"n":offset}});
    if offset == 1 {
        v["epoch"] = json!("e");
    }
    v
}

fn ack() -> Bytes {
    Bytes::from_static(b"\x81\x0c{\"op\":\"ack\"}")
}

#[test]
fn held_messages_follow_the_ack_minus_what_the_replay_sent() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join("s.*", 1, q.clone());
    for m in [("s.a", 1), ("s.b", 1), ("s.a", 2), ("s.a", 3), ("x.a", 1)] {
        reg.deliver(message(m.0, m.1));
    }
    assert!(q.take().frames.is_empty(), "held while pending");
    // The replay sent s.a up to 2: only 3 of it follows, and all of s.b.
    let sent = HashMap::from([("s.a".into(), at(2))]);
    reg.activate_wildcard(&sub, Some(ack()), sent);
    reg.deliver(message("s.b", 2));
    let got: Vec<Value> = q.take().frames.iter().map(json_of).collect();
    assert_eq!(
        got,
        [
            json!({"op":"ack"}),
            msg("s.b", 1),
            msg("s.a", 3),
            msg("s.b", 2)
        ]
    );
}

#[test]
fn an_overflowing_held_list_ends_in_a_gap_frame_per_topic_that_lost_messages() {
    let reg = registry(2);
    let q = queue();
    let sub = reg.join("s.*", 1, q.clone());
    for m in [("s.a", 1), ("s.a", 2), ("s.a", 3), ("s.b", 1), ("s.a", 4)] {
        reg.deliver(message(m.0, m.1));
    }
    // The replay reached s.a 4 and s.c 7: nothing of them was lost.
    let sent = HashMap::from([("s.c".into(), at(7))]);
    reg.activate_wildcard(&sub, Some(ack()), sent);
    let mut got: Vec<Value> = q.take().frames.iter().map(json_of).collect();
    assert_eq!(got.first(), Some(&json!({"op":"ack"})), "{got:?}");
    // Across topics there is no order.
    got[1..].sort_by_key(|v| v["topic"].to_string());
    let gap = |t: &str, o: Offset| json!({"op":"gap","topic":t,"epoch":"e","offset":o});
    assert_eq!(got[1..], [gap("s.a", 4), gap("s.b", 1)]);
    // Live from then on.
    reg.deliver(message("s.a", 5));
    let got: Vec<Value> = q.take().frames.iter().map(json_of).collect();
    assert_eq!(got, [msg("s.a", 5)]);

    // A replay that already sent what was dropped gets no gap frame for it.
    let q = queue();
    let sub = reg.join("s.*", 2, q.clone());
    for o in 1..=3 {
        reg.deliver(message("s.a", o));
    }
    reg.activate_wildcard(&sub, None, HashMap::from([("s.a".into(), at(3))]));
    assert!(q.take().frames.is_empty());
}
