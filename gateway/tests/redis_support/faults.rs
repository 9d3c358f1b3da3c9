//! Helpers of the fault tests (`replay_faults.rs`, `gaps.rs`, `churn.rs`): payloads of a given
//! size, publishing ranges of them in batches, metrics that must reach an exact value, and clients
//! that resume and then stop reading.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Node, Redis, eventually, http};
use crate::common::RawWs;

/// A JSON object `{"i":i,"pad":"ppp…"}` of exactly `size` bytes (at least 32).
pub fn payload(i: u64, size: usize) -> String {
    let head = format!(r#"{{"i":{i},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "p".repeat(pad))
}

/// Publishes `payload(i, size)` for every `i` in `range` through `POST /v1/publish` batches under
/// the default batch limit, asserting each got offset `i`.
pub async fn publish_range(node: &Node, topic: &str, range: RangeInclusive<u64>, size: usize) {
    let per_batch = (900_000 / (size + 64)).max(1) as u64;
    let mut i = *range.start();
    while i <= *range.end() {
        let last = (i + per_batch - 1).min(*range.end());
        let messages: Vec<Value> = (i..=last)
            .map(|n| {
                let data: Value = serde_json::from_str(&payload(n, size)).expect("JSON");
                json!({"topic": topic, "data": data})
            })
            .collect();
        let body = json!({ "messages": messages }).to_string();
        let (status, reply) = http(node.addr, "POST", "/v1/publish", &body).await;
        assert_eq!(status, 200, "batch {i}..={last}: {reply}");
        let reply: Value = serde_json::from_str(&reply).expect("batch reply");
        let offsets: Vec<u64> = reply["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| r["offset"].as_u64().expect("offset"))
            .collect();
        assert_eq!(offsets, (i..=last).collect::<Vec<_>>(), "batch offsets");
        i = last + 1;
    }
}

/// One metric series of a node (absent: 0).
pub async fn metric(node: &Node, series: &str) -> f64 {
    node.metric(series).await.unwrap_or(0.0)
}

/// Waits until `series` satisfies `ok`; panics with its last value and the node's log.
pub async fn wait_metric(node: &Node, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let mut last = 0.0;
    let met = eventually(Duration::from_secs(20), async || {
        last = metric(node, series).await;
        ok(last)
    })
    .await;
    if !met {
        panic!(
            "{series} stayed at {last}; node log (tail):\n{}",
            tail(&node.log(), 40)
        );
    }
    last
}

/// Waits until `series` stops changing for 300 ms (a replay stuck on a client that does not read)
/// and returns its value.
pub async fn wait_steady(node: &Node, series: &str) -> f64 {
    let mut last = f64::NAN;
    let steady = eventually(Duration::from_secs(20), async || {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = metric(node, series).await;
        let same = now == last;
        last = now;
        same
    })
    .await;
    assert!(steady, "{series} kept changing (last {last})");
    last
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A client with a 4 KiB receive buffer that resumes `topic` from `(epoch, offset)`, reads its ack
/// (asserting `recovered:true`) and then reads nothing more unless the test does.
pub async fn stuck_resumer(addr: SocketAddr, topic: &str, epoch: &str, offset: u64) -> RawWs {
    let mut ws = RawWs::connect_small_rcvbuf(addr, 4096).await;
    let resume =
        json!({"op":"subscribe","topic":topic,"id":"r","since":{"epoch":epoch,"offset":offset}});
    ws.send_text(&resume.to_string()).await;
    let ack = ws.recv_json(Duration::from_secs(10)).await;
    assert_eq!(
        (&ack["op"], &ack["recovered"]),
        (&json!("ack"), &json!(true)),
        "{ack}"
    );
    ws
}

/// `PUBSUB NUMSUB` of one channel: how many connections (nodes) subscribe it.
pub fn numsub(redis: &Redis, channel: &str) -> u64 {
    let out = redis.cli(&["PUBSUB", "NUMSUB", channel]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected NUMSUB output {out:?}"))
}

/// `calls` of one command in Redis's `INFO commandstats` (0 when it never ran).
pub fn command_calls(redis: &Redis, command: &str) -> u64 {
    let out = redis.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
