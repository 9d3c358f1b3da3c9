//! The registry with real send queues: what each subscriber gets queued.

use std::sync::Arc;
use std::time::Duration;

use broker_bridge::{Epoch, Lost, Message, MessageSink, Offset, Position};
use bytes::Bytes;
use serde_json::{Value, json};

use super::delivery::{Cursor, Step};
use super::{Activation, Registry, RegistryLimits};
use crate::config::SlowConsumerPolicy;
use crate::metrics::Metrics;
use crate::namespace::Namespaces;
use crate::protocol;
use crate::send_queue::SendQueue;

const TOPIC: &str = "t.a";

fn at(epoch: &str, offset: Offset) -> Position {
    Position {
        epoch: Epoch::new(epoch),
        offset,
    }
}

pub(super) fn registry(max_held: usize) -> Arc<Registry> {
    let metrics = Arc::new(Metrics::new());
    let namespaces = Arc::new(Namespaces::new(&[], 100, &metrics));
    Arc::new(Registry::new(
        metrics,
        RegistryLimits {
            max_held_frames: max_held,
            max_held_bytes: 1 << 20,
            max_json_depth: 3,
            unsubscribe_delay: Duration::ZERO,
            compression: None,
        },
        namespaces,
    ))
}

pub(super) fn queue() -> Arc<SendQueue> {
    Arc::new(SendQueue::new(
        1000,
        1 << 20,
        SlowConsumerPolicy::Disconnect,
    ))
}

fn message(epoch: &str, offset: Offset) -> Message {
    Message {
        topic: TOPIC.into(),
        position: Some(at(epoch, offset)),
        data: Bytes::from(format!("{{\"n\":{offset}}}")),
    }
}

/// The JSON of one queued (unmasked, short) text frame.
pub(super) fn json_of(frame: &Bytes) -> Value {
    let start = if frame[1] == 126 { 4 } else { 2 };
    serde_json::from_slice(&frame[start..]).expect("a JSON text frame")
}

/// Everything queued so far, as JSON.
fn taken(q: &SendQueue) -> Vec<Value> {
    q.take().frames.iter().map(json_of).collect()
}

fn msg(offset: Offset) -> Value {
    json!({"op":"message","topic":TOPIC,"offset":offset,"data":{"n":offset}})
}

/// The first message of an epoch, which names it.
fn first(epoch: &str) -> Value {
    json!({"op":"message","topic":TOPIC,"epoch":epoch,"offset":1,"data":{"n":1}})
}

fn gap(epoch: &str, offset: Offset) -> Value {
    json!({"op":"gap","topic":TOPIC,"epoch":epoch,"offset":offset})
}

#[test]
fn cursor_skips_old_offsets_and_flags_a_new_epoch_as_a_gap() {
    let mut c = Cursor::at(&at("e1", 41));
    assert_eq!(c.step(Some(&at("e1", 41))), Step::Skip, "acknowledged");
    assert_eq!(c.step(Some(&at("e1", 42))), Step::Deliver);
    assert_eq!(c.step(Some(&at("e1", 42))), Step::Skip, "duplicate");
    assert_eq!(c.step(None), Step::Deliver, "raw messages always pass");
    // The broker lost the topic (flush, rollback): offsets restart under a new epoch.
    assert_eq!(c.step(Some(&at("e2", 5))), Step::GapThenDeliver);
    assert_eq!(c.step(Some(&at("e2", 6))), Step::Deliver);
    assert_eq!(c.step(Some(&at("e2", 1))), Step::Skip);
    // Nothing can have been lost: at offset 0, the new epoch's first message.
    let mut c = Cursor::at(&at("e1", 0));
    assert_eq!(c.step(Some(&at("e2", 1))), Step::Deliver);
    assert!(!c.gap(&at("e2", 1), false), "acknowledged there");
    assert!(c.gap(&at("e2", 7), true));
    assert_eq!(c.step(Some(&at("e2", 7))), Step::Skip);
    // Live at the gap's position: raw messages after its last one were lost; it is told.
    assert!(c.gap(&at("e2", 7), true));
    assert!(!c.gap(&at("e2", 6), true), "past it");
}

#[test]
fn held_messages_follow_the_ack_without_gap_or_duplicate() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    for o in 40..=43 {
        reg.deliver(message("e1", o));
    }
    assert!(taken(&q).is_empty(), "pending: held back");
    reg.queue_frame(&q, protocol::ack(None, TOPIC, &at("e1", 41), None));
    assert_eq!(reg.try_activate(&sub, &at("e1", 41)), Activation::Live);
    reg.deliver(message("e1", 44));
    let got = taken(&q);
    assert_eq!(got[0]["op"], "ack");
    assert_eq!(got[1..], [msg(42), msg(43), msg(44)]);
}

#[test]
fn a_live_subscriber_gets_a_gap_frame_before_a_message_of_another_epoch() {
    let reg = registry(100);
    let (qa, qb) = (queue(), queue());
    let a = reg.join(TOPIC, 1, qa.clone());
    let b = reg.join(TOPIC, 2, qb.clone());
    assert_eq!(reg.try_activate(&a, &at("e1", 10)), Activation::Live);
    assert_eq!(reg.try_activate(&b, &at("e1", 10)), Activation::Live);
    reg.deliver(message("e1", 11));
    // Redis was rolled back: e2 starts, and this node sees its offset 3 first.
    reg.deliver(message("e2", 3));
    reg.deliver(message("e2", 4));
    let (fa, fb) = (qa.take().frames, qb.take().frames);
    let got: Vec<Value> = fa.iter().map(json_of).collect();
    assert_eq!(got, [msg(11), gap("e2", 2), msg(3), msg(4)]);
    assert_eq!(fb.iter().map(json_of).collect::<Vec<_>>(), got);
    assert_eq!(
        fa[1].as_ptr(),
        fb[1].as_ptr(),
        "one gap frame encoded for both subscribers"
    );
    assert_eq!(reg.metrics.gaps_signalled.get(), 2);
}

#[test]
fn no_gap_frame_when_a_subscriber_at_offset_zero_sees_a_new_epoch_begin() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    assert_eq!(reg.try_activate(&sub, &at("e1", 0)), Activation::Live);
    reg.deliver(message("e2", 1));
    assert_eq!(taken(&q), [first("e2")], "message 1 names its epoch");
    assert_eq!(reg.metrics.gaps_signalled.get(), 0);
}

#[test]
fn a_broker_gap_reaches_live_subscribers_once_and_moves_their_cursor() {
    let reg = registry(100);
    let (behind, ahead, there) = (queue(), queue(), queue());
    let b = reg.join(TOPIC, 1, behind.clone());
    let a = reg.join(TOPIC, 2, ahead.clone());
    let t = reg.join(TOPIC, 3, there.clone());
    assert_eq!(reg.try_activate(&b, &at("e1", 5)), Activation::Live);
    // Subscribed after the hole: it missed nothing.
    assert_eq!(reg.try_activate(&a, &at("e1", 30)), Activation::Live);
    // Acknowledged right at its end: it missed nothing either.
    assert_eq!(reg.try_activate(&t, &at("e1", 20)), Activation::Live);
    reg.gap(TOPIC, &at("e1", 20), Lost::Offsets);
    // A straggler from before the hole is not delivered after the gap frame.
    reg.deliver(message("e1", 19));
    reg.deliver(message("e1", 31));
    assert_eq!(taken(&behind), [gap("e1", 20), msg(31)]);
    assert_eq!(taken(&ahead), [msg(31)]);
    assert_eq!(taken(&there), [msg(31)]);
    assert_eq!(reg.metrics.gaps_signalled.get(), 1);
}

#[test]
fn a_lost_raw_message_is_news_even_to_a_live_subscriber_at_the_gaps_position() {
    let reg = registry(100);
    let (live, pending) = (queue(), queue());
    let l = reg.join(TOPIC, 1, live.clone());
    assert_eq!(reg.try_activate(&l, &at("e1", 20)), Activation::Live);
    let p = reg.join(TOPIC, 2, pending.clone());
    // Raw messages after offset 20 were lost: the live subscriber at 20 missed them; the pending
    // one, acknowledged at 20 afterwards, had not subscribed yet.
    reg.gap(TOPIC, &at("e1", 20), Lost::Raw);
    assert_eq!(reg.try_activate(&p, &at("e1", 20)), Activation::Live);
    reg.deliver(message("e1", 21));
    assert_eq!(taken(&live), [gap("e1", 20), msg(21)]);
    assert_eq!(taken(&pending), [msg(21)]);
}

#[test]
fn a_pending_subscriber_gets_the_broker_gap_in_order_with_its_held_messages() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    reg.deliver(message("e1", 6));
    reg.gap(TOPIC, &at("e1", 9), Lost::Offsets);
    reg.deliver(message("e1", 10));
    assert_eq!(reg.try_activate(&sub, &at("e1", 5)), Activation::Live);
    assert_eq!(taken(&q), [msg(6), gap("e1", 9), msg(10)]);
    // Acknowledged past the hole already: no gap frame.
    let q2 = queue();
    let sub2 = reg.join(TOPIC, 2, q2.clone());
    reg.gap(TOPIC, &at("e1", 12), Lost::Offsets);
    reg.deliver(message("e1", 13));
    assert_eq!(reg.try_activate(&sub2, &at("e1", 12)), Activation::Live);
    assert_eq!(taken(&q2), [msg(13)]);
}

#[test]
fn a_held_list_that_overflows_is_dropped_and_read_from_history_instead() {
    let reg = registry(3);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    for o in 1..=5 {
        reg.deliver(message("e1", o));
    }
    // 4 would not fit: everything held is dropped; the newest seen is 5.
    assert_eq!(
        reg.try_activate(&sub, &at("e1", 0)),
        Activation::Behind(at("e1", 5))
    );
    assert!(taken(&q).is_empty(), "nothing queued, not closed");
    assert!(!q.is_closing());
    assert_eq!(reg.metrics.slow_consumer_disconnects.get(), 0);
    // It holds again from then on; once history got it to 5, the held ones follow.
    reg.deliver(message("e1", 6));
    assert_eq!(reg.try_activate(&sub, &at("e1", 5)), Activation::Live);
    assert_eq!(taken(&q), [msg(6)]);
}

#[test]
fn activating_after_a_hole_sends_a_gap_frame_then_what_was_held_after_it() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    for o in [8, 9, 10] {
        reg.deliver(message("e1", o));
    }
    reg.activate_after_gap(&sub, &at("e1", 8));
    reg.deliver(message("e1", 11));
    assert_eq!(taken(&q), [gap("e1", 8), msg(9), msg(10), msg(11)]);
    // With an overflowed held list, the gap reaches past what it dropped.
    let reg = registry(1);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    for o in [8, 9, 10] {
        reg.deliver(message("e1", o));
    }
    reg.activate_after_gap(&sub, &at("e1", 8));
    reg.deliver(message("e1", 11));
    assert_eq!(taken(&q), [gap("e1", 10), msg(11)]);
}

#[test]
fn a_message_larger_than_the_limit_is_dropped_for_everyone() {
    let reg = registry(100);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    assert_eq!(reg.try_activate(&sub, &at("e1", 0)), Activation::Live);
    let big = format!("\"{}\"", "x".repeat(99));
    reg.deliver(Message {
        topic: TOPIC.into(),
        position: None,
        data: Bytes::from(big),
    });
    reg.deliver(message("e1", 1));
    assert_eq!(taken(&q), [first("e1")]);
    let dropped = reg.metrics.broker_dropped.with_label_values(&["too_large"]);
    assert_eq!(dropped.get(), 1);
    // Replays drop them the same way.
    let mut m = message("e1", 2);
    m.data = Bytes::from(vec![b'1'; 101]);
    assert_eq!(reg.queue_replay(&q, &[m, message("e1", 3)]), 1);
    assert_eq!(taken(&q), [msg(3)]);
    assert_eq!(dropped.get(), 2);
    // Nested deeper than max_json_depth (3 here): dropped too, live and in replays.
    let deep = reg.metrics.broker_dropped.with_label_values(&["too_deep"]);
    let mut m = message("e1", 4);
    m.data = Bytes::from_static(b"[[[[1]]]]");
    reg.deliver(m.clone());
    reg.deliver(Message {
        data: Bytes::from_static(b"[[[\"[[[[\"]]]"),
        ..message("e1", 5)
    });
    assert_eq!(
        taken(&q),
        [json!({"op":"message","topic":TOPIC,"offset":5,"data":[[["[[[["]]]})]
    );
    assert_eq!(reg.queue_replay(&q, &[m]), 0);
    assert_eq!(deep.get(), 2);
}

#[test]
fn dropping_the_guard_releases_the_subscriber_and_the_topic() {
    let reg = registry(100);
    let (qa, qb) = (queue(), queue());
    let a = reg.join(TOPIC, 1, qa.clone());
    let b = reg.join(TOPIC, 2, qb.clone());
    assert_eq!(
        (reg.metrics.subscriptions.get(), reg.metrics.topics.get()),
        (2, 1)
    );
    // Pending, mid-subscribe: dropping it is all it takes.
    reg.deliver(message("e1", 1));
    drop(a);
    assert_eq!(
        (reg.metrics.subscriptions.get(), reg.metrics.topics.get()),
        (1, 1)
    );
    assert_eq!(reg.try_activate(&b, &at("e1", 0)), Activation::Live);
    drop(b);
    assert_eq!(
        (reg.metrics.subscriptions.get(), reg.metrics.topics.get()),
        (0, 0)
    );
    assert_eq!(reg.entries(), 0, "no broker to cool down for: forgotten");
    reg.deliver(message("e1", 2));
    assert!(taken(&qa).is_empty() && taken(&qb).len() == 1);
}

/// A raw message of `topic` (published straight into the broker: no offset).
pub(super) fn raw_of(topic: &str) -> Message {
    Message {
        topic: topic.into(),
        position: None,
        data: Bytes::from_static(b"{\"raw\":1}"),
    }
}

fn raw() -> Message {
    raw_of(TOPIC)
}

#[test]
fn raw_messages_an_overflowing_held_list_dropped_end_in_a_gap_frame_at_the_subscribers_place() {
    // Raw messages after the newest offset dropped: history gives the offsets back, not them.
    let reg = registry(2);
    let q = queue();
    let sub = reg.join(TOPIC, 1, q.clone());
    for m in [message("e1", 6), raw(), message("e1", 7), raw()] {
        reg.deliver(m);
    }
    assert_eq!(
        reg.try_activate(&sub, &at("e1", 5)),
        Activation::Behind(at("e1", 7))
    );
    // The caller read history up to 7 and sent it.
    assert_eq!(reg.try_activate(&sub, &at("e1", 7)), Activation::Live);
    reg.deliver(message("e1", 8));
    assert_eq!(taken(&q), [gap("e1", 7), msg(8)]);

    // Only raw messages dropped: nothing to read, but still a gap frame.
    let q = queue();
    let sub = reg.join(TOPIC, 2, q.clone());
    for _ in 0..3 {
        reg.deliver(raw());
    }
    assert_eq!(reg.try_activate(&sub, &at("e1", 8)), Activation::Live);
    assert_eq!(taken(&q), [gap("e1", 8)]);

    // Nothing raw dropped: no gap frame.
    let q = queue();
    let sub = reg.join(TOPIC, 3, q.clone());
    for o in 9..=11 {
        reg.deliver(message("e1", o));
    }
    assert_eq!(
        reg.try_activate(&sub, &at("e1", 8)),
        Activation::Behind(at("e1", 11))
    );
    assert_eq!(reg.try_activate(&sub, &at("e1", 11)), Activation::Live);
    assert!(taken(&q).is_empty());
}
