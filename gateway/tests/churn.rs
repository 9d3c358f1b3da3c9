//! Subscription churn: a client that subscribes and unsubscribes as fast as it can must neither
//! turn into broker traffic nor disturb anyone else.
//!
//! Two defences, both checked against a real Redis: the per-connection bucket
//! (`limits.subscribe_rate` / `limits.subscribe_burst`) answers `rate_limited` past it, and the
//! node-level cool-down (`broker.unsubscribe_delay`) keeps a topic's broker subscription for a
//! moment after its last subscriber left, so what does get through costs Redis one SUBSCRIBE, not
//! one per round.
//!
//! Needs `redis-server` on PATH.

mod common;
mod redis_support;

use std::time::{Duration, Instant};

use common::{HttpClient, RawWs, masked_frame, op};
use redis_support::eventually;
use redis_support::faults::*;
use redis_support::history::{WAIT, redis_node};
use redis_support::{Frame, Redis};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// Subscribe + unsubscribe pairs the flooder pipelines.
const ROUNDS: usize = 2500;
/// Messages the victim's topic gets meanwhile, one every 10 ms.
const STREAM: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_flood_is_rate_limited_costs_redis_nothing_and_disturbs_nobody() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;

    // The victim, on another topic of the same node, reads everything.
    let mut victim = node.ws().await;
    assert_eq!(victim.subscribe("churn.victim").await["offset"], json!(0));
    let victim_task = tokio::spawn(async move {
        let mut got = Vec::new();
        while (got.len() as u64) < STREAM {
            match victim.next_frame(WAIT).await {
                Frame::Json(m) => got.push(m),
                other => panic!("victim stopped after {} messages: {other:?}", got.len()),
            }
        }
        (victim, got)
    });
    let subscribes_before = command_calls(&redis, "subscribe");
    let unsubscribes_before = command_calls(&redis, "unsubscribe");

    // The flooder writes every frame at once and reads the replies on the side.
    let flooder = RawWs::connect(node.addr).await;
    let (mut replies, mut write) = flooder.into_split();
    let reader = tokio::spawn(async move {
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..2 * ROUNDS {
            let f = loop {
                let f = replies
                    .read_frame(Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|e| panic!("flooder: no reply ({codes:?}): {e:?}"));
                if f.opcode == op::TEXT {
                    break f;
                }
            };
            let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("JSON");
            let key = match v["op"].as_str() {
                Some("error") => v["code"].as_str().unwrap_or("?").to_string(),
                Some(op) => op.to_string(),
                None => panic!("flooder: {v}"),
            };
            *codes.entry(key).or_default() += 1;
        }
        (codes, replies)
    });
    let mut flood = Vec::new();
    for i in 0..ROUNDS {
        for op in ["subscribe", "unsubscribe"] {
            let frame = json!({"op": op, "topic": "churn.flood", "id": i}).to_string();
            flood.extend(masked_frame(true, op::TEXT, frame.as_bytes()));
        }
    }
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        write.write_all(&flood).await.expect("flood written");
        write
    });

    // Meanwhile a steady stream to the victim's topic.
    let mut http = HttpClient::connect(node.addr).await;
    for i in 1..=STREAM {
        let (_, offset) = http
            .publish("churn.victim", json!({"n": i}).to_string())
            .await;
        assert_eq!(offset, i);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (victim, got) = victim_task.await.expect("victim");
    for (i, m) in (1..=STREAM).zip(&got) {
        assert_eq!(m["op"], "message", "{m}");
        assert_eq!((&m["offset"], &m["data"]), (&json!(i), &json!({"n": i})));
    }
    let _write = writer.await.expect("writer");
    let (codes, _replies) = reader.await.expect("flooder's replies");
    let flood_time = started.elapsed();
    println!(
        "flood of {} requests in {flood_time:?}: replies {codes:?}; the victim got {STREAM} of \
         {STREAM} in order",
        2 * ROUNDS
    );
    // Within the burst and the rate everything is answered normally; past it, rate_limited.
    let limited = codes.get("rate_limited").copied().unwrap_or(0);
    let allowed = 2 * ROUNDS - limited;
    let budget = 200 + (50.0 * flood_time.as_secs_f64()).ceil() as usize;
    assert!(limited > 0, "{codes:?}");
    assert!(
        allowed <= budget,
        "{allowed} allowed, over {budget}: {codes:?}"
    );
    assert_eq!(
        metric(&node, "pubgate_client_errors_total{code=\"rate_limited\"}").await,
        limited as f64
    );

    // Redis saw one SUBSCRIBE for the flooded topic (the cool-down kept it between rounds), and no
    // UNSUBSCRIBE while the flood went on.
    let subscribes = command_calls(&redis, "subscribe") - subscribes_before;
    let unsubscribes = command_calls(&redis, "unsubscribe") - unsubscribes_before;
    println!("Redis during the flood: {subscribes} SUBSCRIBE, {unsubscribes} UNSUBSCRIBE");
    assert!(subscribes <= 1, "{subscribes} SUBSCRIBE calls");
    assert!(unsubscribes <= 1, "{unsubscribes} UNSUBSCRIBE calls");
    // Once the flooder is gone, the topic cools down and its subscription goes.
    drop((_write, _replies));
    assert!(
        eventually(Duration::from_secs(10), async || numsub(
            &redis,
            "pubgate:churn.flood"
        ) == 0)
        .await
    );
    assert_eq!(numsub(&redis, "pubgate:churn.victim"), 1);
    assert_eq!(metric(&node, "pubgate_broker_topics").await, 1.0);
    victim.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_keeps_its_broker_subscription_for_the_cool_down_only() {
    let redis = Redis::start();
    let node = redis_node(
        &redis,
        &[("PUBGATE__BROKER__UNSUBSCRIBE_DELAY", "2s".into())],
    )
    .await;
    let channel = "pubgate:cool.down";
    let before = command_calls(&redis, "subscribe");
    let mut ws = node.ws().await;
    assert_eq!(ws.subscribe("cool.down").await["op"], "ack");
    assert_eq!(ws.unsubscribe("cool.down").await["op"], "ack");
    // Gone locally at once, still subscribed in Redis.
    assert_eq!(metric(&node, "pubgate_topics").await, 0.0);
    assert_eq!(metric(&node, "pubgate_broker_topics").await, 1.0);
    assert_eq!(numsub(&redis, channel), 1);
    // Back within the delay: no new SUBSCRIBE.
    assert_eq!(ws.subscribe("cool.down").await["op"], "ack");
    assert_eq!(command_calls(&redis, "subscribe") - before, 1);
    let (status, _) = node.publish("cool.down", r#"{"n":1}"#).await;
    assert_eq!(status, 200);
    let m = ws.next_message(WAIT).await.expect("message");
    assert_eq!(m["offset"], json!(1));
    // Left for longer than the delay: unsubscribed in Redis.
    ws.close().await;
    assert!(
        eventually(Duration::from_secs(10), async || numsub(&redis, channel)
            == 0)
        .await
    );
    assert_eq!(metric(&node, "pubgate_broker_topics").await, 0.0);
    assert_eq!(command_calls(&redis, "unsubscribe"), 1);
}
