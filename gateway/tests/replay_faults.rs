//! A resume's replay under faults, on the memory broker and on Redis:
//!
//! - a client that resets its connection, or stops reading, in the middle of a long replay leaves
//!   nothing behind: no subscription or topic counted, no slow consumer counted for later
//!   messages, no broker subscription once the topic cooled down;
//! - twenty clients that resume a topic of 1,000 × 20 KB messages and never read cost the node a
//!   page and a send queue each, not their replays (20 × 20 MB); a client that does read then gets
//!   exactly offsets 1..=1000, then live messages.
//!
//! Needs `redis-server` on PATH.

mod common;
mod redis_support;

use std::time::Duration;

use common::proc_status_kib;
use redis_support::faults::*;
use redis_support::history::{WAIT, memory_node, redis_node, resume};
use redis_support::{Node, Redis, eventually};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Nothing left behind
// ---------------------------------------------------------------------------------------------

/// How the client quits in the middle of its replay.
#[derive(Clone, Copy, Debug)]
enum Quit {
    /// Resets the TCP connection (SO_LINGER 0, then close: an RST).
    Reset,
    /// Stops reading; the node's write stall limit (`server.idle_timeout`) closes it.
    StopReading,
}

/// 3,000 × 4 KB missed: far more than the client's send queue (4 MiB) and the kernel's socket
/// buffers (4 MiB here) take, so the replay is still waiting for the client when it quits.
const MISSED: u64 = 3000;
const SIZE: usize = 4096;

fn phantom_env() -> Vec<(&'static str, String)> {
    vec![
        ("PUBGATE__HISTORY__SIZE", "5000".into()),
        ("PUBGATE__BROKER__UNSUBSCRIBE_DELAY", "300ms".into()),
        ("PUBGATE__SERVER__PING_INTERVAL", "1s".into()),
        ("PUBGATE__SERVER__IDLE_TIMEOUT", "5s".into()),
    ]
}

async fn nothing_left_behind(node: &Node, redis: Option<&Redis>, topic: &str, quit: Quit) {
    let mut ws = node.ws().await;
    let epoch = ws.subscribe(topic).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    ws.close().await;
    publish_range(node, topic, 1..=MISSED, SIZE).await;

    let mut client = Some(stuck_resumer(node.addr, topic, &epoch, 0).await);
    let replayed = wait_steady(node, "pubgate_messages_replayed_total").await;
    assert!(
        (1.0..MISSED as f64).contains(&replayed),
        "the replay waits for the client mid-way: {replayed} replayed"
    );
    assert_eq!(metric(node, "pubgate_subscriptions").await, 1.0);
    match quit {
        Quit::Reset => {
            if let Some(c) = client.take() {
                c.reset();
            }
        }
        // Kept open (and unread) until the end: the node closes it.
        Quit::StopReading => {}
    }
    wait_metric(node, "pubgate_connections", |v| v == 0.0).await;
    wait_metric(node, "pubgate_subscriptions", |v| v == 0.0).await;
    assert_eq!(metric(node, "pubgate_topics").await, 0.0, "{quit:?}");

    // Later messages find no phantom subscriber: none is counted as a slow consumer.
    let slow = "pubgate_slow_consumer_disconnects_total";
    assert_eq!(metric(node, slow).await, 0.0);
    let mut witness = node.ws().await;
    assert_eq!(witness.subscribe(topic).await["offset"], json!(MISSED));
    publish_range(node, topic, MISSED + 1..=MISSED + 50, SIZE).await;
    for i in MISSED + 1..=MISSED + 50 {
        let m = witness.next_message(WAIT).await.expect("live message");
        assert_eq!(
            (m["offset"].as_u64(), m["data"]["i"].as_u64()),
            (Some(i), Some(i))
        );
    }
    assert_eq!(metric(node, slow).await, 0.0, "{quit:?}");
    witness.close().await;
    wait_metric(node, "pubgate_subscriptions", |v| v == 0.0).await;
    assert_eq!(metric(node, "pubgate_topics").await, 0.0);

    // After the cool-down the node drops the broker subscription as well.
    wait_metric(node, "pubgate_broker_topics", |v| v == 0.0).await;
    if let Some(redis) = redis {
        let channel = format!("pubgate:{topic}");
        assert!(
            eventually(Duration::from_secs(5), async || numsub(redis, &channel)
                == 0)
            .await,
            "{channel} is still subscribed in Redis"
        );
    }
    println!("{quit:?} after {replayed} of {MISSED} replayed: nothing left behind");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_replay_leaves_nothing_behind_on_memory() {
    let node = memory_node(&phantom_env()).await;
    nothing_left_behind(&node, None, "phantom.mem.reset", Quit::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_mid_replay_leaves_nothing_behind_on_memory() {
    let node = memory_node(&phantom_env()).await;
    nothing_left_behind(&node, None, "phantom.mem.stop", Quit::StopReading).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_replay_leaves_nothing_behind_on_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis, &phantom_env()).await;
    nothing_left_behind(&node, Some(&redis), "phantom.redis.reset", Quit::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_mid_replay_leaves_nothing_behind_on_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis, &phantom_env()).await;
    nothing_left_behind(&node, Some(&redis), "phantom.redis.stop", Quit::StopReading).await;
}

// ---------------------------------------------------------------------------------------------
// Replays are paged
// ---------------------------------------------------------------------------------------------

const PAGED_MESSAGES: u64 = 1000;
const PAGED_SIZE: usize = 20_000;
const STUCK_CLIENTS: usize = 20;
/// Send queue of each client: 1 MiB.
const QUEUE_BYTES: usize = 1 << 20;
/// What the stuck clients may grow the node's RSS by. Each holds at most its send queue (the
/// replay waits once it is half full, then adds a page: 0.5 MiB + 256 KiB) and one page read from
/// the broker (256 KiB): 1 MiB each, 20 MiB for 20, doubled for the allocator's slack. Replays read
/// whole would hold 20 × 20 MB = 400 MB on Redis.
const MAX_RSS_GROWTH_KIB: u64 = 40 * 1024;

fn paged_env() -> Vec<(&'static str, String)> {
    vec![
        ("PUBGATE__HISTORY__SIZE", PAGED_MESSAGES.to_string()),
        ("PUBGATE__LIMITS__SEND_QUEUE_BYTES", QUEUE_BYTES.to_string()),
    ]
}

async fn stuck_resumers_cost_a_page_and_a_queue(node: &Node, topic: &str) {
    let mut ws = node.ws().await;
    let epoch = ws.subscribe(topic).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    ws.close().await;
    publish_range(node, topic, 1..=PAGED_MESSAGES, PAGED_SIZE).await;
    let pid = node.pid().expect("running");
    let kib = |field| proc_status_kib(pid, field).expect("/proc status");
    let (rss_before, peak_before) = (kib("VmRSS"), kib("VmHWM"));

    let mut stuck = Vec::new();
    for _ in 0..STUCK_CLIENTS {
        stuck.push(stuck_resumer(node.addr, topic, &epoch, 0).await);
    }
    let replayed = wait_steady(node, "pubgate_messages_replayed_total").await;
    let (rss, peak) = (kib("VmRSS"), kib("VmHWM"));
    println!(
        "{topic}: {STUCK_CLIENTS} stuck resumers, {replayed} messages queued for them; RSS \
         {rss_before} -> {rss} KiB (+{} KiB), peak {peak_before} -> {peak} KiB",
        rss.saturating_sub(rss_before)
    );
    assert!(
        replayed < (STUCK_CLIENTS as u64 * PAGED_MESSAGES) as f64 / 2.0,
        "the stuck clients were not sent their whole replays: {replayed}"
    );
    assert!(
        rss.saturating_sub(rss_before) < MAX_RSS_GROWTH_KIB,
        "RSS grew from {rss_before} to {rss} KiB"
    );
    assert!(
        peak.saturating_sub(rss_before) < MAX_RSS_GROWTH_KIB,
        "peak RSS grew from {rss_before} to {peak} KiB"
    );

    // A client that reads gets every message, in order, then live ones.
    let mut reader = node.ws().await;
    let ack = resume(&mut reader, topic, &epoch, 0).await;
    assert_eq!(
        (&ack["recovered"], &ack["offset"]),
        (&json!(true), &json!(0))
    );
    for i in 1..=PAGED_MESSAGES {
        let m = reader.next_message(WAIT).await.expect("replayed message");
        assert_eq!(m["offset"], json!(i), "{}", m["offset"]);
        let want: Value = serde_json::from_str(&payload(i, PAGED_SIZE)).expect("JSON");
        assert_eq!(m["data"], want, "data of offset {i}");
    }
    publish_range(node, topic, PAGED_MESSAGES + 1..=PAGED_MESSAGES + 1, 100).await;
    let m = reader.next_message(WAIT).await.expect("live message");
    assert_eq!(
        (m["offset"].as_u64(), m["data"]["i"].as_u64()),
        (Some(PAGED_MESSAGES + 1), Some(PAGED_MESSAGES + 1))
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_resumers_hold_a_page_and_a_queue_each_not_their_replay_on_memory() {
    let node = memory_node(&paged_env()).await;
    stuck_resumers_cost_a_page_and_a_queue(&node, "paged.mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_resumers_hold_a_page_and_a_queue_each_not_their_replay_on_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis, &paged_env()).await;
    stuck_resumers_cost_a_page_and_a_queue(&node, "paged.redis").await;
}
