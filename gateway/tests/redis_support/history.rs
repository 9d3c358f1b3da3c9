//! Helpers of the tests of resume and history (`recovery.rs`, `history.rs`): nodes on either broker,
//! publishing, resuming with `since`, and `GET /v1/history`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Frame, Node, Redis, Ws, http};

/// How long a node may take to be ready.
pub const READY: Duration = Duration::from_secs(15);
/// How long any one expected frame may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A node on the Redis broker at `redis` (history of 1000 unless `extra` says otherwise), ready.
pub async fn redis_node(redis: &Redis, extra: &[(&str, String)]) -> Node {
    let node = Node::redis("redis", &redis.url(), extra).await;
    node.wait_ready(READY).await;
    node
}

/// A node on the embedded memory broker with a history of 1000 (unless `extra` says otherwise).
pub async fn memory_node(extra: &[(&str, String)]) -> Node {
    let mut env = vec![("PUBGATE__HISTORY__SIZE", "1000".to_string())];
    env.extend(extra.iter().cloned());
    Node::start(&env).await
}

/// Publishes over HTTP, asserting 200; returns the offset.
pub async fn publish(node: &Node, topic: &str, data: &str) -> u64 {
    let (status, body) = node.publish(topic, data).await;
    assert_eq!(status, 200, "publish to {topic}: {body}");
    let v: Value = serde_json::from_str(&body).expect("publish reply");
    v["offset"].as_u64().expect("offset")
}

/// Sends a subscribe with `since` and returns its ack (asserting nothing came before it).
pub async fn resume(ws: &mut Ws, topic: &str, epoch: &str, offset: u64) -> Value {
    ws.send(
        json!({"op":"subscribe","topic":topic,"id":"r","since":{"epoch":epoch,"offset":offset}}),
    )
    .await;
    match ws.next_frame(WAIT).await {
        Frame::Json(v) => {
            assert_eq!(v["op"], "ack", "the ack comes first: {v}");
            assert_eq!(v["id"], "r", "{v}");
            assert_eq!(v["topic"], topic, "{v}");
            v
        }
        other => panic!("no ack to the resume of {topic}: {other:?}"),
    }
}

/// Asserts that no frame arrives for a while.
pub async fn expect_silence(ws: &mut Ws, what: &str) {
    match ws.next_frame(Duration::from_millis(400)).await {
        Frame::Timeout => {}
        other => panic!("{what}: expected nothing, got {other:?}"),
    }
}

/// `GET /v1/history/{topic}{query}`: status and parsed body (`Null` when not JSON), plus the raw
/// body.
pub async fn get_history(node: &Node, topic: &str, query: &str) -> (u16, Value, String) {
    let (status, body) = http(node.addr, "GET", &format!("/v1/history/{topic}{query}"), "").await;
    let v = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, v, body)
}

/// The offsets of a `/v1/history` page's messages.
pub fn page_offsets(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {page}"))
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect()
}
