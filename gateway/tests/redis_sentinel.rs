//! Nodes find the Redis master through Sentinel, and find the new one after a failover.
//!
//! Needs `redis-server` on PATH (it runs the sentinel too, with `--sentinel`).

mod common;
mod redis_support;

use std::time::{Duration, Instant};

use redis_support::{Node, SentinelSet, Ws, cli_output, eventually};
use serde_json::json;

const READY: Duration = Duration::from_secs(20);

async fn subscribed(node: &Node, topic: &str) -> Ws {
    let mut ws = node.ws().await;
    let ack = ws.subscribe(topic).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_a_sentinel_failover_and_deliver_again() {
    let set = SentinelSet::start();
    let a = Node::redis("redis", &set.url(), &[]).await;
    let b = Node::redis("redis", &set.url(), &[]).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    let topic = "sentinel.demo";
    let mut on_a = subscribed(&a, topic).await;
    let mut on_b = subscribed(&b, topic).await;
    for i in 1..=2 {
        let (status, body) = a.publish(topic, &json!({"before": i}).to_string()).await;
        assert_eq!(status, 200, "{body}");
    }
    for ws in [&mut on_a, &mut on_b] {
        for offset in 1..=2 {
            let m = ws
                .next_message(Duration::from_secs(5))
                .await
                .expect("before");
            assert_eq!(m["offset"], json!(offset));
        }
    }
    assert_eq!(set.master_port(), Some(set.master.port));
    // Let the replica catch up with the offset key before promoting it.
    assert!(
        eventually(Duration::from_secs(5), async || {
            cli_output(
                set.replica.port,
                None,
                &["GET", &format!("pubgate:{topic}:offset")],
            )
            .is_some_and(|o| o.trim() == "2")
        })
        .await
    );

    let started = Instant::now();
    assert_eq!(
        set.sentinel(&["SENTINEL", "FAILOVER", "mymaster"]).trim(),
        "OK"
    );
    assert!(
        eventually(Duration::from_secs(30), async || set.master_port()
            == Some(set.replica.port))
        .await,
        "sentinel did not promote the replica"
    );
    // The nodes hear Sentinel's +switch-master, drop their connections and reconnect to the new
    // master by themselves (the old one may go on accepting writes for seconds before Sentinel
    // demotes it, so waiting for a READONLY error would be too late).
    for node in [&a, &b] {
        assert!(
            eventually(READY, async || {
                node.metric("pubgate_broker_reconnects_total").await >= Some(1.0)
                    && node.is_ready().await
            })
            .await,
            "node did not follow the failover:\n{}",
            node.log()
        );
    }
    let followed = started.elapsed();
    // A publish during the switch may be refused (503), never silently lost.
    let mut published = None;
    let deadline = Instant::now() + READY;
    while published.is_none() && Instant::now() < deadline {
        let (status, body) = a.publish(topic, r#"{"after":"failover"}"#).await;
        match status {
            200 => published = Some(body),
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let body = published.expect("publishing works again after the failover");
    // The promoted replica is another Redis run: it may lack the old master's last writes
    // (replication is asynchronous), so the topic starts a new epoch rather than risk handing
    // out an offset twice. Subscribers are told (a gap frame), then get the new stream.
    let reply: serde_json::Value = serde_json::from_str(&body).expect("reply");
    assert_eq!(
        reply["offset"],
        json!(1),
        "a new epoch on the new master: {body}"
    );
    let new_epoch = reply["epoch"].clone();
    for ws in [&mut on_a, &mut on_b] {
        let mut frames = Vec::new();
        loop {
            let v = ws
                .recv(Duration::from_secs(10))
                .await
                .expect("after failover");
            let done = v["op"] == "message";
            frames.push(v);
            if done {
                break;
            }
        }
        let m = frames.pop().expect("the message");
        assert_eq!(m["data"], json!({"after":"failover"}));
        assert_eq!((&m["offset"], &m["epoch"]), (&json!(1), &new_epoch), "{m}");
        assert_eq!(frames.len(), 1, "one gap frame before it: {frames:?}");
        assert_eq!(frames[0]["op"], "gap", "{frames:?}");
        assert_eq!(frames[0]["topic"], topic, "{frames:?}");
    }
    // Both nodes now hold their subscription on the new master.
    let numsub = set
        .replica
        .cli(&["PUBSUB", "NUMSUB", &format!("pubgate:{topic}")]);
    assert_eq!(numsub.lines().nth(1).map(str::trim), Some("2"), "{numsub}");
    let old = set
        .master
        .cli(&["PUBSUB", "NUMSUB", &format!("pubgate:{topic}")]);
    assert_eq!(old.lines().nth(1).map(str::trim), Some("0"), "{old}");
    println!("nodes followed the failover {followed:?} after SENTINEL FAILOVER");
}
