//! The Redis broker path breaks and heals: Redis restarts, a killed subscription connection, a wedged
//! one (noticed only through the canary), and `CLIENT PAUSE`. Nodes turn not-ready, refuse publishes
//! with 503 instead of dropping them, and recover by themselves.
//!
//! Needs `redis-server` on PATH.

mod common;
mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{Collector, Node, Proxy, Redis, Ws, eventually, node_id};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(15);

async fn subscribed(node: &Node, topic: &str) -> Ws {
    let mut ws = node.ws().await;
    let ack = ws.subscribe(topic).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    ws
}

/// Offsets of what a subscriber received.
fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_makes_nodes_unready_then_they_recover_and_deliver_again() {
    let mut redis = Redis::start();
    let a = Node::redis("redis", &redis.url(), &[]).await;
    let b = Node::redis("redis", &redis.url(), &[]).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    let topic = "restart.demo";
    let mut on_a = subscribed(&a, topic).await;
    let mut on_b = subscribed(&b, topic).await;
    assert_eq!(a.publish(topic, r#"{"before":1}"#).await.0, 200);
    for ws in [&mut on_a, &mut on_b] {
        let m = ws
            .next_message(Duration::from_secs(5))
            .await
            .expect("before");
        assert_eq!(m["offset"], json!(1));
    }

    redis.stop();
    let t0 = Instant::now();
    // Publishes fail loudly, and fast, while Redis is gone.
    let (status, body) = a.publish(topic, r#"{"during":1}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker_unavailable"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let reply = on_b.publish(topic, json!({"during":2})).await;
    assert_eq!(reply["code"], "broker_unavailable", "{reply}");
    for node in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(6), async || !node.is_ready().await).await,
            "node stays ready without Redis"
        );
        assert_eq!(node.metric("pubgate_broker_up").await, Some(0.0));
    }

    redis.restart();
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    for node in [&a, &b] {
        assert!(node.metric("pubgate_broker_reconnects_total").await >= Some(1.0));
        assert_eq!(node.metric("pubgate_broker_up").await, Some(1.0));
    }
    // The restarted Redis is empty: the topic starts a new epoch, and the subscribers that were
    // there all along get its messages (offsets start again at 1).
    let (status, body) = b.publish(topic, r#"{"after":1}"#).await;
    assert_eq!(status, 200, "{body}");
    for ws in [&mut on_a, &mut on_b] {
        let m = ws
            .next_message(Duration::from_secs(5))
            .await
            .expect("after");
        assert_eq!(m["data"], json!({"after":1}));
        assert_eq!(m["offset"], json!(1));
    }
    let ack = subscribed(&a, topic).await.subscribe("other").await;
    assert_eq!(ack["op"], "ack");
}

/// Publishes `n` messages through `node` as fast as it answers.
async fn publish_burst(node: &Node, topic: &str, n: usize) {
    for i in 0..n {
        let (status, body) = node.publish(topic, &json!({"i": i}).to_string()).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_connection_is_replaced_and_the_gap_filled_from_history() {
    let redis = Redis::start();
    let a = Node::redis("redis", &redis.url(), &[]).await;
    let b = Node::redis("redis", &redis.url(), &[]).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    let topic = "kill.demo";
    let on_a = subscribed(&a, topic).await;
    let on_b = subscribed(&b, topic).await;
    let total = 40;
    let collector = Collector::start(vec![on_a, on_b], total, Duration::from_secs(20));

    // Kill only node A's subscription connection, found by its client name, and keep publishing
    // through B meanwhile.
    let name = format!("pubgate-sub-{}", node_id(&a));
    let list = redis.cli(&["CLIENT", "LIST"]);
    let id = list
        .lines()
        .find(|l| l.contains(&format!("name={name} ")))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no {name} in\n{list}"))
        .to_string();
    publish_burst(&b, topic, 10).await;
    assert_eq!(redis.cli(&["CLIENT", "KILL", "ID", &id]).trim(), "1");
    publish_burst(&b, topic, total - 10).await;

    let (_, got) = collector.finish().await;
    let expected: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(
        offsets(&got[0]),
        expected,
        "node A lost or repeated messages"
    );
    assert_eq!(offsets(&got[1]), expected);
    assert!(
        eventually(Duration::from_secs(5), async || {
            a.metric("pubgate_broker_reconnects_total").await == Some(1.0)
        })
        .await
    );
    assert_eq!(b.metric("pubgate_broker_reconnects_total").await, Some(0.0));
    a.wait_ready(READY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_subscription_connection_is_noticed_by_the_canary_and_healed() {
    let redis = Redis::start();
    // Node A reaches Redis through a proxy that can wedge one connection; B goes direct.
    let proxy = Proxy::start(redis.port).await;
    let a = Node::redis("redis", &format!("redis://127.0.0.1:{}", proxy.port), &[]).await;
    let b = Node::redis("redis", &redis.url(), &[]).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    let topic = "wedge.demo";
    let on_a = subscribed(&a, topic).await;
    let total = 30;
    let collector = Collector::start(vec![on_a], total, Duration::from_secs(30));

    publish_burst(&b, topic, 10).await;
    let wedged_at = Instant::now();
    assert_eq!(
        proxy.freeze(&format!("pubgate-sub-{}", node_id(&a))),
        1,
        "exactly A's subscription connection"
    );
    // Messages published now vanish into the wedged connection; Redis still thinks all is well.
    publish_burst(&b, topic, 10).await;
    assert!(
        eventually(Duration::from_secs(8), async || !a.is_ready().await).await,
        "the canary should make A not-ready"
    );
    let noticed = wedged_at.elapsed();
    assert!(
        noticed < Duration::from_secs(6),
        "noticed after {noticed:?}"
    );
    a.wait_ready(READY).await;
    publish_burst(&b, topic, total - 20).await;

    let (_, got) = collector.finish().await;
    assert_eq!(
        offsets(&got[0]),
        (1..=total as u64).collect::<Vec<_>>(),
        "history fills what the wedged connection swallowed"
    );
    assert!(a.metric("pubgate_broker_reconnects_total").await >= Some(1.0));
    println!("wedge noticed after {noticed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pause_makes_nodes_unready_until_redis_answers_again() {
    let redis = Redis::start();
    let a = Node::redis("redis", &redis.url(), &[]).await;
    a.wait_ready(READY).await;
    let topic = "pause.demo";
    let mut on_a = subscribed(&a, topic).await;
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "6000", "ALL"]).trim(), "OK");
    let paused_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(6), async || !a.is_ready().await).await,
        "the canary should make the node not-ready during CLIENT PAUSE"
    );
    let noticed = paused_at.elapsed();
    assert!(
        noticed < Duration::from_secs(6),
        "noticed after {noticed:?}"
    );
    // A publish into the paused Redis fails after broker.command_timeout (1s), not never.
    let asked = Instant::now();
    let (status, body) = a.publish(topic, r#"{"during":"pause"}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        asked.elapsed() < Duration::from_millis(2500),
        "{:?}",
        asked.elapsed()
    );
    a.wait_ready(Duration::from_secs(20)).await;
    assert!(paused_at.elapsed() >= Duration::from_secs(5));
    let (status, body) = a.publish(topic, r#"{"after":"pause"}"#).await;
    assert_eq!(status, 200, "{body}");
    let m = on_a
        .next_message(Duration::from_secs(5))
        .await
        .expect("after pause");
    assert_eq!(m["data"], json!({"after":"pause"}));
}
