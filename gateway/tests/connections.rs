//! Connection handling: the connection limit, heartbeats and the idle timeout, and the handshake
//! timeout for clients that never finish their request.

mod common;

use std::time::{Duration, Instant};

use common::{
    Event, RECV_TIMEOUT, RawWs, Server, WsClient, op, raw_http, read_until_closed, tcp_connect,
};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn upgrade_past_max_connections_gets_503_json_and_a_freed_slot_is_reusable() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__MAX_CONNECTIONS", "3")
        .start()
        .await;
    let mut first = server.ws().await;
    let mut second = server.ws().await;
    let mut third = server.ws().await;
    for (i, c) in [&mut first, &mut second, &mut third]
        .into_iter()
        .enumerate()
    {
        c.ping_pong(i as u64).await;
    }

    // The fourth upgrade is refused with 503 and a JSON body.
    let refused = match RawWs::handshake(tcp_connect(server.addr).await, server.addr, "/ws").await {
        Ok(_) => panic!("a 4th connection was accepted with max_connections = 3"),
        Err(r) => r,
    };
    assert_eq!(refused.status, 503, "4th upgrade: {refused:?}");
    assert!(
        refused
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")),
        "503 must be JSON: {refused:?}"
    );
    let body = refused.json();
    assert!(body["code"].is_string(), "503 body needs a code: {body}");
    assert!(
        body["message"].is_string(),
        "503 body needs a message: {body}"
    );
    // tungstenite sees the same refusal.
    match WsClient::try_connect(&server.ws_url()).await {
        Ok(_) => panic!("a 4th tungstenite connection was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 503, "{r:?}")
        }
        Err(e) => panic!("expected HTTP 503, got {e}"),
    }
    let m = server.metrics().await;
    assert!(
        m.value("pubgate_connections_refused_total") >= 2.0,
        "refusals are counted"
    );
    assert_eq!(m.value("pubgate_connections"), 3.0, "refusals hold no slot");

    // The existing connections are unaffected.
    second.ping_pong(10).await;

    // One client leaves; a new one can connect (the slot is freed asynchronously, so retry until a
    // deadline).
    first.send_close(1000).await;
    first.expect_close(1000, RECV_TIMEOUT).await;
    let started = Instant::now();
    let mut fourth = loop {
        match WsClient::try_connect(&server.ws_url()).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => panic!("no connection possible 10 s after a client left: {e}"),
        }
    };
    fourth.ping_pong(11).await;
    third.ping_pong(12).await;
}

#[tokio::test]
async fn server_pings_and_closes_a_client_that_never_answers() {
    const PING: Duration = Duration::from_millis(200);
    const IDLE: Duration = Duration::from_millis(1500);
    let server = Server::builder()
        .env("PUBGATE__SERVER__PING_INTERVAL", "200ms")
        .env("PUBGATE__SERVER__IDLE_TIMEOUT", "1500ms")
        .start()
        .await;

    // A well-behaved client (tungstenite answers pings while it reads) sees pings and stays
    // connected well past the idle timeout.
    let mut good = server.ws().await;
    // A raw client that never sends anything, not even a pong. Its clock starts before it connects,
    // so the server's idle clock cannot have started earlier.
    let connected = Instant::now();
    let mut mute = RawWs::connect(server.addr).await;

    let good_reader = async {
        let until = Instant::now() + IDLE * 2;
        while Instant::now() < until {
            match good
                .next_event(until.saturating_duration_since(Instant::now()))
                .await
            {
                Event::Ping | Event::Timeout => {}
                other => panic!("answering client: unexpected {other:?}"),
            }
        }
        good
    };
    let mute_reader = async {
        let mut pings = 0;
        loop {
            match mute.read_frame(IDLE + Duration::from_secs(10)).await {
                Ok(f) if f.opcode == op::PING => pings += 1,
                Ok(f) if f.opcode == op::CLOSE => break (f, pings, connected.elapsed()),
                Ok(f) => panic!("silent client: unexpected frame {f:?}"),
                Err(e) => panic!("silent client: no close frame: {e:?} after {pings} pings"),
            }
        }
    };
    let (mut good, (close, mute_pings, closed_after)) = tokio::join!(good_reader, mute_reader);

    assert!(
        good.pings >= 4,
        "expected a server ping about every {PING:?}; got {} in {:?}",
        good.pings,
        IDLE * 2
    );
    good.ping_pong(1).await;

    assert_eq!(close.close_code(), Some(1001), "idle close: {close:?}");
    assert!(
        mute_pings >= 2,
        "the silent client was pinged first ({mute_pings} pings)"
    );
    assert!(
        closed_after >= IDLE - Duration::from_millis(50),
        "closed after {closed_after:?}, before the idle timeout {IDLE:?}"
    );
    assert!(
        closed_after < IDLE + Duration::from_secs(5),
        "closed only after {closed_after:?} (idle timeout {IDLE:?})"
    );
    // And the TCP connection goes away.
    mute.expect_eof(Duration::from_secs(10), 1 << 16).await;
}

#[tokio::test]
async fn unfinished_handshake_is_closed_after_the_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let server = Server::builder()
        .env("PUBGATE__SERVER__HANDSHAKE_TIMEOUT", "1s")
        .start()
        .await;

    // Measured from before the connections exist, so a slow test task cannot make the server look
    // early.
    let started = Instant::now();
    // Half a request head, then nothing.
    let mut half = tcp_connect(server.addr).await;
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websock")
        .await
        .expect("write");
    // Nothing at all.
    let mut silent = tcp_connect(server.addr).await;

    let ((sent_half, after_half), (sent_silent, after_silent)) = tokio::join!(
        read_until_closed(&mut half, started, TIMEOUT + Duration::from_secs(10)),
        read_until_closed(&mut silent, started, TIMEOUT + Duration::from_secs(10)),
    );
    for (what, sent, after) in [
        ("half a request", sent_half, after_half),
        ("nothing", sent_silent, after_silent),
    ] {
        assert!(
            after >= TIMEOUT - Duration::from_millis(50),
            "client that sent {what} was closed after {after:?}, before the {TIMEOUT:?} timeout"
        );
        assert!(
            sent.is_empty() || sent.starts_with(b"HTTP/1.1 408"),
            "client that sent {what} got {:?}",
            String::from_utf8_lossy(&sent)
        );
    }
    server
        .wait_metric(
            "pubgate_handshake_failures_total{reason=\"handshake_timeout\"}",
            Duration::from_secs(5),
            |v| v >= 2.0,
        )
        .await;

    // A prompt client is unaffected.
    let mut c = server.ws().await;
    c.ping_pong(1).await;
    // A connected WebSocket is not subject to the handshake timeout.
    tokio::time::sleep(TIMEOUT + Duration::from_millis(300)).await;
    c.ping_pong(2).await;
}

#[tokio::test]
async fn invalid_upgrades_are_refused_with_json_and_never_count_as_connections() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__MAX_CONNECTIONS", "1")
        .start()
        .await;
    let host = server.addr.to_string();
    let plain_get = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let no_key = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let old_version = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
    );

    let r = raw_http(server.addr, &plain_get).await;
    assert_eq!(r.status, 426, "plain GET /ws: {r:?}");
    assert_eq!(
        r.header("upgrade"),
        Some("websocket"),
        "426 names the protocol: {r:?}"
    );
    assert!(r.json()["code"].is_string(), "{r:?}");
    for (what, request) in [("no key", &no_key), ("version 8", &old_version)] {
        let r = raw_http(server.addr, request).await;
        assert_eq!(r.status, 400, "upgrade with {what}: {r:?}");
        assert_eq!(
            r.json()["code"],
            "bad_request",
            "upgrade with {what}: {r:?}"
        );
    }
    let m = server.metrics().await;
    assert_eq!(
        m.value("pubgate_connections_total"),
        0.0,
        "refused handshakes are not accepted connections"
    );
    assert_eq!(m.value("pubgate_connections"), 0.0);

    // With the node full, a broken handshake is still a 400 (its own fault), not a 503.
    let mut only = server.ws().await;
    only.ping_pong(1).await;
    let r = raw_http(server.addr, &old_version).await;
    assert_eq!(r.status, 400, "broken handshake on a full node: {r:?}");
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_connections_total"), 1.0);
    assert_eq!(m.value("pubgate_connections_refused_total"), 0.0);
    only.ping_pong(2).await;
}

#[tokio::test]
async fn allowed_origins_are_enforced_on_upgrade() {
    let server = Server::builder()
        .env(
            "PUBGATE__SERVER__ALLOWED_ORIGINS",
            "https://app.example,https://admin.example",
        )
        .start()
        .await;
    let upgrade = |origin: Option<&'static str>| {
        let addr = server.addr;
        async move {
            let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
            RawWs::handshake_with(tcp_connect(addr).await, addr, "/ws", &headers).await
        }
    };
    for origin in [
        None,
        Some("https://evil.example"),
        Some("https://app.example.evil"),
    ] {
        match upgrade(origin).await {
            Ok(_) => panic!("upgrade with origin {origin:?} was accepted"),
            Err(r) => {
                assert_eq!(r.status, 403, "origin {origin:?}: {r:?}");
                assert_eq!(r.json()["code"], "forbidden", "origin {origin:?}: {r:?}");
            }
        }
    }
    for origin in ["https://app.example", "https://admin.example"] {
        let mut ws = upgrade(Some(origin))
            .await
            .unwrap_or_else(|r| panic!("origin {origin} refused: {r:?}"));
        ws.send_text(r#"{"op":"ping","id":1}"#).await;
        assert_eq!(
            ws.recv_json(RECV_TIMEOUT).await,
            serde_json::json!({"op":"pong","id":1})
        );
    }
}

#[tokio::test]
async fn echo_route_echoes_frames_only_when_configured() {
    let server = Server::builder()
        .args(["--echo-path", "/echo"])
        .start()
        .await;
    let url = format!("ws://{}/echo", server.addr);
    let mut c = WsClient::try_connect(&url)
        .await
        .unwrap_or_else(|e| panic!("echo route: {e}"));
    c.send_text("not even json").await;
    assert_eq!(c.recv_text(RECV_TIMEOUT).await, "not even json");
    c.send_binary(&[0, 1, 2, 255]).await;
    match c.next_event(RECV_TIMEOUT).await {
        Event::Binary(b) => assert_eq!(b, vec![0, 1, 2, 255]),
        other => panic!("binary echo: {other:?}"),
    }
    // Larger than limits.max_message_size: the echo route has its own, larger limit.
    let big = "e".repeat(1 << 20);
    c.send_text(&big).await;
    assert_eq!(
        c.recv_text(RECV_TIMEOUT).await.len(),
        big.len(),
        "1 MiB echo"
    );

    // Without the flag there is no such route.
    let plain = Server::start().await;
    let r = common::http_get(plain.addr, "/echo").await;
    assert_eq!(r.status, 404, "/echo without --echo-path: {}", r.body);
}

#[tokio::test]
async fn unfinished_request_body_is_answered_408_after_the_handshake_timeout() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__HANDSHAKE_TIMEOUT", "1s")
        .start()
        .await;
    let started = Instant::now();
    let mut conn = tcp_connect(server.addr).await;
    conn.write_all(
        b"POST /v1/publish/t HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"partial\":",
    )
    .await
    .expect("write");
    let (got, after) = read_until_closed(&mut conn, started, Duration::from_secs(15)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 408"),
        "a stalled body got {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        after >= Duration::from_millis(950) && after < Duration::from_secs(10),
        "answered after {after:?}"
    );
}
