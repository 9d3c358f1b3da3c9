//! Nodes on a 3-master Redis Cluster started by the test: sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`)
//! with hash-tagged names, global offsets per topic, raw `SPUBLISH` interop, subscription counting.
//! Wildcards on a cluster are in `redis_cluster_wildcards.rs`.
//!
//! Needs `redis-server` (7.0 or newer) on PATH.

mod common;
mod redis_support;

use std::time::Duration;

use redis_support::{Cluster, Collector, Node, eventually};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_cluster_deliver_every_message_once_in_order() {
    let cluster = Cluster::start(3);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Node::redis("redis-cluster", &cluster.url(), &[]).await);
    }
    for node in &nodes {
        node.wait_ready(READY).await;
    }
    // Wildcards work on a cluster too (tests/redis_cluster_wildcards.rs); the connection that
    // had one stays usable for names.
    let mut wild = nodes[0].ws().await;
    assert_eq!(wild.subscribe("c.*").await["op"], "ack");
    assert_eq!(wild.unsubscribe("c.*").await["op"], "ack");
    assert_eq!(wild.subscribe("c.alpha").await["op"], "ack");
    assert_eq!(wild.unsubscribe("c.alpha").await["op"], "ack");
    // Several topics, so that they land on different masters.
    let topics = ["c.alpha", "c.beta", "c.gamma", "c.delta"];
    let mut clients = Vec::new();
    for node in &nodes {
        for topic in topics {
            let mut ws = node.ws().await;
            let ack = ws.subscribe(topic).await;
            assert_eq!(ack["op"], "ack", "{ack}");
            clients.push((topic, ws));
        }
    }
    for topic in topics {
        assert_eq!(
            cluster.shard_numsub(&format!("pubgate:{{{topic}}}")),
            3,
            "one sharded subscription per node for {topic}"
        );
    }

    let per_topic = 12;
    let mut expected: Vec<Vec<(Value, Value)>> = vec![Vec::new(); topics.len()];
    let (names, wss): (Vec<&str>, Vec<_>) = clients.into_iter().unzip();
    let collector = Collector::start(wss, per_topic, Duration::from_secs(20));
    for i in 0..per_topic {
        for (t, topic) in topics.iter().enumerate() {
            let data = json!({"i": i, "topic": topic});
            if i % 4 == 3 {
                // Raw publishers on a cluster use SPUBLISH on the hash-tagged channel.
                cluster.cli(&[
                    "SPUBLISH",
                    &format!("pubgate:{{{topic}}}"),
                    &data.to_string(),
                ]);
                expected[t].push((Value::Null, data));
            } else {
                let node = &nodes[(i + t) % nodes.len()];
                let (status, body) = node.publish(topic, &data.to_string()).await;
                assert_eq!(status, 200, "{body}");
                let offset = expected[t].iter().filter(|(o, _)| !o.is_null()).count() + 1;
                let reply: Value = serde_json::from_str(&body).expect("reply");
                assert_eq!(reply["offset"], json!(offset), "global offsets per topic");
                expected[t].push((json!(offset), data));
            }
        }
    }
    let (wss, got) = collector.finish().await;
    for (k, messages) in got.iter().enumerate() {
        let t = topics.iter().position(|x| *x == names[k]).expect("topic");
        let seen: Vec<(Value, Value)> = messages
            .iter()
            .map(|m| (m["offset"].clone(), m["data"].clone()))
            .collect();
        assert_eq!(seen, expected[t], "subscriber {k} of {}", names[k]);
    }

    // History lives in the cluster too: a resume on another node replays.
    let mut resumer = nodes[2].ws().await;
    let ack = resumer.subscribe("c.alpha").await;
    let epoch = ack["epoch"].clone();
    let mut again = nodes[1].ws().await;
    again
        .send(json!({"op":"subscribe","topic":"c.alpha","id":9,"since":{"epoch":epoch,"offset":3}}))
        .await;
    let ack = again.recv(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    let first = again
        .next_message(Duration::from_secs(5))
        .await
        .expect("replay");
    assert_eq!(first["offset"], json!(4));

    // When every client leaves, no node keeps a sharded subscription.
    for ws in wss {
        ws.close().await;
    }
    resumer.close().await;
    again.close().await;
    for topic in topics {
        let channel = format!("pubgate:{{{topic}}}");
        assert!(
            eventually(Duration::from_secs(5), async || cluster
                .shard_numsub(&channel)
                == 0)
            .await,
            "{channel} still subscribed"
        );
    }
    for node in &nodes {
        assert!(node.is_ready().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sharded_subscriptions_are_restored_on_every_master() {
    let cluster = Cluster::start(3);
    let node = Node::redis("redis-cluster", &cluster.url(), &[]).await;
    let publisher = Node::redis("redis-cluster", &cluster.url(), &[]).await;
    node.wait_ready(READY).await;
    publisher.wait_ready(READY).await;
    let topics = ["k.alpha", "k.beta", "k.gamma", "k.delta", "k.epsilon"];
    let mut clients = Vec::new();
    for topic in topics {
        let mut ws = node.ws().await;
        assert_eq!(ws.subscribe(topic).await["op"], "ack");
        clients.push(ws);
    }
    // Kill the node's sharded-subscription connections on every master at once.
    for master in &cluster.nodes {
        master.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    assert!(
        eventually(READY, async || {
            node.metric("pubgate_broker_reconnects_total").await >= Some(1.0)
                && node.is_ready().await
        })
        .await,
        "node did not restore its subscriptions:\n{}",
        node.log()
    );
    for topic in topics {
        let channel = format!("pubgate:{{{topic}}}");
        // The kills reach the masters one after the other: the node may be ready between two
        // reconnects, so wait for every subscription rather than check once.
        assert!(
            eventually(READY, async || cluster.shard_numsub(&channel) == 1).await,
            "{channel} not subscribed again"
        );
        let (status, body) = publisher.publish(topic, r#"{"after":"kill"}"#).await;
        assert_eq!(status, 200, "{body}");
    }
    for (ws, topic) in clients.iter_mut().zip(topics) {
        let m = ws
            .next_message(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{topic} not delivered after the kill"));
        assert_eq!(m["data"], json!({"after":"kill"}));
    }
}
