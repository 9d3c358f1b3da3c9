//! A subscriber that stops reading must not slow anyone else down nor grow the server's memory: it is
//! disconnected (default policy) while a reading subscriber of the same topic gets every message.

mod common;

use std::time::{Duration, Instant};

use common::{HttpClient, RawWs, Server, WsClient, tcp_connect_small_rcvbuf};
use serde_json::json;

const TOPIC: &str = "firehose.big";
const MESSAGES: u64 = 2000;
const PAYLOAD: usize = 32 * 1024;
/// The longest the reading client may wait between two consecutive messages. A fan-out that waited
/// on the stuck socket would stall for `server.idle_timeout` (60 s by default) or forever.
const MAX_GAP: Duration = Duration::from_secs(5);
/// How much the server's peak RSS may grow over the run (64 MiB of payload pass through it).
const MAX_RSS_GROWTH_KIB: u64 = 100 * 1024;

fn payload(i: u64) -> String {
    let body = format!(r#"{{"i":{i},"pad":""}}"#);
    format!(
        r#"{{"i":{i},"pad":"{}"}}"#,
        "p".repeat(PAYLOAD - body.len())
    )
}

/// Reads `MESSAGES` messages; returns their offsets and the longest gap between two of them.
async fn read_all(mut client: WsClient) -> (Vec<u64>, Duration) {
    let mut offsets = Vec::with_capacity(MESSAGES as usize);
    let mut max_gap = Duration::ZERO;
    let mut last = None::<Instant>;
    while (offsets.len() as u64) < MESSAGES {
        let text = client.recv_text(Duration::from_secs(60)).await;
        let now = Instant::now();
        if let Some(prev) = last {
            max_gap = max_gap.max(now - prev);
        }
        last = Some(now);
        // Only the head of the frame is needed: {"op":"message","topic":"…","offset":N,"data":…
        let head = &text[..text.len().min(128)];
        let offset = head
            .split("\"offset\":")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("message without offset: {head}"));
        assert!(
            text.len() > PAYLOAD,
            "message {offset} is truncated ({} bytes)",
            text.len()
        );
        offsets.push(offset);
    }
    (offsets, max_gap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_and_does_not_hold_back_others() {
    let server = Server::start().await;

    // The stuck client: a tiny receive window, subscribes, reads its ack, then never reads again.
    let stream = tcp_connect_small_rcvbuf(server.addr, 4096).await;
    let mut stuck = match RawWs::handshake(stream, server.addr, "/ws").await {
        Ok(ws) => ws,
        Err(r) => panic!("upgrade refused: {} {}", r.status, r.body),
    };
    stuck
        .send_text(&json!({"op":"subscribe","topic":TOPIC,"id":1}).to_string())
        .await;
    let ack = stuck.recv_json(common::RECV_TIMEOUT).await;
    assert_eq!(ack["op"], "ack", "stuck client's subscribe: {ack}");

    let mut reader = server.ws().await;
    let base = reader.subscribe(TOPIC, 1).await["offset"]
        .as_u64()
        .expect("offset");
    let reading = tokio::spawn(read_all(reader));

    let rss_before = server.rss_kib();
    let mut http = HttpClient::connect(server.addr).await;
    let started = Instant::now();
    for i in 0..MESSAGES {
        let (_, offset) = http.publish(TOPIC, payload(i)).await;
        assert_eq!(offset, base + 1 + i, "publish offset");
    }
    let publish_time = started.elapsed();

    let (offsets, max_gap) = tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .expect("the reading client did not get every message within 120 s")
        .expect("reader task panicked");
    let expected: Vec<u64> = (base + 1..=base + MESSAGES).collect();
    if offsets != expected {
        let first_bad = offsets
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(offsets.len().min(expected.len()));
        panic!(
            "the reading client must get every message in order; first difference at index \
             {first_bad}: got {:?}, expected {:?}",
            offsets.get(first_bad),
            expected.get(first_bad)
        );
    }
    assert!(
        max_gap < MAX_GAP,
        "the reading client stalled for {max_gap:?} between two messages (publishing took {publish_time:?})"
    );

    let disconnects = server
        .wait_metric(
            "pubgate_slow_consumer_disconnects_total",
            Duration::from_secs(10),
            |v| v >= 1.0,
        )
        .await;
    assert!(disconnects >= 1.0);

    // The stuck connection really is closed: draining its socket ends in EOF/reset, well before the
    // 64 MiB that were published.
    let received = stuck.expect_eof(Duration::from_secs(30), 48 << 20).await;
    assert!(
        received < (MESSAGES as usize) * PAYLOAD / 2,
        "the stuck client got {received} bytes; it should have been cut off early"
    );

    let peak = server.peak_rss_kib();
    assert!(
        peak.saturating_sub(rss_before) < MAX_RSS_GROWTH_KIB,
        "server peak RSS grew from {rss_before} KiB to {peak} KiB (limit +{MAX_RSS_GROWTH_KIB} KiB)"
    );

    // Only the stuck client was cut off: its subscription goes away, the reader's stays.
    server
        .wait_metric("pubgate_subscriptions", Duration::from_secs(10), |v| {
            v == 1.0
        })
        .await;
    eprintln!(
        "slow consumer run: published {MESSAGES} x {PAYLOAD} B in {publish_time:?}, longest reader \
         gap {max_gap:?}, stuck client got {received} B, RSS {rss_before} KiB -> peak {peak} KiB"
    );
}
