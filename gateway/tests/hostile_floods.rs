//! Hostile clients' request floods: WebSocket and `ping` op floods (answered; a client that does not
//! read its replies is throttled, then cut off) and subscribe floods on one connection and across
//! many (errors past the limit, no topic left behind). What every test checks while they misbehave,
//! and how to see the figures: `hostile_support`.

mod common;
mod hostile_support;

use std::time::{Duration, Instant};

use common::{HttpClient, RECV_TIMEOUT, RawFrame, RawWs, Server, WsClient, masked_frame, op};
use hostile_support::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------------
// Ping floods
// ---------------------------------------------------------------------------------------------

/// One flood request: the frame that asks for request `i`.
type MakeFrame = fn(u64) -> Vec<u8>;
/// Checks the server's answer to request `i`.
type CheckAnswer = fn(u64, &RawFrame);

/// Floods `count` requests from a client that reads every answer while it writes; returns how long
/// the whole exchange took.
async fn flood_reading(
    server: &Server,
    count: u64,
    make: MakeFrame,
    check: CheckAnswer,
) -> Duration {
    let ws = raw(server).await;
    let (mut reader, mut writer) = ws.into_split();
    let started = Instant::now();
    let writing = tokio::spawn(async move {
        let mut i = 0;
        while i < count {
            let mut batch = Vec::new();
            for _ in 0..500.min(count - i) {
                batch.extend(make(i));
                i += 1;
            }
            writer.write_all(&batch).await.expect("write flood");
        }
        writer
    });
    for i in 0..count {
        let frame = loop {
            let f = reader
                .read_frame(RECV_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("answer {i} of {count}: {e:?}"));
            // Heartbeat pings from the server (empty) are not answers.
            if f.opcode == op::PING {
                continue;
            }
            break f;
        };
        check(i, &frame);
    }
    let elapsed = started.elapsed();
    let mut writer = writing.await.expect("writer task");
    // Still a working connection.
    writer
        .write_all(&masked_frame(
            true,
            op::TEXT,
            br#"{"op":"ping","id":"after"}"#,
        ))
        .await
        .expect("write");
    let last = loop {
        let f = reader
            .read_frame(RECV_TIMEOUT)
            .await
            .expect("pong after the flood");
        if f.opcode != op::PING {
            break f;
        }
    };
    let v: Value = serde_json::from_slice(&last.payload).expect("JSON pong");
    assert_eq!(v, json!({"op":"pong","id":"after"}));
    elapsed
}

/// How a client that floods requests and never reads its replies ended.
struct NotReading {
    /// Requests written before the server stopped taking them.
    sent: u64,
    /// When a write first stayed blocked for over a second (the server stopped reading), from the
    /// start of the flood.
    throttled_after: Option<Duration>,
    /// When the connection was reset, from the start of the flood.
    cut_off_after: Duration,
}

/// Floods requests from a client that never reads (with a small receive window), until the server
/// drops it. Panics if it is still connected after `limit`.
async fn flood_not_reading(server: &Server, make: MakeFrame, limit: Duration) -> NotReading {
    let mut ws = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut throttled_after = None;
    loop {
        let mut batch = Vec::new();
        for i in 0..1000 {
            batch.extend(make(sent + i));
        }
        let write_started = Instant::now();
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, ws.stream.write_all(&batch)).await {
            Ok(Ok(())) => sent += 1000,
            Ok(Err(_)) => {
                // Usually the last write is the one that blocked until the reset.
                if throttled_after.is_none() && write_started.elapsed() > Duration::from_secs(1) {
                    throttled_after = Some(write_started.duration_since(started));
                }
                return NotReading {
                    sent,
                    throttled_after,
                    cut_off_after: started.elapsed(),
                };
            }
            Err(_) => panic!(
                "a client that never reads its replies is still connected after {limit:?} \
                 ({sent} requests written)"
            ),
        }
        if throttled_after.is_none() && write_started.elapsed() > Duration::from_secs(1) {
            throttled_after = Some(write_started.duration_since(started));
        }
    }
}

fn ws_ping(i: u64) -> Vec<u8> {
    masked_frame(true, op::PING, &i.to_be_bytes())
}

fn check_ws_pong(i: u64, f: &RawFrame) {
    assert_eq!(f.opcode, op::PONG, "answer {i}: {f:?}");
    assert_eq!(
        f.payload,
        i.to_be_bytes(),
        "pong {i} carries its ping's payload"
    );
}

fn op_ping(i: u64) -> Vec<u8> {
    masked_frame(
        true,
        op::TEXT,
        format!(r#"{{"op":"ping","id":{i}}}"#).as_bytes(),
    )
}

fn check_op_pong(i: u64, f: &RawFrame) {
    assert_eq!(f.opcode, op::TEXT, "answer {i}: {f:?}");
    let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
    assert_eq!(v, json!({"op":"pong","id":i}), "answer {i}");
}

/// The stall limit for the ping flood tests (`server.idle_timeout`): how long a writer may make no
/// progress before the connection is dropped.
const FLOOD_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Both floods at once, plus the checks every test makes.
async fn ping_flood_test(test: &str, count: u64, make: MakeFrame, check: CheckAnswer) {
    let server = Server::builder()
        .env("PUBGATE__SERVER__PING_INTERVAL", "1s")
        .env("PUBGATE__SERVER__IDLE_TIMEOUT", "3s")
        // This flood is about queues and stalls; the message rate limit has its own test in client_limits.rs.
        .env("PUBGATE__LIMITS__MESSAGE_BURST", "1000000")
        .start()
        .await;
    let watch = Watch::start(&server).await;
    let sampler = Sampler::start(server.pid());
    let (reading, not_reading) = tokio::join!(
        flood_reading(&server, count, make, check),
        flood_not_reading(&server, make, FLOOD_IDLE_TIMEOUT + Duration::from_secs(20))
    );
    let peak = sampler.finish().await;
    // The client that does not read is slowed down first (the server stops reading its requests
    // once its replies fill half its queue and the socket), then dropped by the stall limit.
    let throttled = not_reading.throttled_after.unwrap_or_else(|| {
        panic!("[{test}] the server never stopped reading a client that does not read")
    });
    assert!(
        not_reading.cut_off_after >= throttled + FLOOD_IDLE_TIMEOUT - Duration::from_secs(1),
        "[{test}] cut off {:?} after the start, throttled after {throttled:?}: before the stall \
         limit {FLOOD_IDLE_TIMEOUT:?}",
        not_reading.cut_off_after
    );
    wait_only_control_connected(&server, Duration::from_secs(10)).await;
    // Neither flood is a fan-out slow consumer; the reading client was never cut off.
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_slow_consumer_disconnects_total"), 0.0);
    let rss = watch.finish(test, &server, peak.rss_kib).await;
    eprintln!(
        "[{test}] reading client: {count} answered in {:.0} ms ({:.0}/s); client that does not \
         read: {} requests taken, then throttled (a write blocked) {:.0} ms in, dropped by the \
         stall limit {:.0} ms in",
        ms(reading),
        count as f64 / reading.as_secs_f64(),
        not_reading.sent,
        ms(throttled),
        ms(not_reading.cut_off_after)
    );
    // Half a send queue of replies (limits.send_queue_frames/bytes), one batch in flight and the
    // socket buffers bound what a client that does not read can cost.
    rss.assert_bounded(test, 16 * 1024, 12 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ping_flood_is_answered_and_a_client_that_does_not_read_is_cut_off() {
    let _serial = serial().await;
    ping_flood_test("ws ping flood", 20_000, ws_ping, check_ws_pong).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_op_flood_is_answered_and_a_client_that_does_not_read_is_cut_off() {
    let _serial = serial().await;
    ping_flood_test("op ping flood", 10_000, op_ping, check_op_pong).await;
}

// ---------------------------------------------------------------------------------------------
// Subscribe floods
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_flood_past_the_per_connection_limit_gets_errors_and_the_connection_works() {
    const TEST: &str = "subscribe flood, one connection";
    const MAX: u64 = 100; // limits.max_subscriptions, the default
    const FLOOD: u64 = 2000;
    let _serial = serial().await;
    // This flood is about the subscription limit and the replies' order; the subscribe rate limit
    // (which would answer most of it with rate_limited) has its own test in churn.rs.
    let server = Server::builder()
        .env("PUBGATE__LIMITS__SUBSCRIBE_BURST", "100000")
        .start()
        .await;
    let watch = Watch::start(&server).await;

    let sampler = Sampler::start(server.pid());
    // Every request written before any reply is read.
    let ws = raw(&server).await;
    let (mut reader, mut writer) = ws.into_split();
    let started = Instant::now();
    let writing = tokio::spawn(async move {
        let mut all = Vec::new();
        for i in 0..FLOOD {
            let req = json!({"op":"subscribe","topic":format!("flood.t{i}"),"id":i});
            all.extend(masked_frame(true, op::TEXT, req.to_string().as_bytes()));
        }
        // The same topic again, and names that break the rules.
        for i in FLOOD..FLOOD + 200 {
            let req = json!({"op":"subscribe","topic":"flood.t0","id":i});
            all.extend(masked_frame(true, op::TEXT, req.to_string().as_bytes()));
        }
        for i in FLOOD + 200..FLOOD + 400 {
            let req = json!({"op":"subscribe","topic":format!("bad..{i}"),"id":i});
            all.extend(masked_frame(true, op::TEXT, req.to_string().as_bytes()));
        }
        writer.write_all(&all).await.expect("write flood");
        writer
    });
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..FLOOD + 400 {
        let f = loop {
            let f = reader
                .read_frame(RECV_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("reply {i}: {e:?}"));
            if f.opcode != op::PING {
                break f;
            }
        };
        assert_eq!(f.opcode, op::TEXT, "reply {i}: {f:?}");
        let v: Value = serde_json::from_slice(&f.payload).expect("JSON reply");
        assert_eq!(v["id"], i, "replies come in order with their id: {v}");
        let expected = match i {
            i if i < MAX => "ack",
            i if i < FLOOD => "too_many_subscriptions",
            i if i < FLOOD + 200 => "already_subscribed",
            _ => "invalid_topic",
        };
        let got = if v["op"] == "ack" {
            "ack".to_string()
        } else {
            assert_eq!(v["op"], "error", "reply {i}: {v}");
            v["code"].as_str().unwrap_or_default().to_string()
        };
        assert_eq!(got, expected, "reply {i}: {v}");
        *codes.entry(got).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let peak = sampler.finish().await;
    let mut writer = writing.await.expect("writer task");

    // The connection still works: its subscriptions deliver, it can swap one for another.
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_subscriptions"), (MAX + 1) as f64);
    assert_eq!(
        m.value("pubgate_client_errors_total{code=\"too_many_subscriptions\"}"),
        (FLOOD - MAX) as f64
    );
    HttpClient::connect(server.addr)
        .await
        .publish("flood.t42", r#"{"still":"here"}"#)
        .await;
    let msg = reader.read_frame(RECV_TIMEOUT).await.expect("message");
    let v: Value = serde_json::from_slice(&msg.payload).expect("JSON");
    assert_eq!(v["topic"], "flood.t42", "{v}");
    assert_eq!(v["data"], json!({"still":"here"}));
    for req in [
        json!({"op":"unsubscribe","topic":"flood.t0","id":"u"}),
        json!({"op":"subscribe","topic":"flood.extra","id":"s"}),
    ] {
        writer
            .write_all(&masked_frame(true, op::TEXT, req.to_string().as_bytes()))
            .await
            .expect("write");
        let f = reader.read_frame(RECV_TIMEOUT).await.expect("reply");
        let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
        assert_eq!(v["op"], "ack", "{req} -> {v}");
    }
    let rss = watch.finish(TEST, &server, peak.rss_kib).await;
    eprintln!(
        "[{TEST}] {} pipelined requests answered in order in {:.0} ms: {codes:?}",
        FLOOD + 400,
        ms(elapsed)
    );
    rss.assert_bounded(TEST, 8 * 1024, 8 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_flood_across_many_connections_leaves_no_topic_behind() {
    const TEST: &str = "subscribe flood, many connections";
    const CONNS: usize = 200;
    const TOPICS: usize = 100; // each, limits.max_subscriptions
    let _serial = serial().await;
    let server = Server::start().await;
    let watch = Watch::start(&server).await;

    let addr = server.addr;
    let started = Instant::now();
    let mut clients = run_many(CONNS, 50, |c| async move {
        let mut ws = WsClient::connect(addr).await;
        for t in 0..TOPICS {
            ws.send_json(&json!({"op":"subscribe","topic":format!("many.c{c}.t{t}"),"id":t}))
                .await;
        }
        for t in 0..TOPICS {
            let ack = ws.recv().await;
            assert_eq!(ack["op"], "ack", "connection {c}, topic {t}: {ack}");
        }
        (c, ws)
    })
    .await;
    let subscribed_in = started.elapsed();
    let total = (CONNS * TOPICS) as f64;
    let m = server.metrics().await;
    assert_eq!(
        m.value("pubgate_topics"),
        total + 1.0,
        "plus the control topic"
    );
    assert_eq!(m.value("pubgate_subscriptions"), total + 1.0);
    let during = server.rss_kib();
    // A message to one of the 20000 topics reaches exactly its subscriber.
    HttpClient::connect(server.addr)
        .await
        .publish("many.c7.t42", r#"{"to":"c7"}"#)
        .await;
    let (_, c7) = clients.iter_mut().find(|(c, _)| *c == 7).expect("client 7");
    let msg = c7.recv().await;
    assert_eq!(msg["topic"], "many.c7.t42", "{msg}");

    // Half leave with a close handshake, half just drop their TCP connection.
    let leaving = Instant::now();
    run_many(clients.len(), 50, |_| {
        let (c, mut ws) = clients.pop().expect("client");
        async move {
            if c.is_multiple_of(2) {
                ws.send_close(1000).await;
                ws.expect_close(1000, RECV_TIMEOUT).await;
            }
            drop(ws);
        }
    })
    .await;
    for (series, v) in [
        ("pubgate_topics", 1.0),
        ("pubgate_subscriptions", 1.0),
        ("pubgate_connections", 1.0),
    ] {
        server
            .wait_metric(series, Duration::from_secs(15), |x| x == v)
            .await;
    }
    let left_in = leaving.elapsed();
    let mut ws = watch.control.finish(TEST).await;
    ws.unsubscribe(CONTROL_TOPIC, 99).await;
    server
        .wait_metric("pubgate_topics", Duration::from_secs(10), |x| x == 0.0)
        .await;
    let rss = Rss::measure(TEST, &server, watch.rss_before, during);
    eprintln!(
        "[{TEST}] {CONNS} connections x {TOPICS} topics subscribed in {:.0} ms; all gone \
         (pubgate_topics back to 1, then 0 once the control client unsubscribed) {:.0} ms after \
         they started leaving",
        ms(subscribed_in),
        ms(left_in)
    );
    rss.assert_bounded(TEST, 64 * 1024, 48 * 1024);
}
