//! A wildcard subscriber's held messages: released after its ack (or its resume's replay) once
//! per topic, and on overflow a gap frame per topic that lost some.

use std::collections::HashMap;

use broker_bridge::{Epoch, Message, MessageSink, Offset, Position};
use bytes::Bytes;
use serde_json::{Value, json};

use super::tests::{json_of, queue, raw_of, registry};

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

fn in_epoch(topic: &str, epoch: &str, offset: Offset) -> Message {
    Message {
        topic: topic.into(),
        position: Some(Position {
            epoch: Epoch::new(epoch),
            offset,
        }),
        data: Bytes::from(format!("{{\"n\":{offset}}}")),
    }
}

fn gap_of(topic: &str, epoch: &str, offset: Offset) -> Value {
    json!({"op":"gap","topic":topic,"epoch":epoch,"offset":offset})
}

/// A wildcard subscriber's and a topic subscriber's frames of `topic`, without the acks.
fn frames_of(q: &crate::send_queue::SendQueue) -> Vec<Value> {
    q.take()
        .frames
        .iter()
        .map(json_of)
        .filter(|v| v["op"] != "ack")
        .collect()
}

#[test]
fn a_wildcard_subscriber_learns_an_epoch_change_as_the_topics_own_subscriber_does() {
    let reg = registry(100);
    let (wild, own) = (queue(), queue());
    let w = reg.join("s.*", 1, wild.clone());
    reg.activate_wildcard(&w, Some(ack()), HashMap::new());
    let o = reg.join("s.a", 2, own.clone());
    assert_eq!(
        reg.try_activate(
            &o,
            &Position {
                epoch: Epoch::new("e"),
                offset: 428
            }
        ),
        super::Activation::Live
    );
    // What a Redis FLUSHALL during a lost subscription connection came to: the broker says the
    // topic is empty ("0"), then a message of the old epoch published before the flush arrives,
    // then the new epoch begins.
    reg.deliver(in_epoch("s.a", "e", 429));
    reg.gap(
        "s.a",
        &Position {
            epoch: Epoch::new("0"),
            offset: 0,
        },
        broker_bridge::Lost::Offsets,
    );
    reg.deliver(in_epoch("s.a", "e", 434));
    reg.deliver(in_epoch("s.a", "f", 3));
    reg.deliver(in_epoch("s.a", "f", 4));
    let want = [
        json!({"op":"message","topic":"s.a","offset":429,"data":{"n":429}}),
        gap_of("s.a", "0", 0),
        gap_of("s.a", "e", 433),
        json!({"op":"message","topic":"s.a","offset":434,"data":{"n":434}}),
        gap_of("s.a", "f", 2),
        json!({"op":"message","topic":"s.a","offset":3,"data":{"n":3}}),
        json!({"op":"message","topic":"s.a","offset":4,"data":{"n":4}}),
    ];
    assert_eq!(frames_of(&own), want);
    assert_eq!(frames_of(&wild), want);
}

#[test]
fn a_new_epoch_from_its_first_message_needs_no_gap_frame_only_after_messages_of_another() {
    let reg = registry(100);
    let q = queue();
    let w = reg.join("s.*", 1, q.clone());
    reg.activate_wildcard(&w, None, HashMap::new());
    // Each topic's first message, whatever its offset, starts that topic: the subscriber never
    // had anything of it, and what came before was published before it subscribed.
    reg.deliver(in_epoch("s.a", "e", 7));
    reg.deliver(in_epoch("s.b", "e", 1));
    // s.b's next epoch starts at its first message, yet s.b had messages of the old one.
    reg.deliver(in_epoch("s.b", "f", 1));
    // A duplicate is skipped.
    reg.deliver(in_epoch("s.a", "e", 7));
    reg.deliver(in_epoch("s.a", "e", 8));
    assert_eq!(
        frames_of(&q),
        [
            json!({"op":"message","topic":"s.a","offset":7,"data":{"n":7}}),
            json!({"op":"message","topic":"s.b","epoch":"e","offset":1,"data":{"n":1}}),
            gap_of("s.b", "f", 0),
            json!({"op":"message","topic":"s.b","epoch":"f","offset":1,"data":{"n":1}}),
            json!({"op":"message","topic":"s.a","offset":8,"data":{"n":8}}),
        ]
    );
}

#[test]
fn held_messages_across_an_epoch_change_are_released_behind_a_gap_frame() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join("s.*", 1, q.clone());
    // Held while pending: s.a jumps from epoch e to f, s.b only has f.
    reg.deliver(in_epoch("s.a", "e", 5));
    reg.deliver(in_epoch("s.a", "f", 3));
    reg.deliver(in_epoch("s.b", "f", 9));
    // The replay sent nothing: each topic starts at its first held message.
    reg.activate_wildcard(&sub, None, HashMap::new());
    reg.deliver(in_epoch("s.a", "f", 4));
    assert_eq!(
        frames_of(&q),
        [
            json!({"op":"message","topic":"s.a","offset":5,"data":{"n":5}}),
            gap_of("s.a", "f", 2),
            json!({"op":"message","topic":"s.a","offset":3,"data":{"n":3}}),
            json!({"op":"message","topic":"s.b","offset":9,"data":{"n":9}}),
            json!({"op":"message","topic":"s.a","offset":4,"data":{"n":4}}),
        ]
    );
}

fn m(topic: &str, offset: Offset) -> Value {
    json!({"op":"message","topic":topic,"offset":offset,"data":{"n":offset}})
}

fn at_in(epoch: &str, offset: Offset) -> Position {
    Position {
        epoch: Epoch::new(epoch),
        offset,
    }
}

#[test]
fn a_resume_whose_replay_read_a_new_epoch_gets_nothing_of_the_old_one_held_before_it() {
    // Redis was flushed during the replay: the replay read epoch f (and sent s.a up to f:2), while
    // the node was still routing what epoch e had before the flush.
    let reg = registry(100);
    let q = queue();
    let sub = reg.join("s.*", 1, q.clone());
    for o in [5, 6] {
        reg.deliver(in_epoch("s.a", "e", o));
    }
    reg.gap("s.a", &at_in("f", 0), broker_bridge::Lost::Offsets);
    for o in [1, 2, 3] {
        reg.deliver(in_epoch("s.a", "f", o));
    }
    let sent = HashMap::from([("s.a".into(), at_in("f", 2))]);
    reg.activate_wildcard(&sub, None, sent);
    reg.deliver(in_epoch("s.a", "f", 4));
    assert_eq!(frames_of(&q), [m("s.a", 3), m("s.a", 4)]);
}

#[test]
fn a_resume_ahead_of_what_the_node_routed_gets_nothing_twice_and_the_others_everything() {
    let reg = registry(100);
    let (plain, resumed) = (queue(), queue());
    let p = reg.join("s.*", 1, plain.clone());
    reg.activate_wildcard(&p, None, HashMap::new());
    reg.deliver(in_epoch("s.a", "e", 7));
    // The replay read history up to e:9 (and, in a flush, f:2 of s.b) while the node had routed
    // s.a up to e:7 and s.b's old epoch up to e:4.
    reg.deliver(in_epoch("s.b", "e", 4));
    let r = reg.join("s.*", 2, resumed.clone());
    let sent = HashMap::from([("s.a".into(), at_in("e", 9)), ("s.b".into(), at_in("f", 2))]);
    reg.activate_wildcard(&r, None, sent);
    for (t, e, o) in [
        ("s.a", "e", 8),
        ("s.b", "e", 5),
        ("s.a", "e", 9),
        ("s.a", "e", 10),
        ("s.b", "f", 1),
        ("s.b", "f", 2),
        ("s.b", "f", 3),
        ("s.a", "e", 11),
    ] {
        reg.deliver(in_epoch(t, e, o));
    }
    assert_eq!(
        frames_of(&resumed),
        [m("s.a", 10), m("s.b", 3), m("s.a", 11)],
        "after its replay: nothing twice, nothing of s.b's old epoch"
    );
    assert_eq!(
        frames_of(&plain),
        [
            m("s.a", 7),
            m("s.b", 4),
            m("s.a", 8),
            m("s.b", 5),
            m("s.a", 9),
            m("s.a", 10),
            gap_of("s.b", "f", 0),
            json!({"op":"message","topic":"s.b","epoch":"f","offset":1,"data":{"n":1}}),
            m("s.b", 2),
            m("s.b", 3),
            m("s.a", 11),
        ]
    );
}

#[test]
fn raw_messages_an_overflowing_wildcard_held_list_dropped_each_end_in_a_gap_frame() {
    let reg = registry(2);
    let q = queue();
    let sub = reg.join("s.*", 1, q.clone());
    // s.a: offsets then raw messages after them; s.r: raw messages only; s.b: raw, then offsets.
    for m in [
        in_epoch("s.a", "e", 1),
        in_epoch("s.a", "e", 2),
        raw_of("s.a"),
        raw_of("s.r"),
        raw_of("s.b"),
        in_epoch("s.b", "e", 4),
    ] {
        reg.deliver(m);
    }
    // The replay reached s.d 5, and s.d dropped a raw message.
    reg.deliver(raw_of("s.d"));
    let sent = HashMap::from([("s.d".into(), at_in("e", 5))]);
    reg.activate_wildcard(&sub, None, sent);
    let mut got = frames_of(&q);
    got.sort_by_key(|v| v["topic"].to_string());
    assert_eq!(
        got,
        [
            gap_of("s.a", "e", 2),
            gap_of("s.b", "e", 4),
            gap_of("s.d", "e", 5),
            gap_of("s.r", "0", 0),
        ]
    );
}
