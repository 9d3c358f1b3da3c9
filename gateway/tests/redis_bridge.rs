//! Several pubgate nodes on one real Redis act as one: delivery, offsets, resilience, readiness.
//!
//! Needs `redis-server` and `haproxy` on PATH (Debian: `apt-get install redis-server haproxy`).

mod common;
mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{Collector, Node, Redis, eventually};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(15);

/// Starts `n` nodes on `redis` and waits until all are ready.
async fn nodes(redis: &Redis, n: usize) -> Vec<Node> {
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(Node::redis("redis", &redis.url(), &[]).await);
    }
    for node in &nodes {
        node.wait_ready(READY).await;
    }
    nodes
}

/// `(offset or null, data)` of every message, for comparing what subscribers saw.
fn seen(messages: &[Value]) -> Vec<(Value, Value)> {
    messages
        .iter()
        .map(|m| (m["offset"].clone(), m["data"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_order_with_the_same_offsets() {
    let redis = Redis::start();
    let nodes = nodes(&redis, 3).await;
    let topic = "scores.nba";

    let mut clients = Vec::new();
    let mut ack_offsets = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let mut ws = node.ws().await;
            let ack = ws.subscribe(topic).await;
            assert_eq!(ack["op"], "ack", "{ack}");
            ack_offsets.push(ack["offset"].clone());
            clients.push(ws);
        }
    }
    assert!(
        ack_offsets.iter().all(|o| *o == json!(0)),
        "{ack_offsets:?}"
    );

    // Interleave gateway publishes (through node 1's HTTP API) and raw PUBLISHes into Redis.
    let total = 60;
    let collector = Collector::start(clients, total, Duration::from_secs(20));
    let mut expected = Vec::new();
    let mut next_offset = 1u64;
    for i in 0..total {
        match i % 3 {
            0 | 1 => {
                let data = json!({"n": i, "via": "http"});
                let (status, body) = nodes[0].publish(topic, &data.to_string()).await;
                assert_eq!(status, 200, "{body}");
                let reply: Value = serde_json::from_str(&body).expect("json reply");
                assert_eq!(reply["offset"], json!(next_offset), "{body}");
                expected.push((json!(next_offset), data));
                next_offset += 1;
            }
            _ => {
                if i % 2 == 0 {
                    let data = json!({"n": i, "via": "raw"});
                    redis.cli(&["PUBLISH", &format!("pubgate:{topic}"), &data.to_string()]);
                    expected.push((Value::Null, data));
                } else {
                    // Not JSON: delivered as a JSON string.
                    let text = format!("plain text {i}");
                    redis.cli(&["PUBLISH", &format!("pubgate:{topic}"), &text]);
                    expected.push((Value::Null, Value::String(text)));
                }
            }
        }
    }
    let (clients, got) = collector.finish().await;
    for (i, messages) in got.iter().enumerate() {
        assert_eq!(
            seen(messages),
            expected,
            "subscriber {i} saw something else"
        );
        assert!(messages.iter().all(|m| m["topic"] == topic));
    }

    // A late subscriber on node 3 is acked at the global offset; a resume from offset 10 replays
    // history (shared by all nodes) and continues from there.
    let mut late = nodes[2].ws().await;
    let ack = late.subscribe(topic).await;
    assert_eq!(ack["offset"], json!(next_offset - 1), "{ack}");
    let epoch = ack["epoch"].as_str().expect("epoch").to_string();
    let mut resumer = nodes[1].ws().await;
    resumer
        .send(json!({"op":"subscribe","topic":topic,"id":7,"since":{"epoch":epoch,"offset":10}}))
        .await;
    let ack = resumer.recv(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    for offset in 11..next_offset {
        let m = resumer
            .next_message(Duration::from_secs(5))
            .await
            .expect("replayed message");
        assert_eq!(m["offset"], json!(offset));
    }
    let mut stale = nodes[0].ws().await;
    stale
        .send(json!({"op":"subscribe","topic":topic,"id":8,"since":{"epoch":"nope","offset":1}}))
        .await;
    let ack = stale.recv(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(ack["recovered"], json!(false), "{ack}");
    assert_eq!(ack["epoch"], json!(epoch), "{ack}");

    // A WebSocket publish on node 2 reaches everyone, the late subscriber included.
    let mut publisher = nodes[1].ws().await;
    let reply = publisher.publish(topic, json!({"via":"ws"})).await;
    assert_eq!(reply["offset"], json!(next_offset), "{reply}");
    let m = late
        .next_message(Duration::from_secs(5))
        .await
        .expect("ws publish");
    assert_eq!(m["data"], json!({"via":"ws"}));
    for mut ws in clients {
        let m = ws
            .next_message(Duration::from_secs(5))
            .await
            .expect("ws publish");
        assert_eq!(m["offset"], json!(next_offset));
    }
}

/// Cross-node latency through Redis: publish over HTTP on node 1, receive over WebSocket on node 2.
/// The send time is taken just before the HTTP request, the receive time on a separate reader task
/// when the frame arrives. Prints p50/p99 (run with `--nocapture` to see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_latency_through_redis() {
    let redis = Redis::start();
    let nodes = nodes(&redis, 2).await;
    let topic = "latency.probe";
    let mut ws = nodes[1].ws().await;
    assert_eq!(ws.subscribe(topic).await["op"], "ack");
    let n = 1000;
    let reader = tokio::spawn(async move {
        let mut received = Vec::with_capacity(n);
        while received.len() < n {
            let Some(m) = ws.next_message(Duration::from_secs(10)).await else {
                break;
            };
            let at = Instant::now();
            received.push((m["data"]["i"].as_u64().unwrap_or(u64::MAX) as usize, at));
        }
        received
    });
    let mut sent = Vec::with_capacity(n);
    for i in 0..n {
        sent.push(Instant::now());
        let (status, _) = nodes[0].publish(topic, &json!({"i": i}).to_string()).await;
        assert_eq!(status, 200);
        // Pace the publishes a little so this measures latency, not queueing.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let received = reader.await.expect("reader");
    assert_eq!(received.len(), n, "every message arrives");
    let mut samples: Vec<Duration> = received
        .iter()
        .enumerate()
        .map(|(k, (i, at))| {
            assert_eq!(*i, k, "in order");
            at.duration_since(sent[*i])
        })
        .collect();
    samples.sort();
    let p = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)];
    println!(
        "cross-node latency over {n} messages (HTTP publish on node 1 -> Redis -> WebSocket on node 2): p50 {:?}, p99 {:?}, max {:?}",
        p(0.50),
        p(0.99),
        samples[n - 1]
    );
    assert!(p(0.50) < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_the_broker_path() {
    let redis = Redis::start();
    let nodes = nodes(&redis, 1).await;
    let node = &nodes[0];
    assert_eq!(node.metric("pubgate_broker_up").await, Some(1.0));
    assert!(
        eventually(Duration::from_secs(5), async || {
            node.metric("pubgate_broker_roundtrip_seconds_count")
                .await
                .is_some_and(|n| n >= 2.0)
        })
        .await,
        "canaries are measured"
    );
    assert_eq!(
        node.metric("pubgate_broker_reconnects_total").await,
        Some(0.0)
    );
}

/// `PUBSUB NUMSUB` of one channel: how many connections (nodes) subscribe it.
fn numsub(redis: &Redis, channel: &str) -> u64 {
    let out = redis.cli(&["PUBSUB", "NUMSUB", channel]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected NUMSUB output {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_one_redis_subscription_per_watched_topic_and_drops_it_when_the_last_client_leaves()
 {
    let redis = Redis::start();
    let nodes = nodes(&redis, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let channel = "pubgate:count.demo";

    let mut a1 = a.ws().await;
    let mut a2 = a.ws().await;
    let mut b1 = b.ws().await;
    for ws in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(ws.subscribe("count.demo").await["op"], "ack");
    }
    assert_eq!(
        numsub(&redis, channel),
        2,
        "one subscription per node, not per client"
    );
    let channels = redis.cli(&["PUBSUB", "CHANNELS", "pubgate:count.*"]);
    assert_eq!(channels.trim(), channel);

    // One of A's clients unsubscribes, the other just disconnects.
    assert_eq!(a1.unsubscribe("count.demo").await["op"], "ack");
    assert_eq!(numsub(&redis, channel), 2, "A still has a subscriber");
    a2.close().await;
    assert!(
        eventually(Duration::from_secs(5), async || numsub(&redis, channel)
            == 1)
        .await,
        "A drops its subscription when its last client leaves"
    );
    b1.close().await;
    assert!(
        eventually(Duration::from_secs(5), async || numsub(&redis, channel)
            == 0)
        .await,
        "no node holds a subscription nobody wants"
    );
    let channels = redis.cli(&["PUBSUB", "CHANNELS", "pubgate:*"]);
    assert!(
        channels.lines().all(|c| c.starts_with("pubgate:#canary.")),
        "only the canary channels are left: {channels:?}"
    );
    // And it comes back when someone subscribes again.
    let mut again = b.ws().await;
    assert_eq!(again.subscribe("count.demo").await["op"], "ack");
    assert_eq!(numsub(&redis, channel), 1);
}

async fn resume(node: &Node, topic: &str, epoch: &Value, offset: u64) -> Value {
    let mut ws = node.ws().await;
    ws.send(json!({"op":"subscribe","topic":topic,"id":1,"since":{"epoch":epoch,"offset":offset}}))
        .await;
    ws.recv(Duration::from_secs(5)).await.expect("ack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_by_age_and_a_flush_starts_a_new_epoch() {
    let redis = Redis::start();
    let node = Node::redis(
        "redis",
        &redis.url(),
        &[("PUBGATE__HISTORY__TTL", "1s".to_string())],
    )
    .await;
    node.wait_ready(READY).await;
    let topic = "history.age";
    let mut live = node.ws().await;
    live.subscribe(topic).await;
    let mut epoch = Value::Null;
    for i in 1..=3 {
        let (status, body) = node.publish(topic, &json!({"i": i}).to_string()).await;
        assert_eq!(status, 200, "{body}");
        epoch = serde_json::from_str::<Value>(&body).expect("reply")["epoch"].clone();
    }
    assert_eq!(
        resume(&node, topic, &epoch, 1).await["recovered"],
        json!(true)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(node.publish(topic, r#"{"i":4}"#).await.0, 200);
    // Offsets 2 and 3 are older than history.ttl: trimmed, so resuming before them fails ...
    assert_eq!(
        redis
            .cli(&["XLEN", &format!("pubgate:{topic}:history")])
            .trim(),
        "1"
    );
    let ack = resume(&node, topic, &epoch, 2).await;
    assert_eq!(ack["recovered"], json!(false), "{ack}");
    assert_eq!(ack["offset"], json!(4), "{ack}");
    // ... while resuming from offset 3 needs only the fresh message 4.
    assert_eq!(
        resume(&node, topic, &epoch, 3).await["recovered"],
        json!(true)
    );

    // FLUSHALL: the next publish starts a new epoch at offset 1, and the live subscriber gets it.
    redis.cli(&["FLUSHALL"]);
    let (status, body) = node.publish(topic, r#"{"after":"flush"}"#).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("reply");
    assert_eq!(reply["offset"], json!(1));
    assert_ne!(reply["epoch"], epoch);
    let mut got = Vec::new();
    while let Some(m) = live.next_message(Duration::from_secs(5)).await {
        got.push(m["offset"].clone());
        if m["data"] == json!({"after":"flush"}) {
            break;
        }
    }
    assert_eq!(got, vec![json!(1), json!(2), json!(3), json!(4), json!(1)]);
    let ack = resume(&node, topic, &epoch, 4).await;
    assert_eq!(ack["recovered"], json!(false), "old epoch: {ack}");
}

/// A raw `PUBLISH` is bounded by nobody but the node: one over `limits.max_message_size` would fill
/// (or overflow) every subscriber's send queue. Each node drops it, counts it once, and delivers
/// the messages around it; its subscribers stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_message_over_the_size_limit_is_dropped_by_every_node_and_nothing_else_is() {
    const MAX: usize = 65536; // limits.max_message_size, the default
    let redis = Redis::start();
    let nodes = nodes(&redis, 2).await;
    let topic = "big.raw";
    let mut clients = Vec::new();
    for node in &nodes {
        let mut ws = node.ws().await;
        assert_eq!(ws.subscribe(topic).await["op"], "ack");
        clients.push(ws);
    }
    let channel = format!("pubgate:{topic}");
    let largest = redis_support::faults::payload(1, MAX);
    let too_large = redis_support::faults::payload(2, MAX + 1);
    assert_eq!((largest.len(), too_large.len()), (MAX, MAX + 1));
    for data in [largest.as_str(), too_large.as_str(), r#"{"small":true}"#] {
        redis.cli(&["PUBLISH", &channel, data]);
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let first = ws.next_message(Duration::from_secs(10)).await;
        let first = first.unwrap_or_else(|| panic!("client {i}: nothing arrived"));
        assert_eq!(
            first["data"]["i"],
            json!(1),
            "the largest allowed one arrives"
        );
        assert_eq!(first["data"]["pad"].as_str().map(str::len), Some(MAX - 16));
        let next = ws.next_message(Duration::from_secs(10)).await;
        assert_eq!(
            next.map(|m| m["data"].clone()),
            Some(json!({"small":true})),
            "client {i}: the one after the dropped message"
        );
        assert!(ws.next_message(Duration::from_millis(300)).await.is_none());
    }
    let dropped = "pubgate_broker_messages_dropped_total{reason=\"too_large\"}";
    for node in &nodes {
        assert_eq!(node.metric(dropped).await, Some(1.0));
        assert_eq!(node.metric("pubgate_connections").await, Some(1.0));
        assert_eq!(
            node.metric("pubgate_slow_consumer_disconnects_total").await,
            Some(0.0)
        );
    }
    assert!(
        nodes[0]
            .log()
            .contains("larger than limits.max_message_size")
    );
}
