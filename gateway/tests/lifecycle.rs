//! Process lifecycle: the SIGTERM drain (1001 to clients, readiness false, exit within the grace
//! period) and start-up failures on bad configuration that name the offending key.

mod common;

use std::time::{Duration, Instant};

use common::{
    HttpClient, RECV_TIMEOUT, RawWs, Server, ServerBuilder, TempFile, WsClient, http_get,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_1001_turns_unready_and_exits_within_grace() {
    const GRACE: Duration = Duration::from_secs(5);
    let mut server = Server::builder()
        .env("PUBGATE__DRAIN__GRACE", "5s")
        .metrics_listener()
        .start()
        .await;
    let probe = server.probe_addr();
    let ready = http_get(probe, "/readyz").await;
    assert_eq!(
        ready.status, 200,
        "/readyz before the drain: {}",
        ready.body
    );

    let mut a = server.ws().await;
    a.subscribe("drain.topic", 1).await;
    let mut b = server.ws().await;
    b.ping_pong(1).await;
    // A client that never answers the close handshake keeps the node draining for a while, long
    // enough to watch /readyz.
    let mut stubborn = RawWs::connect(server.addr).await;
    stubborn
        .send_text(&json!({"op":"ping","id":1}).to_string())
        .await;
    assert_eq!(
        stubborn.recv_json(RECV_TIMEOUT).await,
        json!({"op":"pong","id":1})
    );

    let signalled = Instant::now();
    server.sigterm();

    // Readiness turns false while draining (the metrics listener stays up for probes; each probe
    // uses a fresh connection, as kubelet does).
    let mut unready = None;
    for _ in 0..500 {
        let r = http_get(probe, "/readyz").await;
        if r.status == 503 {
            unready = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "/readyz: {}", r.body);
        if signalled.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let unready = unready.expect("/readyz never answered 503 while draining");
    assert_eq!(
        unready.json()["draining"],
        true,
        "/readyz body: {}",
        unready.body
    );

    // Liveness, readiness and scrapes keep answering on the metrics listener through the drain.
    for i in 0..20 {
        let h = http_get(probe, "/healthz").await;
        assert_eq!(
            h.status, 200,
            "/healthz probe {i} while draining: {}",
            h.body
        );
        let r = http_get(probe, "/readyz").await;
        assert_eq!(
            r.status, 503,
            "/readyz probe {i} while draining: {}",
            r.body
        );
        let m = server.metrics().await;
        assert_eq!(
            m.value("pubgate_ready"),
            0.0,
            "pubgate_ready while draining"
        );
    }

    // Every client is told to go away with 1001.
    let reason = a.expect_close(1001, RECV_TIMEOUT).await;
    assert!(!reason.is_empty(), "1001 without a reason");
    b.expect_close(1001, RECV_TIMEOUT).await;
    stubborn.expect_close(1001, RECV_TIMEOUT).await;

    // New WebSocket clients are not taken any more.
    let attempt = tokio::time::timeout(RECV_TIMEOUT, WsClient::try_connect(&server.ws_url())).await;
    assert!(
        matches!(attempt, Ok(Err(_))),
        "a new WebSocket connection was accepted while draining"
    );

    let status = server
        .wait_exit(GRACE + Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("still running {GRACE:?} + 5 s after SIGTERM"));
    let took = signalled.elapsed();
    assert!(status.success(), "exit status after a drain: {status}");
    assert!(
        took < GRACE + Duration::from_millis(1500),
        "exit took {took:?}, grace is {GRACE:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delay_keeps_serving_while_not_ready() {
    let mut server = Server::builder()
        .env("PUBGATE__DRAIN__GRACE", "8s")
        .env("PUBGATE__DRAIN__DELAY", "3s")
        .start()
        .await;
    let mut early = server.ws().await;
    early.subscribe("delay.topic", 1).await;

    let signalled = Instant::now();
    server.sigterm();
    let mut unready = false;
    for _ in 0..300 {
        let r = http_get(server.addr, "/readyz").await;
        if r.status == 503 {
            unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(unready, "/readyz never turned 503 after SIGTERM");
    // Still inside the delay: the node takes new clients and serves publishes.
    let mut late = server.ws().await;
    late.subscribe("delay.topic", 1).await;
    let mut http = HttpClient::connect(server.addr).await;
    http.publish("delay.topic", "1").await;
    assert_eq!(early.recv().await["op"], "message");
    assert_eq!(late.recv().await["op"], "message");
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "the checks above took longer than the delay; the test proves nothing on this machine"
    );
    // Then both are closed with 1001 and the process exits in time.
    early.expect_close(1001, Duration::from_secs(10)).await;
    late.expect_close(1001, Duration::from_secs(10)).await;
    assert!(
        signalled.elapsed() >= Duration::from_millis(2900),
        "clients were closed before drain.delay ran out"
    );
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("still running 15 s after SIGTERM");
    assert!(status.success(), "exit status: {status}");
    assert!(
        signalled.elapsed() < Duration::from_millis(9500),
        "exit took {:?} with an 8 s grace",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exit_is_bounded_by_grace_even_with_a_stuck_client() {
    const GRACE: Duration = Duration::from_secs(1);
    // A big send queue, so the stuck client stays connected with a write in progress instead of
    // being cut off as a slow consumer.
    let mut server = Server::builder()
        .env("PUBGATE__DRAIN__GRACE", "1s")
        .env(
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (64u32 << 20).to_string(),
        )
        .env("PUBGATE__LIMITS__SEND_QUEUE_FRAMES", "100000")
        .start()
        .await;
    let mut stuck = RawWs::connect_small_rcvbuf(server.addr, 4096).await;
    assert_eq!(stuck.subscribe("stuck", 1).await["op"], "ack");
    let mut http = HttpClient::connect(server.addr).await;
    let data = format!("\"{}\"", "s".repeat(32 * 1024));
    for _ in 0..400 {
        http.publish("stuck", data.clone()).await;
    }
    drop(http);
    server
        .wait_metric(
            "pubgate_messages_delivered_total",
            Duration::from_secs(5),
            |v| v >= 400.0,
        )
        .await;
    assert_eq!(
        server
            .metric("pubgate_slow_consumer_disconnects_total")
            .await,
        0.0,
        "the stuck client must still be connected for this test"
    );

    let signalled = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(GRACE + Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running {GRACE:?} + 10 s after SIGTERM"));
    let took = signalled.elapsed();
    assert!(status.success(), "exit status after a drain: {status}");
    assert!(
        took < GRACE + Duration::from_millis(1500),
        "exit took {took:?} with a stuck client, grace is {GRACE:?}"
    );
    drop(stuck);
}

/// Runs pubgate expecting a start-up failure whose stderr names every one of `needles`.
async fn expect_config_error(what: &str, builder: ServerBuilder, needles: &[&str]) {
    let out = builder.run_to_exit(Duration::from_secs(30)).await;
    assert!(
        !out.status.success(),
        "{what}: pubgate started although the config is bad; stderr:\n{}",
        out.stderr
    );
    assert!(
        out.status.code().is_some(),
        "{what}: pubgate was killed by a signal: {:?}",
        out.status
    );
    assert!(
        !out.stderr.contains("panicked"),
        "{what}: pubgate panicked instead of reporting the error:\n{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("listening"),
        "{what}: pubgate listened although the config is bad: {}",
        out.stdout
    );
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "{what}: the error must name {needle:?}; stderr:\n{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn bad_config_fails_start_up_naming_the_key() {
    let bad_value = TempFile::new("bad-value.toml", "[server]\nmax_connections = \"lots\"\n");
    expect_config_error(
        "bad value in the TOML file",
        Server::builder().args(["--config", &bad_value.arg()]),
        &["server.max_connections"],
    )
    .await;

    let bad_duration = TempFile::new("bad-duration.toml", "[drain]\ngrace = \"soon\"\n");
    expect_config_error(
        "bad duration in the TOML file",
        Server::builder().args(["--config", &bad_duration.arg()]),
        &["drain.grace"],
    )
    .await;

    let unknown_key = TempFile::new("unknown-key.toml", "[server]\nmax_conections = 5\n");
    expect_config_error(
        "unknown key in the TOML file",
        Server::builder().args(["--config", &unknown_key.arg()]),
        &["max_conections"],
    )
    .await;

    let unknown_section = TempFile::new("unknown-section.toml", "[srever]\nlisten = \"x\"\n");
    expect_config_error(
        "unknown section in the TOML file",
        Server::builder().args(["--config", &unknown_section.arg()]),
        &["srever"],
    )
    .await;

    let broken = TempFile::new("broken.toml", "[server\nlisten = \n");
    expect_config_error(
        "TOML syntax error",
        Server::builder().args(["--config", &broken.arg()]),
        &["broken.toml"],
    )
    .await;

    expect_config_error(
        "missing config file",
        Server::builder().args(["--config", "/nonexistent/pubgate-test.toml"]),
        &["/nonexistent/pubgate-test.toml"],
    )
    .await;

    expect_config_error(
        "bad value in env",
        Server::builder().env("PUBGATE__SERVER__MAX_CONNECTIONS", "abc"),
        &["server.max_connections"],
    )
    .await;

    expect_config_error(
        "bad duration in env",
        Server::builder().env("PUBGATE__SERVER__PING_INTERVAL", "fast"),
        &["server.ping_interval"],
    )
    .await;

    expect_config_error(
        "unknown key in env",
        Server::builder().env("PUBGATE__LIMITS__MAX_SUBSCRIPTION", "5"),
        &["max_subscription"],
    )
    .await;

    expect_config_error(
        "value that parses but is out of range",
        Server::builder().env("PUBGATE__SERVER__PING_INTERVAL", "0s"),
        &["server.ping_interval"],
    )
    .await;

    expect_config_error(
        "bad --listen",
        Server::builder()
            .without_listen_flag()
            .args(["--listen", "nope"]),
        &["server.listen"],
    )
    .await;

    expect_config_error(
        "bad --broker",
        Server::builder().args(["--broker", "carrier-pigeon"]),
        &["broker.kind"],
    )
    .await;

    expect_config_error(
        "unknown flag",
        Server::builder().args(["--no-such-flag"]),
        &["--no-such-flag"],
    )
    .await;
}

#[tokio::test]
async fn config_layers_override_in_order_file_env_flag() {
    // The file says listen on port 1 and allow 5 connections; env lowers that to 1; the harness's
    // --listen flag moves the port. If any layer were ignored, the checks below would fail.
    let file = TempFile::new(
        "layers.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\nmax_connections = 5\n",
    );
    let server = Server::builder()
        .args(["--config", &file.arg()])
        .env("PUBGATE__SERVER__MAX_CONNECTIONS", "1")
        .start()
        .await;
    assert_ne!(server.addr.port(), 1, "--listen must override the file");
    let mut first = server.ws().await;
    first.ping_pong(1).await;
    let second = WsClient::try_connect(&server.ws_url()).await;
    assert!(
        second.is_err(),
        "env max_connections = 1 must override the file's 5"
    );
}

#[tokio::test]
async fn sigint_drains_like_sigterm() {
    let mut server = Server::start().await;
    let mut c = server.ws().await;
    c.ping_pong(1).await;
    server.signal(libc::SIGINT);
    c.expect_close(1001, RECV_TIMEOUT).await;
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("still running 10 s after SIGINT");
    assert!(status.success(), "exit status after SIGINT: {status}");
}

#[tokio::test]
async fn a_taken_port_fails_start_up_naming_the_key() {
    let first = Server::start().await;
    let taken = first.addr.to_string();
    expect_config_error(
        "main port in use",
        Server::builder()
            .without_listen_flag()
            .args(["--listen", taken.as_str()]),
        &["server.listen", taken.as_str()],
    )
    .await;
    expect_config_error(
        "metrics port in use",
        Server::builder().args(["--metrics-listen", taken.as_str()]),
        &["server.metrics_listen", taken.as_str()],
    )
    .await;
}

#[tokio::test]
async fn help_documents_every_flag() {
    let out = Server::builder()
        .without_listen_flag()
        .arg("--help")
        .run_to_exit(Duration::from_secs(30))
        .await;
    assert!(out.status.success(), "--help failed: {}", out.stderr);
    for flag in [
        "--config",
        "--listen",
        "--metrics-listen",
        "--broker",
        "--redis-url",
        "--tls-cert",
        "--tls-key",
        "--echo-path",
    ] {
        assert!(
            out.stdout.contains(flag),
            "--help does not document {flag}:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("PUBGATE__"),
        "--help should explain the env layer:\n{}",
        out.stdout
    );
}

/// A signal the moment the node says it listens drains it like any other: the handlers are in
/// place before the announcement, so the signal's default action (killing the process) never
/// runs. Repeated, because the window it guards against is short.
#[tokio::test]
async fn a_signal_right_after_start_drains_cleanly() {
    for round in 0..10 {
        let signal = if round % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        let mut server = Server::start().await;
        server.signal(signal);
        let status = server
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("exits within 10 s of the signal");
        assert!(
            status.success(),
            "round {round}: exit status after signal {signal}: {status}"
        );
    }
}
