//! A subscriber that stops reading must not slow anyone else down nor grow the server's memory: it is
//! disconnected (default policy) while a reading subscriber of the same topic gets every message.

mod common;

use std::time::{Duration, Instant};

use common::{HttpClient, RawWs, Server, WsClient};
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

/// Reads `MESSAGES` messages; returns the client, their offsets and the longest gap between two
/// of them.
async fn read_all(mut client: WsClient) -> (WsClient, Vec<u64>, Duration) {
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
    (client, offsets, max_gap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_and_does_not_hold_back_others() {
    let server = Server::start().await;

    // The stuck client: a tiny receive window, subscribes, reads its ack, then never reads again.
    let mut stuck = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    let ack = stuck.subscribe(TOPIC, 1).await;
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

    let (mut reader, offsets, max_gap) = tokio::time::timeout(Duration::from_secs(120), reading)
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
    reader.ping_pong(7).await;
    eprintln!(
        "slow consumer run: published {MESSAGES} x {PAYLOAD} B in {publish_time:?}, longest reader \
         gap {max_gap:?}, stuck client got {received} B, RSS {rss_before} KiB -> peak {peak} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_policy_keeps_a_stuck_client_connected_with_a_gap_in_offsets() {
    const COUNT: u64 = 1000;
    let server = Server::builder()
        .env("PUBGATE__LIMITS__SLOW_CONSUMER", "drop_oldest")
        .env(
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (1u32 << 20).to_string(),
        )
        .start()
        .await;
    let mut stuck = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    let ack = stuck.subscribe(TOPIC, 1).await;
    assert_eq!(ack["op"], "ack", "stuck client's subscribe: {ack}");
    let base = ack["offset"].as_u64().expect("offset");

    let mut reader = server.ws().await;
    reader.subscribe(TOPIC, 1).await;
    let reading = tokio::spawn(async move {
        let mut offsets = Vec::new();
        while (offsets.len() as u64) < COUNT {
            let m = reader.recv_json(Duration::from_secs(60)).await;
            offsets.push(m["offset"].as_u64().expect("offset"));
        }
        offsets
    });
    let mut http = HttpClient::connect(server.addr).await;
    for i in 0..COUNT {
        http.publish(TOPIC, payload(i)).await;
    }
    let last = base + COUNT;
    let offsets = tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .expect("the reading client did not get every message")
        .expect("reader task");
    assert_eq!(
        offsets,
        (base + 1..=last).collect::<Vec<_>>(),
        "the reading client must get every message in order"
    );
    let m = server.metrics().await;
    assert!(
        m.value_or_zero("pubgate_messages_dropped_total{reason=\"queue_full\"}") > 0.0,
        "drop_oldest must have dropped frames for the stuck client"
    );
    assert_eq!(
        m.value("pubgate_slow_consumer_disconnects_total"),
        0.0,
        "drop_oldest must not disconnect"
    );

    // The stuck client catches up: increasing offsets, at least one gap, and it ends at the newest
    // message, still connected.
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let frame = stuck
            .read_frame(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("stuck client after {} messages: {e:?}", seen.len()));
        match frame.opcode {
            common::op::PING => continue,
            common::op::TEXT => {}
            _ => panic!("stuck client got {frame:?}"),
        }
        let v: serde_json::Value = serde_json::from_slice(&frame.payload).expect("JSON");
        assert_eq!(
            v["op"],
            "message",
            "stuck client: {}",
            &v.to_string()[..100]
        );
        seen.push(v["offset"].as_u64().expect("offset"));
        assert!(
            seen.len() as u64 <= COUNT,
            "more messages than were published"
        );
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "offsets must increase"
    );
    assert!(
        seen.windows(2).any(|w| w[1] > w[0] + 1) || seen[0] > base + 1,
        "a stuck client under drop_oldest must see a gap"
    );
    stuck
        .send_text(&json!({"op":"ping","id":2}).to_string())
        .await;
    assert_eq!(
        stuck.recv_json(common::RECV_TIMEOUT).await,
        json!({"op":"pong","id":2}),
        "the stuck client is still connected"
    );
}

/// A server whose send queue (64 MiB) never overflows in these tests, so that only the write stall
/// limit (`server.idle_timeout`, here `idle_timeout`) can cut a client off; pings every 300 ms.
async fn stall_limit_server(idle_timeout: &str) -> Server {
    Server::builder()
        .env("PUBGATE__SERVER__IDLE_TIMEOUT", idle_timeout)
        .env("PUBGATE__SERVER__PING_INTERVAL", "300ms")
        .env(
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (64u32 << 20).to_string(),
        )
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_is_not_cut_off_as_stalled() {
    // The write stall limit (server.idle_timeout) is about a connection where no byte moves. A client
    // that keeps reading, just slower than a burst arrives, must get the whole burst.
    const COUNT: u64 = 600; // 19.7 MB: far more than kernel buffers take.
    const STALL: Duration = Duration::from_secs(3);
    let server = stall_limit_server("3s").await;
    let mut slow = RawWs::connect_small_rcvbuf(server.addr, 16 * 1024).await;
    let ack = slow.subscribe(TOPIC, 1).await;
    let base = ack["offset"].as_u64().expect("offset");

    let mut http = HttpClient::connect(server.addr).await;
    for i in 0..COUNT {
        http.publish(TOPIC, payload(i)).await;
    }

    // Read about 2 MB/s (one 32 KiB message every 16 ms), and say something every 300 ms so the
    // idle timeout never applies; the longest pause between two reads stays far below STALL.
    let started = Instant::now();
    let mut next_offset = base + 1;
    let mut last_said = Instant::now();
    let mut id = 100;
    while next_offset <= base + COUNT {
        if last_said.elapsed() >= Duration::from_millis(300) {
            slow.send_text(&json!({"op":"ping","id":id}).to_string())
                .await;
            id += 1;
            last_said = Instant::now();
        }
        let frame = slow.read_frame(Duration::from_secs(30)).await.unwrap_or_else(|e| {
            panic!(
                "steady reader cut off after {} of {COUNT} messages, {:?} in ({e:?}); stall limit {STALL:?}",
                next_offset - base - 1,
                started.elapsed()
            )
        });
        if frame.opcode != common::op::TEXT {
            assert_ne!(frame.opcode, common::op::CLOSE, "closed: {frame:?}");
            continue;
        }
        if frame.payload.len() < 1024 {
            continue; // a pong
        }
        let head = String::from_utf8_lossy(&frame.payload[..100]).into_owned();
        assert!(
            head.contains(&format!("\"offset\":{next_offset},")),
            "expected offset {next_offset}: {head}"
        );
        next_offset += 1;
        tokio::time::sleep(Duration::from_millis(16)).await;
    }
    assert_eq!(
        server
            .metric("pubgate_slow_consumer_disconnects_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_stall_limit() {
    // With a send queue big enough never to overflow, only the write stall limit
    // (server.idle_timeout) can free a connection whose client stopped reading mid-burst.
    const COUNT: u64 = 400;
    let server = stall_limit_server("1500ms").await;
    let mut stuck = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    assert_eq!(stuck.subscribe(TOPIC, 1).await["op"], "ack");
    let mut http = HttpClient::connect(server.addr).await;
    for i in 0..COUNT {
        http.publish(TOPIC, payload(i)).await;
    }
    server
        .wait_metric("pubgate_connections", Duration::from_secs(15), |v| v == 0.0)
        .await;
    let got = stuck
        .expect_eof(Duration::from_secs(10), (COUNT as usize) * PAYLOAD)
        .await;
    assert!(
        got < (COUNT as usize) * PAYLOAD,
        "the stuck client got everything ({got} bytes); it never stalled"
    );
    assert_eq!(
        server
            .metric("pubgate_slow_consumer_disconnects_total")
            .await,
        0.0,
        "the queue never overflowed; the stall limit closed the connection"
    );
}

/// Publishes `payload(i)` messages to `topic` until the server has cut one slow consumer off;
/// returns how many it published. Panics if 2000 were not enough.
async fn publish_until_cut_off(server: &Server, topic: &str) -> u64 {
    let mut http = HttpClient::connect(server.addr).await;
    for i in 0..2000 {
        http.publish(topic, payload(i)).await;
        let cut = server
            .metrics()
            .await
            .value_or_zero("pubgate_slow_consumer_disconnects_total");
        if cut >= 1.0 {
            return i + 1;
        }
    }
    panic!("2000 messages of {PAYLOAD} bytes did not overflow the send queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_slow_consumer_gets_whole_frames_then_close_1008() {
    // The client stops reading (4 KiB receive window) while messages keep coming: the socket takes
    // part of one frame, the queue overflows and the client is cut off. It then stays stuck for two
    // seconds more (a phone app in the background, a paused tab) before it reads everything. Every
    // frame it gets must be whole, and the last one the close frame 1008: the frame the socket had
    // begun is finished, the rest of the queue dropped. The server used to give that frame one
    // second, then drop the socket mid-frame: a torn message and a bare EOF (1006).
    const STUCK_AFTER_CUT: Duration = Duration::from_secs(2);
    let server = Server::builder()
        .env(
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (256u32 << 10).to_string(),
        )
        .start()
        .await;
    let mut slow = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    let ack = slow.subscribe(TOPIC, 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let base = ack["offset"].as_u64().expect("offset");

    let published = publish_until_cut_off(&server, TOPIC).await;
    tokio::time::sleep(STUCK_AFTER_CUT).await;

    let mut offsets = Vec::new();
    let close = loop {
        let frame = slow
            .read_frame(common::RECV_TIMEOUT)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the connection ended without a close frame after {} whole messages: {e:?}",
                    offsets.len()
                )
            });
        match frame.opcode {
            common::op::PING => continue,
            common::op::CLOSE => break frame,
            common::op::TEXT => {}
            _ => panic!("unexpected frame {frame:?}"),
        }
        assert!(frame.fin, "a fragment: {frame:?}");
        let v: serde_json::Value = serde_json::from_slice(&frame.payload)
            .unwrap_or_else(|e| panic!("message {} is not whole JSON: {e}", offsets.len() + 1));
        let i = offsets.len() as u64;
        assert_eq!(v["op"], "message");
        assert_eq!(v["offset"], json!(base + 1 + i));
        assert_eq!(v["data"]["i"], json!(i));
        assert_eq!(
            v["data"]["pad"].as_str().map(str::len),
            Some(PAYLOAD - format!(r#"{{"i":{i},"pad":""}}"#).len())
        );
        offsets.push(base + 1 + i);
    };
    assert_eq!(close.close_code(), Some(1008), "{close:?}");
    assert_eq!(&close.payload[2..], b"slow consumer: send queue full");
    assert!(
        !offsets.is_empty() && (offsets.len() as u64) < published,
        "{} of {published} messages before the close",
        offsets.len()
    );
    // Nothing after the close frame: the server ends the connection.
    match slow.read_frame(common::RECV_TIMEOUT).await {
        Err(common::RawReadError::Eof | common::RawReadError::Io(_)) => {}
        other => panic!("expected the end of the connection after the close frame: {other:?}"),
    }
    assert_eq!(
        server
            .metric("pubgate_slow_consumer_disconnects_total")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_slow_consumer_that_never_reads_again_is_dropped_after_the_stall_limit() {
    // The frame the socket had begun can never be finished, nor the close frame sent: the
    // connection is dropped once no byte moved for server.idle_timeout (3 s here).
    let server = Server::builder()
        .env(
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (256u32 << 10).to_string(),
        )
        .env("PUBGATE__SERVER__IDLE_TIMEOUT", "3s")
        .env("PUBGATE__SERVER__PING_INTERVAL", "500ms")
        .start()
        .await;
    let mut stuck = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    assert_eq!(stuck.subscribe(TOPIC, 1).await["op"], "ack");
    let published = publish_until_cut_off(&server, TOPIC).await;
    server
        .wait_metric("pubgate_connections", Duration::from_secs(15), |v| v == 0.0)
        .await;
    let got = stuck
        .expect_eof(Duration::from_secs(10), published as usize * PAYLOAD)
        .await;
    assert!(got > 0, "the stuck client got nothing at all");
    assert_eq!(
        server
            .metric("pubgate_slow_consumer_disconnects_total")
            .await,
        1.0
    );
}
