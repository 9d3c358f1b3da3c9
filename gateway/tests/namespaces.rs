//! `[[namespaces]]`: options chosen by topic pattern (client publishing, message size, wildcards,
//! history, slow-consumer policy) and metrics by namespace; and the `conflate` policy, where a
//! subscriber that reads slowly gets the latest message per topic (or per key) instead of a queue
//! that overflows.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{HttpClient, RawWs, Server, TempFile, WsClient};
use serde_json::{Value, json};

const API_KEY: &str = "backend-key-0123456789abcdef";

/// A node with the namespaces of a price ticker and a chat, anonymous clients allowed.
async fn node(extra: &str) -> (Server, TempFile) {
    let config = TempFile::new(
        "namespaces.toml",
        &format!(
            r#"
[limits]
send_queue_frames = 64
send_queue_bytes = 1048576

[auth]
api_keys = ["{API_KEY}"]
anonymous = true
anonymous_subscribe = [">"]
anonymous_publish = [">"]

[[namespaces]]
name = "prices"
pattern = "prices.>"
history_size = 2
client_publish = false
wildcards = false
slow_consumer = "conflate"

[[namespaces]]
name = "fx"
pattern = "fx.*"
slow_consumer = "conflate"
conflate_key = "symbol"

[[namespaces]]
name = "chat"
pattern = "chat.*"
max_message_size = 64
{extra}
"#
        ),
    );
    let server = Server::builder()
        .arg("--config")
        .arg(config.arg())
        .start()
        .await;
    (server, config)
}

/// Publishes with the API key; returns the reply's status and JSON.
async fn publish(http: &mut HttpClient, topic: &str, data: &Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let r = http
        .request(
            "POST",
            &format!("/v1/publish/{topic}"),
            &[("authorization", &auth)],
            data.to_string(),
        )
        .await;
    (r.status, r.json())
}

/// Publishes a batch with the API key; asserts it was taken.
async fn publish_batch(http: &mut HttpClient, messages: Vec<Value>) {
    let auth = format!("Bearer {API_KEY}");
    let r = http
        .request(
            "POST",
            "/v1/publish",
            &[("authorization", &auth)],
            json!({ "messages": messages }).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_options_apply_by_pattern() {
    let (server, _config) = node("").await;
    let mut ws = WsClient::connect(server.addr).await;
    let mut http = HttpClient::connect(server.addr).await;
    let ask = async |ws: &mut WsClient, v: Value| ws.request(&v).await;

    // client_publish = false: clients are refused, a backend is not.
    let r = ask(
        &mut ws,
        json!({"op":"publish","topic":"prices.eur","data":1,"id":1}),
    )
    .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(r["message"].as_str().unwrap().contains("prices"), "{r}");
    for i in 1..=3 {
        let (status, body) = publish(&mut http, "prices.eur", &json!(i)).await;
        assert_eq!(status, 200, "{body}");
    }
    // ... and the namespace's history keeps 2 messages, the default 100.
    let r = http.get("/v1/history/prices.eur").await;
    let offsets: Vec<u64> = r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3], "{}", r.body);

    // max_message_size = 64 in chat.*, the node's 64 KiB elsewhere.
    let big = json!("x".repeat(100));
    let r = ask(
        &mut ws,
        json!({"op":"publish","topic":"chat.r1","data":big,"id":2}),
    )
    .await;
    assert_eq!(r["code"], "message_too_large", "{r}");
    let (status, _) = publish(&mut http, "chat.r1", &big).await;
    assert_eq!(status, 413);
    let r = ask(
        &mut ws,
        json!({"op":"publish","topic":"chat.r1","data":"hi","id":3}),
    )
    .await;
    assert_eq!(r["op"], "ack", "{r}");
    let r = ask(
        &mut ws,
        json!({"op":"publish","topic":"news.x","data":big,"id":4}),
    )
    .await;
    assert_eq!(r["op"], "ack", "{r}");

    // wildcards = false: no wildcard may reach into prices, by name is fine.
    for (i, refused) in ["prices.*", "prices.>", ">", "*.eur"].iter().enumerate() {
        let r = ask(
            &mut ws,
            json!({"op":"subscribe","topic":refused,"id":10 + i}),
        )
        .await;
        assert_eq!(r["code"], "forbidden", "{refused}: {r}");
    }
    for (i, allowed) in ["prices.eur", "chat.*", "news.>"].iter().enumerate() {
        let r = ask(
            &mut ws,
            json!({"op":"subscribe","topic":allowed,"id":20 + i}),
        )
        .await;
        assert_eq!(r["op"], "ack", "{allowed}: {r}");
    }

    // Metrics are by namespace, never by topic.
    let m = server.metrics().await;
    assert_eq!(
        m.value("pubgate_namespace_messages_published_total{namespace=\"prices\"}"),
        3.0
    );
    assert_eq!(
        m.value("pubgate_namespace_messages_published_total{namespace=\"chat\"}"),
        1.0
    );
    assert_eq!(
        m.value("pubgate_namespace_messages_published_total{namespace=\"default\"}"),
        1.0
    );
}

/// Reads `message` frames until `quiet` passes without one, as `(topic, offset, data)`.
async fn read_messages(ws: &mut RawWs, quiet: Duration) -> Vec<(String, u64, Value)> {
    let mut got = Vec::new();
    loop {
        let frame = match ws.read_frame(quiet).await {
            Ok(f) => f,
            Err(_) => return got,
        };
        let Ok(v) = serde_json::from_slice::<Value>(&frame.payload) else {
            continue;
        };
        if v["op"] == "message" {
            got.push((
                v["topic"].as_str().unwrap().to_string(),
                v["offset"].as_u64().unwrap(),
                v["data"].clone(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_conflating_subscriber_ends_on_the_latest_values_while_a_queueing_one_is_cut_off() {
    const TOPICS: u64 = 10;
    const ROUNDS: u64 = 300;
    let (server, _config) = node("").await;

    // Both read nothing while the burst is published: tiny receive windows, so the node's queues
    // fill after a few frames.
    let mut conflating = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    for t in 0..TOPICS {
        let ack = conflating.subscribe(&format!("prices.t{t}"), t + 1).await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let mut queueing = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    let ack = queueing.subscribe("news.t0", 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");

    let rss_before = server.rss_kib();
    let mut http = HttpClient::connect(server.addr).await;
    // 40 KB each: the queueing subscriber's 12 MB are far more than kernel buffers take (the
    // server's send buffer grows to 4 MB on loopback).
    let pad = "p".repeat(40_000);
    for round in 1..=ROUNDS {
        let mut batch: Vec<Value> = (0..TOPICS)
            .map(|t| json!({"topic": format!("prices.t{t}"), "data": {"round": round, "pad": pad}}))
            .collect();
        batch.push(json!({"topic": "news.t0", "data": {"round": round, "pad": pad}}));
        publish_batch(&mut http, batch).await;
    }
    let rss_growth_kib = server.rss_kib().saturating_sub(rss_before);

    // The queueing subscriber (the default policy, disconnect) was cut off.
    queueing.expect_close(1008, Duration::from_secs(10)).await;

    // The conflating one reads now: per topic, offsets only grow, and each ends on the latest.
    let got = read_messages(&mut conflating, Duration::from_secs(2)).await;
    let mut per_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (topic, offset, data) in &got {
        assert_eq!(
            data["round"].as_u64(),
            Some(*offset),
            "{topic}: data of its offset"
        );
        per_topic.entry(topic.clone()).or_default().push(*offset);
    }
    assert_eq!(per_topic.len() as u64, TOPICS, "every topic arrived");
    for (topic, offsets) in &per_topic {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{topic}: offsets must only grow: {offsets:?}"
        );
        assert_eq!(offsets.last(), Some(&ROUNDS), "{topic} ends on the latest");
    }
    let delivered = got.len() as u64;
    assert!(
        delivered < TOPICS * ROUNDS / 2,
        "conflation skipped intermediate values: {delivered} of {} delivered",
        TOPICS * ROUNDS
    );
    let m = server.metrics().await;
    let conflated = m.value("pubgate_namespace_messages_conflated_total{namespace=\"prices\"}");
    assert!(conflated > 0.0, "conflations are counted");
    assert_eq!(m.value("pubgate_slow_consumer_disconnects_total"), 1.0);
    // 3,000 messages of 40 KB to the conflating subscriber: what the node holds for it is bounded
    // by one frame per topic plus its queue (64 frames, 1 MiB), not by the burst.
    assert!(
        rss_growth_kib < 16 * 1024,
        "node RSS grew {rss_growth_kib} KiB during the burst"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflation_by_key_keeps_the_latest_message_of_each_key_of_a_topic() {
    const SYMBOLS: u64 = 5;
    const ROUNDS: u64 = 200;
    let (server, _config) = node("").await;
    let mut slow = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    let ack = slow.subscribe("fx.majors", 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut http = HttpClient::connect(server.addr).await;
    // 20 KB each, so kernel buffers take a small part of the 20 MB.
    let pad = "p".repeat(20_000);
    for round in 1..=ROUNDS {
        let batch = (0..SYMBOLS)
            .map(|s| {
                json!({"topic": "fx.majors", "data": {"symbol": format!("S{s}"), "round": round, "pad": pad}})
            })
            .collect();
        publish_batch(&mut http, batch).await;
    }
    let got = read_messages(&mut slow, Duration::from_secs(2)).await;
    let offsets: Vec<u64> = got.iter().map(|m| m.1).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets only grow: {offsets:?}"
    );
    let mut last_round: BTreeMap<String, u64> = BTreeMap::new();
    for (_, _, data) in &got {
        let symbol = data["symbol"].as_str().unwrap().to_string();
        let round = data["round"].as_u64().unwrap();
        let before = last_round.insert(symbol.clone(), round);
        assert!(
            before.is_none_or(|b| b < round),
            "{symbol}: rounds only grow"
        );
    }
    assert_eq!(last_round.len() as u64, SYMBOLS, "{last_round:?}");
    assert!(
        last_round.values().all(|r| *r == ROUNDS),
        "each symbol ends on its latest: {last_round:?}"
    );
    assert!(
        (got.len() as u64) < SYMBOLS * ROUNDS / 2,
        "{} delivered",
        got.len()
    );
    assert_eq!(
        server
            .metrics()
            .await
            .value("pubgate_slow_consumer_disconnects_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflating_subscriber_that_keeps_sending_requests_is_not_cut_off() {
    // 40 keys with a queue of 64 frames: the replies to its pings must not use up the room its keys
    // need (they used to move the waiting frames into the queue, where every key took a second
    // place, until the queue overflowed).
    const TOPICS: u64 = 40;
    const ROUNDS: u64 = 100;
    let (server, _config) = node("").await;
    let mut slow = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    for t in 0..TOPICS {
        let ack = slow.subscribe(&format!("prices.k{t}"), t + 1).await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let mut http = HttpClient::connect(server.addr).await;
    let pad = "p".repeat(20_000);
    for round in 1..=ROUNDS {
        let batch = (0..TOPICS)
            .map(|t| json!({"topic": format!("prices.k{t}"), "data": {"round": round, "pad": pad}}))
            .collect();
        publish_batch(&mut http, batch).await;
        if round % 5 == 0 {
            slow.send_text(&json!({"op": "ping", "id": 1000 + round}).to_string())
                .await;
        }
    }
    let got = read_messages(&mut slow, Duration::from_secs(2)).await;
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, offset, _) in &got {
        let before = last.insert(topic.clone(), *offset);
        assert!(
            before.is_none_or(|b| b < *offset),
            "{topic}: offsets only grow"
        );
    }
    assert_eq!(last.len() as u64, TOPICS);
    assert!(last.values().all(|o| *o == ROUNDS), "{last:?}");
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_slow_consumer_disconnects_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_reading_conflating_subscriber_is_not_served_from_a_deep_kernel_buffer() {
    // A dashboard that reads, only slower than the ticks come. What its socket has not sent yet
    // is stale by the time it is read; the node keeps that part small (TCP_NOTSENT_LOWAT) so that
    // ticks wait in its queue, where conflation replaces them. Measured as what the reader still
    // gets after the last tick was published until it holds every topic's final value.
    const TOPICS: u64 = 10;
    const ROUNDS: u64 = 1500;
    const PAD: usize = 1000;
    let (server, _config) = node("").await;
    let mut slow = RawWs::connect(server.addr).await;
    for t in 0..TOPICS {
        let ack = slow.subscribe(&format!("prices.s{t}"), t + 1).await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let addr = server.addr;
    let publisher = tokio::spawn(async move {
        let mut http = HttpClient::connect(addr).await;
        let pad = "p".repeat(PAD);
        for round in 1..=ROUNDS {
            let batch = (0..TOPICS)
                .map(|t| json!({"topic": format!("prices.s{t}"), "data": {"round": round, "pad": pad}}))
                .collect();
            publish_batch(&mut http, batch).await;
        }
    });

    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let read = |frame: &[u8], last: &mut BTreeMap<String, u64>| {
        let v: Value = serde_json::from_slice(frame).expect("JSON frame");
        if v["op"] != "message" {
            return;
        }
        let (topic, offset) = (v["topic"].as_str().unwrap(), v["offset"].as_u64().unwrap());
        assert_eq!(
            v["data"]["round"].as_u64(),
            Some(offset),
            "{topic}: data of its offset"
        );
        let before = last.insert(topic.to_string(), offset);
        assert!(
            before.is_none_or(|b| b < offset),
            "{topic}: offsets only grow"
        );
    };
    // About 1 MB/s: far below what the publisher sends, far above nothing.
    let mut frames_while_publishing = 0u64;
    while !publisher.is_finished() {
        let frame = slow
            .read_frame(Duration::from_secs(10))
            .await
            .expect("a frame");
        read(&frame.payload, &mut last);
        frames_while_publishing += 1;
        if frames_while_publishing.is_multiple_of(4) {
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    }
    publisher.await.expect("publisher");
    let mut stale = 0u64;
    while last.len() as u64 != TOPICS || last.values().any(|o| *o != ROUNDS) {
        let frame = slow
            .read_frame(Duration::from_secs(10))
            .await
            .expect("a frame");
        read(&frame.payload, &mut last);
        stale += 1;
    }
    // Bound: the unsent limit (32 KiB) plus the socket buffers of one loopback connection that
    // were in flight, the queue's one frame per topic, in frames of ~1.1 KB. Without the limit
    // the node's send buffer grows to megabytes for such a reader: thousands of stale frames.
    eprintln!("read while publishing: {frames_while_publishing}, after the last tick: {stale}");
    assert!(
        stale < 400,
        "{stale} frames arrived after the last tick before the final values"
    );
    let m = server.metrics().await;
    assert!(m.value("pubgate_namespace_messages_conflated_total{namespace=\"prices\"}") > 0.0);
    assert_eq!(m.value("pubgate_slow_consumer_disconnects_total"), 0.0);
}
