//! Publish → subscribe delivery on one node: order, offsets, byte-identical `data`, the batch
//! endpoint, the WebSocket `publish` op and `unsubscribe`.

mod common;

use std::time::Duration;

use common::{HttpClient, RECV_TIMEOUT, Server, WsClient, raw_fields};
use serde_json::{Value, json};

/// Valid JSON that any re-serialization would change: keys out of order, odd whitespace, escapes,
/// number spellings, and every kind of top-level value.
fn tricky_data(i: usize) -> String {
    match i % 5 {
        0 => format!(
            "{{ \"z\" : {i},\"a\":[1, 2.50, -0.0, 1e3],\n\t\"s\":\"caf\\u00e9 \\\"q\\\" é\\/\",\"n\":null , \"o\":{{\"b\":true,\"a\":false}} }}"
        ),
        1 => format!("[ {i} ,\"x\",{{}}, [ ] ]"),
        2 => format!("\"plain string {i} with \\n escape\""),
        3 => format!("{i}.000"),
        _ => format!("{{\"i\":{i},\"dup\":1,\"dup\":2}}"),
    }
}

/// Reads one `message` frame and checks topic, offset and that `data` is byte-identical.
async fn expect_message(client: &mut WsClient, who: &str, topic: &str, offset: u64, data: &str) {
    let text = client.recv_text(RECV_TIMEOUT).await;
    let fields = raw_fields(&text);
    let field = |k: &str| fields.get(k).map(|v| v.get().to_string());
    assert_eq!(field("op").as_deref(), Some("\"message\""), "{who}: {text}");
    assert_eq!(
        field("topic"),
        Some(Value::from(topic).to_string()),
        "{who}: {text}"
    );
    assert_eq!(
        field("offset"),
        Some(offset.to_string()),
        "{who}: wrong offset (expected {offset}) in {text}"
    );
    assert_eq!(
        field("data").as_deref(),
        Some(data),
        "{who}: data must pass through byte for byte; frame {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_get_http_publishes_in_order_with_contiguous_offsets() {
    let server = Server::start().await;
    let mut http = HttpClient::connect(server.addr).await;
    let topic = "scores.nba";

    // Publishing before anyone subscribes moves the topic's offset; the ack must report it.
    let (epoch, first) = http.publish(topic, r#"{"warmup":0}"#).await;
    let mut last = first;
    for i in 1..5 {
        let (e, off) = http.publish(topic, format!("{{\"warmup\":{i}}}")).await;
        assert_eq!(e, epoch, "epoch changed between publishes");
        assert_eq!(off, last + 1, "publish offsets must be contiguous");
        last = off;
    }

    let mut a = server.ws().await;
    let mut b = server.ws().await;
    let ack_a = a.subscribe(topic, 1).await;
    let ack_b = b.subscribe(topic, 2).await;
    for ack in [&ack_a, &ack_b] {
        assert_eq!(ack["epoch"], epoch.as_str(), "ack epoch: {ack}");
        assert_eq!(
            ack["offset"], last,
            "the ack carries the offset of the topic's latest message: {ack}"
        );
    }

    const N: usize = 200;
    for i in 0..N {
        let (e, off) = http.publish(topic, tricky_data(i)).await;
        assert_eq!(e, epoch, "epoch changed during the run");
        assert_eq!(
            off,
            last + 1 + i as u64,
            "publish {i} got a non-contiguous offset"
        );
    }
    for i in 0..N {
        let offset = last + 1 + i as u64;
        expect_message(&mut a, "client a", topic, offset, &tricky_data(i)).await;
        expect_message(&mut b, "client b", topic, offset, &tricky_data(i)).await;
    }
    // Nothing beyond the N messages (no duplicates).
    a.ping_pong(99).await;
    b.ping_pong(99).await;
}

#[tokio::test]
async fn batch_publish_reports_per_message_offsets_and_delivers_in_order() {
    let server = Server::start().await;
    let mut a = server.ws().await;
    let mut b = server.ws().await;
    let ack_a = a.subscribe("batch.a", 1).await;
    b.subscribe("batch.a", 1).await;
    let ack_b = b.subscribe("batch.b", 2).await;
    let base_a = ack_a["offset"].as_u64().expect("offset");
    let base_b = ack_b["offset"].as_u64().expect("offset");

    let data = [
        r#"{"k" : 1, "a":[ 1,2 ]}"#,
        r#"[1, "two" ,3.0]"#,
        r#""x\u0041""#,
    ];
    let topics = ["batch.a", "batch.b", "batch.a"];
    // Built by hand so the data keeps its exact bytes.
    let body = format!(
        "{{\"messages\":[{{\"topic\":\"{}\",\"data\":{}}}, {{\"topic\":\"{}\",\"data\":{}}},{{\"topic\":\"{}\",\"data\":{}}}]}}",
        topics[0], data[0], topics[1], data[1], topics[2], data[2]
    );
    let mut http = HttpClient::connect(server.addr).await;
    let r = http.post("/v1/publish", body).await;
    assert_eq!(r.status, 200, "batch publish: {}", r.body);
    let v = r.json();
    let results = v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("batch reply without results: {v}"));
    assert_eq!(results.len(), 3, "one result per message: {v}");
    let expected_offsets = [base_a + 1, base_b + 1, base_a + 2];
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["topic"], topics[i], "results[{i}]: {v}");
        assert_eq!(
            res["offset"], expected_offsets[i],
            "results[{i}] offset: {v}"
        );
        assert!(res["epoch"].is_string(), "results[{i}] epoch: {v}");
    }
    assert_eq!(results[0]["epoch"], ack_a["epoch"], "epoch of batch.a");
    assert_eq!(results[1]["epoch"], ack_b["epoch"], "epoch of batch.b");

    // a sees only batch.a; b sees all three in batch order.
    expect_message(&mut a, "a", "batch.a", base_a + 1, data[0]).await;
    expect_message(&mut a, "a", "batch.a", base_a + 2, data[2]).await;
    for i in 0..3 {
        expect_message(&mut b, "b", topics[i], expected_offsets[i], data[i]).await;
    }

    // A batch with one bad topic is refused whole: nothing in it is published.
    let r = http
        .post(
            "/v1/publish",
            r#"{"messages":[{"topic":"batch.a","data":1},{"topic":"bad topic","data":2}]}"#,
        )
        .await;
    assert_eq!(r.status, 400, "batch with an invalid topic: {}", r.body);
    assert_eq!(r.json()["code"], "invalid_topic", "{}", r.body);
    let r = http.post("/v1/publish", r#"{"messages":[]}"#).await;
    assert_eq!(r.status, 400, "empty batch: {}", r.body);
    assert_eq!(r.json()["code"], "bad_request", "{}", r.body);
    let r = http
        .post("/v1/publish", r#"{"messages":[{"topic":"batch.a"}]}"#)
        .await;
    assert_eq!(r.status, 400, "batch item without data: {}", r.body);
    let (_, off) = http.publish("batch.a", "3").await;
    assert_eq!(off, base_a + 3, "a refused batch must not consume offsets");
    expect_message(&mut a, "a", "batch.a", base_a + 3, "3").await;
}

#[tokio::test]
async fn http_publish_rejects_bad_input_with_codes() {
    let server = Server::builder()
        .env("PUBGATE__LIMITS__MAX_MESSAGE_SIZE", "1024")
        .start()
        .await;
    let mut http = HttpClient::connect(server.addr).await;
    let cases: [(&str, String, u16, &str); 4] = [
        ("/v1/publish/bad%20topic", "1".into(), 400, "invalid_topic"),
        ("/v1/publish/a..b", "1".into(), 400, "invalid_topic"),
        (
            "/v1/publish/ok.topic",
            "{not json".into(),
            400,
            "bad_request",
        ),
        (
            "/v1/publish/ok.topic",
            format!("\"{}\"", "x".repeat(2000)),
            413,
            "message_too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let r = http.post(path, body).await;
        assert_eq!(r.status, status, "POST {path}: {}", r.body);
        assert_eq!(r.json()["code"], code, "POST {path}: {}", r.body);
    }
    let r = http.get("/v1/publish/ok.topic").await;
    assert_eq!(r.status, 405, "GET on a publish route: {}", r.body);
    let r = http.get("/nope").await;
    assert_eq!(r.status, 404, "unknown route: {}", r.body);
}

#[tokio::test]
async fn websocket_publish_op_acks_with_offset_and_delivers() {
    let server = Server::start().await;
    let mut sub = server.ws().await;
    let mut publisher = server.ws().await;
    let ack = sub.subscribe("chat.r1", 1).await;
    let base = ack["offset"].as_u64().expect("offset");

    let data = r#"{"text" : "hi",  "n":[1,2]}"#;
    publisher
        .send_text(&format!(
            r#"{{"op":"publish","topic":"chat.r1","data":{data},"id":"p-1"}}"#
        ))
        .await;
    let reply = publisher.recv().await;
    assert_eq!(reply["op"], "ack", "publish reply: {reply}");
    assert_eq!(reply["id"], "p-1", "publish reply echoes id: {reply}");
    assert_eq!(reply["topic"], "chat.r1", "publish reply: {reply}");
    assert_eq!(reply["epoch"], ack["epoch"], "publish reply epoch: {reply}");
    assert_eq!(reply["offset"], base + 1, "publish reply offset: {reply}");
    expect_message(&mut sub, "subscriber", "chat.r1", base + 1, data).await;
}

#[tokio::test]
async fn unsubscribe_acks_and_stops_delivery() {
    let server = Server::start().await;
    let topic = "chat.room7";
    let mut leaver = server.ws().await;
    let mut control = server.ws().await;
    let base = leaver.subscribe(topic, 1).await["offset"]
        .as_u64()
        .expect("offset");
    control.subscribe(topic, 1).await;
    let mut http = HttpClient::connect(server.addr).await;

    // Both get messages while subscribed.
    for i in 1..=3u64 {
        http.publish(topic, format!("{{\"before\":{i}}}")).await;
    }
    for i in 1..=3u64 {
        let data = format!("{{\"before\":{i}}}");
        expect_message(&mut leaver, "leaver", topic, base + i, &data).await;
        expect_message(&mut control, "control", topic, base + i, &data).await;
    }

    let ack = leaver.unsubscribe(topic, 42).await;
    assert_eq!(
        ack,
        json!({"op":"ack","id":42,"topic":topic}),
        "unsubscribe ack"
    );

    for i in 4..=23u64 {
        http.publish(topic, format!("{{\"after\":{i}}}")).await;
    }
    // The control client still receives everything...
    for i in 4..=23u64 {
        let data = format!("{{\"after\":{i}}}");
        expect_message(&mut control, "control", topic, base + i, &data).await;
    }
    // ...and the one that left gets nothing: no frame within a window, and its pong is the very
    // next message (fan-out is queued before a publish answers, so anything delivered would come
    // first).
    leaver.expect_silence(Duration::from_millis(300)).await;
    leaver.ping_pong(43).await;

    // Unsubscribing again is an error; subscribing again resumes live delivery at the latest offset.
    let err = leaver
        .request(&json!({"op":"unsubscribe","topic":topic,"id":44}))
        .await;
    assert_eq!(err["op"], "error", "{err}");
    assert_eq!(err["code"], "not_subscribed", "{err}");
    assert_eq!(err["id"], 44, "{err}");
    let ack = leaver.subscribe(topic, 45).await;
    assert_eq!(ack["offset"], base + 23, "re-subscribe ack offset: {ack}");
    http.publish(topic, "true").await;
    expect_message(&mut leaver, "leaver", topic, base + 24, "true").await;
    expect_message(&mut control, "control", topic, base + 24, "true").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_mid_stream_get_contiguous_offsets_from_their_ack() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const PER_PUBLISHER: u64 = 300;
    const CLIENTS: u64 = 10;
    let server = Server::start().await;
    let topic = "race.topic";
    let published = Arc::new(AtomicU64::new(0));
    // Two publishers on their own connections, so offsets are assigned concurrently.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let (addr, published) = (server.addr, published.clone());
            tokio::spawn(async move {
                let mut http = HttpClient::connect(addr).await;
                let mut last = 0;
                for i in 0..PER_PUBLISHER {
                    last = http.publish(topic, format!("[{p},{i}]")).await.1;
                    published.fetch_add(1, Ordering::Relaxed);
                }
                last
            })
        })
        .collect();

    // Clients join one by one while the publishers run: client k once k/CLIENTS of the run is done.
    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let target = k * 2 * PER_PUBLISHER / CLIENTS;
        common::wait_until("publishing progress", Duration::from_secs(60), || {
            let n = published.load(Ordering::Relaxed);
            async move { n >= target }
        })
        .await;
        let mut c = server.ws().await;
        let ack = c.subscribe(topic, k).await;
        clients.push((c, ack["offset"].as_u64().expect("offset")));
    }
    let mut last = 0;
    for p in publishers {
        last = last.max(p.await.expect("publisher task"));
    }
    assert!(
        clients.iter().any(|(_, ack)| *ack > 0 && *ack < last),
        "no client joined mid-stream; the test proves nothing (acks {:?}, last {last})",
        clients.iter().map(|(_, a)| *a).collect::<Vec<_>>()
    );

    for (k, (c, ack)) in clients.iter_mut().enumerate() {
        for expected in *ack + 1..=last {
            let m = c.recv().await;
            assert_eq!(m["op"], "message", "client {k}: {m}");
            assert_eq!(
                m["offset"], expected,
                "client {k} (ack at {ack}) must see every offset after its ack exactly once"
            );
        }
        c.ping_pong(1000 + k as u64).await;
    }
}
