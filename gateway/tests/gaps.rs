//! Gap frames: what a subscriber is told when messages it should have had are gone for good.
//!
//! - Redis loses a topic (`FLUSHALL`) under a live subscriber: the next message starts a new
//!   epoch, and the subscriber gets `{"op":"gap",…}` for that epoch right before it.
//! - History is trimmed under a resume's replay (the client reads slowly while the topic moves
//!   on): the client gets the replay as far as history held it, then a gap frame, then live
//!   messages, on the memory broker and on Redis.
//!
//! Needs `redis-server` on PATH.

mod common;
mod redis_support;

use std::time::Duration;

use common::{RawWs, op};
use redis_support::faults::*;
use redis_support::history::{WAIT, expect_silence, memory_node, publish, redis_node};
use redis_support::{Node, Redis};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscriber_is_told_of_a_new_epoch_with_a_gap_frame() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "gap.flush";
    let mut ws = node.ws().await;
    let ack = ws.subscribe(topic).await;
    assert_eq!(ack["offset"], json!(0));
    for i in 1..=5 {
        assert_eq!(publish(&node, topic, &json!({"n": i}).to_string()).await, i);
    }
    for i in 1..=5u64 {
        let m = ws.next_message(WAIT).await.expect("message");
        assert_eq!(m["offset"], json!(i));
    }
    // Redis loses everything: the topic's next message starts a new epoch at offset 1.
    redis.cli(&["FLUSHALL"]);
    let (status, body) = node.publish(topic, r#"{"after":"flush"}"#).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("publish reply");
    assert_eq!(reply["offset"], json!(1));
    assert_ne!(reply["epoch"], ack["epoch"], "a new epoch");
    let gap = ws.recv(WAIT).await.expect("gap frame");
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":reply["epoch"],"offset":0}),
        "offsets 1.. of the new epoch follow; whatever came before may be lost"
    );
    let m = ws
        .next_message(WAIT)
        .await
        .expect("message of the new epoch");
    assert_eq!(
        (&m["offset"], &m["data"]),
        (&json!(1), &json!({"after":"flush"}))
    );
    expect_silence(&mut ws, "after the new epoch's first message").await;
    assert_eq!(metric(&node, "pubgate_gaps_signalled_total").await, 1.0);
}

/// 500 × 20 KB in history: more than the reader's send queue (1 MiB) and the kernel's socket
/// buffers (4 MiB) take, so the replay waits for it mid-way.
const KEPT: u64 = 500;
const SIZE: usize = 20_000;

/// A client resumes from 0 and does not read; meanwhile 600 more messages push everything it has
/// not been sent out of history (500 kept). When it reads, it gets a contiguous run from 1, then a
/// gap frame at the topic's latest offset, then live messages.
async fn trimmed_under_a_replay(node: &Node, topic: &str) {
    let mut ws = node.ws().await;
    let epoch = ws.subscribe(topic).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    ws.close().await;
    publish_range(node, topic, 1..=KEPT, SIZE).await;
    let mut client = stuck_resumer(node.addr, topic, &epoch, 0).await;
    let replayed = wait_steady(node, "pubgate_messages_replayed_total").await;
    assert!(
        (1.0..KEPT as f64).contains(&replayed),
        "the replay waits mid-way: {replayed}"
    );
    let latest = KEPT + 600;
    publish_range(node, topic, KEPT + 1..=latest, SIZE).await;

    let mut last = 0;
    // The ack of the empty topic named the empty epoch ("0"), message 1 names the real one.
    let mut real_epoch = epoch.clone();
    let gap = loop {
        let v = next_json(&mut client).await;
        match v["op"].as_str() {
            Some("message") => {
                let offset = v["offset"].as_u64().expect("offset");
                if let Some(e) = v["epoch"].as_str() {
                    real_epoch = e.to_string();
                }
                assert_eq!(offset, last + 1, "contiguous until the gap");
                let want: Value = serde_json::from_str(&payload(offset, SIZE)).expect("JSON");
                assert_eq!(v["data"], want, "data of offset {offset}");
                last = offset;
            }
            Some("gap") => break v,
            _ => panic!("unexpected frame {v}"),
        }
    };
    assert!(
        last >= replayed as u64 && last < KEPT,
        "the replay went on as far as history held it: {last}"
    );
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":real_epoch,"offset":latest})
    );
    assert_eq!(publish(node, topic, r#"{"live":true}"#).await, latest + 1);
    let live = next_json(&mut client).await;
    assert_eq!(
        (&live["op"], &live["offset"], &live["data"]),
        (&json!("message"), &json!(latest + 1), &json!({"live":true}))
    );
    assert_eq!(metric(node, "pubgate_gaps_signalled_total").await, 1.0);
    println!("{topic}: replayed 1..={last}, then a gap frame at {latest}, then live");
}

/// The next text frame of a raw client, as JSON (pings skipped).
async fn next_json(ws: &mut RawWs) -> Value {
    loop {
        let f = ws
            .read_frame(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("no frame: {e:?}"));
        match f.opcode {
            op::TEXT => return serde_json::from_slice(&f.payload).expect("JSON"),
            op::PING | op::PONG => continue,
            other => panic!("unexpected opcode {other}"),
        }
    }
}

fn trim_env() -> Vec<(&'static str, String)> {
    vec![
        ("PUBGATE__HISTORY__SIZE", KEPT.to_string()),
        (
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (1u32 << 20).to_string(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_under_a_replay_ends_it_with_a_gap_frame_on_memory() {
    let node = memory_node(&trim_env()).await;
    trimmed_under_a_replay(&node, "gap.trim.mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_under_a_replay_ends_it_with_a_gap_frame_on_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis, &trim_env()).await;
    trimmed_under_a_replay(&node, "gap.trim.redis").await;
}
