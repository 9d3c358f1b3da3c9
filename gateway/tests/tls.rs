//! TLS termination, end to end against the `pubgate` binary with certificates made by the tests:
//! WSS + HTTPS over one port, bad clients on the TLS port, rotation by a Kubernetes-style symlink
//! swap, a broken replacement, SIGHUP, the plain metrics listener, start-up errors and key formats.

mod common;
mod tls_support;

use std::time::{Duration, Instant};

use common::read_until_closed;
use serde_json::json;
use tls_support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test]
async fn wss_subscriber_gets_https_published_messages() {
    let ca = Ca::new();
    let tmp = TempDir::new("wss");
    let issued = ca.issue("wss-server", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let gw = pubgate_tls(&cert, &key).start().await;
    let client = ca.client_config(&[]);

    let (mut ws, leaf) = wss_connect(gw.addr, &client).await;
    assert_eq!(
        leaf, issued.leaf_der,
        "the configured certificate is served"
    );
    subscribe(&mut ws, "scores.nba").await;

    let (status, body) = https(
        gw.addr,
        &client,
        "POST",
        "/v1/publish/scores.nba",
        r#"{"home":3}"#,
    )
    .await;
    assert_eq!(status, 200, "publish over HTTPS: {body}");
    let msg = next_json(&mut ws).await;
    assert_eq!(msg["op"], "message");
    assert_eq!(msg["topic"], "scores.nba");
    assert_eq!(msg["data"], json!({"home": 3}));

    // A burst larger than one TLS record each way, to exercise the split stream under load.
    let big = "x".repeat(20_000);
    for i in 0..20 {
        let (status, _) = https(
            gw.addr,
            &client,
            "POST",
            "/v1/publish/scores.nba",
            &json!({"i": i, "pad": big}).to_string(),
        )
        .await;
        assert_eq!(status, 200);
    }
    for i in 0..20 {
        let msg = next_json(&mut ws).await;
        assert_eq!(msg["data"]["i"], i);
    }
    // A client ping is answered while the writer is idle: the reply must be flushed out of rustls.
    send_json(&mut ws, json!({"op": "ping", "id": 9})).await;
    assert_eq!(next_json(&mut ws).await, json!({"op": "pong", "id": 9}));

    let (status, _) = https(gw.addr, &client, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn tls12_tls13_alpn_and_resumption() {
    let ca = Ca::new();
    let tmp = TempDir::new("versions");
    let issued = ca.issue("versions", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let gw = pubgate_tls(&cert, &key).start().await;
    for (version, expect) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let client = ca.client_config(&[version]);
        let tls = tls_connect(gw.addr, &client).await.expect("handshake");
        let conn = tls.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(expect));
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (status, _) = http_request(tls, "GET", "/healthz", "").await;
        assert_eq!(status, 200);
        // The WebSocket upgrade works on both versions too.
        let (mut ws, _) = wss_connect(gw.addr, &client).await;
        subscribe(&mut ws, "v.check").await;

        // A returning client resumes its session from a ticket.
        let resuming = ca.client_config_with(&[version], true);
        let first = tls_connect(gw.addr, &resuming).await.expect("handshake");
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // Reading the response also takes in the tickets sent after a TLS 1.3 handshake.
        assert_eq!(http_request(first, "GET", "/healthz", "").await.0, 200);
        let second = tls_connect(gw.addr, &resuming).await.expect("handshake");
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{version:?} resumption"
        );
        assert_eq!(http_request(second, "GET", "/healthz", "").await.0, 200);
    }
}

#[tokio::test]
async fn plaintext_garbage_and_silent_clients_fail_while_others_are_served() {
    let ca = Ca::new();
    let tmp = TempDir::new("bad-clients");
    let issued = ca.issue("bad-clients", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let gw = pubgate_tls(&cert, &key)
        .env("PUBGATE__SERVER__HANDSHAKE_TIMEOUT", "1s")
        .start()
        .await;
    let client = ca.client_config(&[]);

    // A client that connects and says nothing must not hold up anyone else's accept.
    let mut silent = TcpStream::connect(gw.addr).await.expect("connect");
    let started = Instant::now();

    // Plain HTTP on the TLS port: the server answers with a TLS alert (or just closes), never
    // with HTTP.
    let mut plain = TcpStream::connect(gw.addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let reply = read_until_closed(&mut plain, Instant::now(), WAIT).await.0;
    assert!(
        !reply.starts_with(b"HTTP/"),
        "plaintext HTTP was answered in plaintext: {reply:?}"
    );

    // Random bytes.
    let mut garbage = TcpStream::connect(gw.addr).await.expect("connect");
    let noise: Vec<u8> = (0..2048).map(|_| rand::random::<u8>()).collect();
    garbage.write_all(&noise).await.expect("write");
    let _ = read_until_closed(&mut garbage, Instant::now(), WAIT)
        .await
        .0;

    // A TLS client with the wrong trust anchor fails on its side; the server survives that too.
    let stranger = Ca::new().client_config(&[]);
    assert!(tls_connect(gw.addr, &stranger).await.is_err());

    // Meanwhile a good client is served at once.
    let (status, _) = https(gw.addr, &client, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    let (mut ws, _) = wss_connect(gw.addr, &client).await;
    subscribe(&mut ws, "still.serving").await;

    // The silent connection is closed by the handshake timeout (1s), not left open.
    let _ = read_until_closed(&mut silent, Instant::now(), WAIT).await.0;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "silent client closed after {waited:?}"
    );

    let (_, metrics) = https(gw.addr, &client, "GET", "/metrics", "").await;
    let failed = metric(
        &metrics,
        "pubgate_handshake_failures_total{reason=\"tls_handshake\"}",
    )
    .unwrap_or(0.0);
    assert!(failed >= 3.0, "tls_handshake failures counted: {failed}");
    let timed_out = metric(
        &metrics,
        "pubgate_handshake_failures_total{reason=\"tls_timeout\"}",
    )
    .unwrap_or(0.0);
    assert!(timed_out >= 1.0, "tls_timeout counted: {timed_out}");
}

#[tokio::test]
async fn symlink_swap_rotates_certificate_and_keeps_old_connections() {
    let ca = Ca::new();
    let tmp = TempDir::new("rotate");
    let first = ca.issue("gen-1", KeyKind::EcdsaP256);
    let second = ca.issue("gen-2", KeyKind::RsaPkcs8);
    let mut secret = SecretDir::new(&tmp.0, (&first.chain_pem, &first.key_pem));
    let gw = pubgate_tls(&secret.cert(), &secret.key()).start().await;
    let client = ca.client_config(&[]);

    let (mut old_ws, leaf) = wss_connect(gw.addr, &client).await;
    assert_eq!(cn_of(&leaf), "gen-1");
    subscribe(&mut old_ws, "rotation").await;

    secret.swap(&second.chain_pem, &second.key_pem);
    let swapped = Instant::now();
    let (addr, c) = (gw.addr, &client);
    eventually("new handshakes to get gen-2", || async move {
        (served_cn(addr, c).await == "gen-2").then_some(())
    })
    .await;
    let took = swapped.elapsed();
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    let tls = tls_connect(gw.addr, &client).await.expect("connect");
    assert_eq!(peer_leaf(&tls), second.leaf_der);

    // The connection opened under gen-1 is untouched and keeps receiving.
    let (status, _) = https(gw.addr, &client, "POST", "/v1/publish/rotation", "42").await;
    assert_eq!(status, 200);
    let msg = next_json(&mut old_ws).await;
    assert_eq!(msg["data"], 42);

    let (_, metrics) = https(gw.addr, &client, "GET", "/metrics", "").await;
    assert_eq!(
        metric(&metrics, "pubgate_tls_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "pubgate_tls_reloads_total{result=\"error\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&metrics, "pubgate_tls_cert_expiry_timestamp_seconds"),
        Some(second.not_after() as f64)
    );
    assert!(gw.stderr().contains("TLS certificate reloaded"));
}

#[tokio::test]
async fn broken_replacement_keeps_the_old_certificate() {
    let ca = Ca::new();
    let tmp = TempDir::new("broken");
    let good = ca.issue("good", KeyKind::EcdsaP256);
    let other = ca.issue("other", KeyKind::EcdsaP256);
    let fixed = ca.issue("fixed", KeyKind::EcdsaP384);
    let mut secret = SecretDir::new(&tmp.0, (&good.chain_pem, &good.key_pem));
    let gw = pubgate_tls(&secret.cert(), &secret.key()).start().await;
    let client = ca.client_config(&[]);

    // A new certificate with somebody else's key.
    secret.swap(&other.chain_pem, &good.key_pem);
    let (addr, c) = (gw.addr, &client);
    let (_, metrics) = eventually("the reload error to be counted", || async move {
        let (s, m) = https(addr, c, "GET", "/metrics", "").await;
        (metric(&m, "pubgate_tls_reloads_total{result=\"error\"}") == Some(1.0)).then_some((s, m))
    })
    .await;
    assert_eq!(
        metric(&metrics, "pubgate_tls_reloads_total{result=\"ok\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&metrics, "pubgate_tls_cert_expiry_timestamp_seconds"),
        Some(good.not_after() as f64)
    );
    assert_eq!(served_cn(gw.addr, &client).await, "good");
    let log = gw.stderr();
    assert!(
        log.contains("reload failed") && log.contains("does not match"),
        "the error is logged: {log}"
    );

    // Garbage instead of a certificate: still the old pair, one more error, logged once.
    secret.swap("not a certificate\n", &good.key_pem);
    let (addr, c) = (gw.addr, &client);
    eventually("the second reload error", || async move {
        let (_, m) = https(addr, c, "GET", "/metrics", "").await;
        (metric(&m, "pubgate_tls_reloads_total{result=\"error\"}") == Some(2.0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, m) = https(gw.addr, &client, "GET", "/metrics", "").await;
    assert_eq!(
        metric(&m, "pubgate_tls_reloads_total{result=\"error\"}"),
        Some(2.0),
        "a rejected pair is not retried while it stays the same"
    );
    assert_eq!(served_cn(gw.addr, &client).await, "good");

    // A good pair afterwards goes into service.
    secret.swap(&fixed.chain_pem, &fixed.key_pem);
    let (addr, c) = (gw.addr, &client);
    eventually("the fixed pair", || async move {
        (served_cn(addr, c).await == "fixed").then_some(())
    })
    .await;
}

#[tokio::test]
async fn in_place_rewrite_is_picked_up_without_errors() {
    // Not Kubernetes: an operator (or an ACME client) replaces the two files one after the other.
    let ca = Ca::new();
    let tmp = TempDir::new("in-place");
    let first = ca.issue("first", KeyKind::EcdsaP256);
    let second = ca.issue("second", KeyKind::EcSec1);
    let (cert, key) = write_pair(&tmp.0, &first);
    let gw = pubgate_tls(&cert, &key).start().await;
    let client = ca.client_config(&[]);
    assert_eq!(served_cn(gw.addr, &client).await, "first");

    let replace = |path: &std::path::Path, content: &str| {
        let tmp_path = path.with_extension("new");
        std::fs::write(&tmp_path, content).expect("write");
        std::fs::rename(&tmp_path, path).expect("rename");
    };
    // A short gap, so a slow machine cannot stretch it past two polls; the settling logic itself
    // is tested step by step in the unit tests of `gateway::tls`.
    replace(&cert, &second.chain_pem);
    tokio::time::sleep(Duration::from_millis(50)).await;
    replace(&key, &second.key_pem);
    let (addr, c) = (gw.addr, &client);
    eventually("the second pair", || async move {
        (served_cn(addr, c).await == "second").then_some(())
    })
    .await;
    let (_, m) = https(gw.addr, &client, "GET", "/metrics", "").await;
    assert_eq!(
        metric(&m, "pubgate_tls_reloads_total{result=\"error\"}"),
        Some(0.0),
        "a half-written pair is waited out, not reported"
    );
    assert_eq!(
        metric(&m, "pubgate_tls_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn sighup_forces_a_reload_and_does_not_kill() {
    let ca = Ca::new();
    let tmp = TempDir::new("hup");
    let issued = ca.issue("hup", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let mut gw = pubgate_tls(&cert, &key).start().await;
    let client = ca.client_config(&[]);
    // SAFETY: signalling our own child process by its pid.
    let rc = unsafe { libc::kill(gw.pid() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0);
    let (addr, c) = (gw.addr, &client);
    eventually("the forced reload", || async move {
        let (_, m) = https(addr, c, "GET", "/metrics", "").await;
        (metric(&m, "pubgate_tls_reloads_total{result=\"ok\"}") == Some(1.0)).then_some(())
    })
    .await;
    assert!(gw.is_running());
    assert_eq!(served_cn(gw.addr, &client).await, "hup");
}

#[tokio::test]
async fn metrics_listener_stays_plain_beside_tls() {
    let ca = Ca::new();
    let tmp = TempDir::new("metrics");
    let issued = ca.issue("metrics", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let gw = pubgate_tls(&cert, &key).metrics_listener().start().await;
    let maddr = gw.metrics_addr.expect("metrics listener");
    let client = ca.client_config(&[]);

    let (status, body) = http(maddr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&body, "pubgate_tls_cert_expiry_timestamp_seconds"),
        Some(issued.not_after() as f64)
    );
    assert_eq!(
        metric(&body, "pubgate_tls_reloads_total{result=\"ok\"}"),
        Some(0.0)
    );
    assert_eq!(http(maddr, "GET", "/healthz").await.0, 200);
    assert_eq!(http(maddr, "GET", "/readyz").await.0, 200);
    // The private listener serves nothing else, and it does not speak TLS.
    assert_eq!(http(maddr, "GET", "/ws").await.0, 404);
    assert!(tls_connect(maddr, &client).await.is_err());

    // On the public TLS port, /metrics is hidden; probes still answer.
    assert_eq!(https(gw.addr, &client, "GET", "/metrics", "").await.0, 404);
    assert_eq!(https(gw.addr, &client, "GET", "/healthz", "").await.0, 200);
    assert_eq!(https(gw.addr, &client, "GET", "/readyz", "").await.0, 200);
}

#[tokio::test]
async fn plaintext_node_exports_no_tls_metrics() {
    let gw = pubgate().start().await;
    let (status, body) = http(gw.addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(!body.contains("pubgate_tls_"), "TLS metrics without TLS");
}

#[test]
fn start_up_errors_name_the_key_and_file() {
    let ca = Ca::new();
    let tmp = TempDir::new("errors");
    let a = ca.issue("a", KeyKind::EcdsaP256);
    let b = ca.issue("b", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.join("good"), &a);
    let missing = tmp.join("missing.pem");
    let no_pem = tmp.join("no-pem.txt");
    std::fs::write(&no_pem, "this is not PEM at all\n").unwrap();
    let truncated = tmp.join("truncated.pem");
    let chain = a.chain_pem.clone();
    std::fs::write(&truncated, &chain[..chain.len() / 3]).unwrap();
    let bad_der = tmp.join("bad-der.pem");
    std::fs::write(&bad_der, pem_encode("CERTIFICATE", b"definitely not DER")).unwrap();
    let other_key = tmp.join("other.key");
    std::fs::write(&other_key, &b.key_pem).unwrap();

    let cases: Vec<(
        &std::path::Path,
        &std::path::Path,
        &str,
        &std::path::Path,
        &str,
    )> = vec![
        (&missing, &key, "tls.cert", &missing, "cannot read"),
        (&cert, &missing, "tls.key", &missing, "cannot read"),
        (&no_pem, &key, "tls.cert", &no_pem, "no certificate found"),
        (&key, &key, "tls.cert", &key, "no certificate found"),
        (&truncated, &key, "tls.cert", &truncated, "unreadable PEM"),
        (&bad_der, &key, "tls.cert", &bad_der, "not valid X.509"),
        (&cert, &cert, "tls.key", &cert, "no private key found"),
        (&cert, &no_pem, "tls.key", &no_pem, "no private key found"),
        (&cert, &other_key, "tls.key", &other_key, "does not match"),
    ];
    for (c, k, want_key, want_file, want_text) in cases {
        let (status, stdout, stderr) =
            run_to_exit(&["--tls-cert", path_str(c), "--tls-key", path_str(k)]);
        assert_eq!(status.code(), Some(2), "{c:?} {k:?}: a config error");
        assert!(!stdout.contains("listening"), "nothing listens: {stdout}");
        for needle in [want_key, path_str(want_file), want_text] {
            assert!(
                stderr.contains(needle),
                "cert={c:?} key={k:?}: {needle:?} missing in: {stderr}"
            );
        }
    }
    // The OS error is said once, not repeated by the error chain.
    let (_, _, stderr) = run_to_exit(&[
        "--tls-cert",
        path_str(&missing),
        "--tls-key",
        path_str(&key),
    ]);
    assert_eq!(stderr.matches("os error").count(), 1, "{stderr}");

    // The mismatch names both files.
    let (_, _, stderr) = run_to_exit(&[
        "--tls-cert",
        path_str(&cert),
        "--tls-key",
        path_str(&other_key),
    ]);
    assert!(stderr.contains(path_str(&cert)), "{stderr}");

    // Half a pair is a config error naming the missing key.
    let (status, _, stderr) = run_to_exit(&["--tls-cert", path_str(&cert)]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("tls.key"), "{stderr}");
    let (status, _, stderr) = run_to_exit(&["--tls-key", path_str(&key)]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("tls.cert"), "{stderr}");
}

#[tokio::test]
async fn every_supported_key_format_loads_and_serves() {
    let ca = Ca::new();
    let tmp = TempDir::new("formats");
    let cases = [
        (KeyKind::EcdsaP256, "-----BEGIN PRIVATE KEY-----"),
        (KeyKind::EcdsaP384, "-----BEGIN PRIVATE KEY-----"),
        (KeyKind::EcSec1, "-----BEGIN EC PRIVATE KEY-----"),
        (KeyKind::RsaPkcs8, "-----BEGIN PRIVATE KEY-----"),
        (KeyKind::RsaPkcs1, "-----BEGIN RSA PRIVATE KEY-----"),
        (KeyKind::Ed25519, "-----BEGIN PRIVATE KEY-----"),
    ];
    for (kind, label) in cases {
        let issued = ca.issue(&format!("{kind:?}"), kind);
        assert!(issued.key_pem.starts_with(label), "{kind:?} key is {label}");
        let (cert, key) = write_pair(&tmp.join(&format!("{kind:?}")), &issued);
        let gw = pubgate_tls(&cert, &key).start().await;
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            // Ed25519 in TLS 1.2 needs RFC 8422 support on both ends; rustls has it.
            let client = ca.client_config(&[version]);
            let tls = tls_connect(gw.addr, &client)
                .await
                .unwrap_or_else(|e| panic!("{kind:?} over {version:?}: {e}"));
            assert_eq!(peer_leaf(&tls), issued.leaf_der, "{kind:?}");
            let (status, _) = http_request(tls, "GET", "/healthz", "").await;
            assert_eq!(status, 200, "{kind:?}");
        }
    }
}

// -------------------------------------------------------------------------------------------
// Measurements (run by hand): cargo test --release -p gateway --test tls -- --ignored --nocapture
// -------------------------------------------------------------------------------------------

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Most server RSS an idle subscribed `wss://` connection may cost (issue 17's target), unless
/// `PUBGATE_MEASURE_MAX_WSS_BYTES` says otherwise.
const MAX_WSS_BYTES_PER_CONNECTION: usize = 6 * 1024;

/// Server RSS per idle subscribed connection, WSS and (for comparison) plain WS; asserts the WSS
/// target. By default at 19,000 connections (`PUBGATE_MEASURE_CONNS`), which fits this process's
/// limit of 20,000 open files because the server is a child process with its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn measure_idle_connection_memory() {
    let n = env_usize("PUBGATE_MEASURE_CONNS", 19_000);
    let max_wss = env_usize(
        "PUBGATE_MEASURE_MAX_WSS_BYTES",
        MAX_WSS_BYTES_PER_CONNECTION,
    );
    let ca = Ca::new();
    let tmp = TempDir::new("measure-mem");
    let issued = ca.issue("measure", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let client = ca.client_config(&[]);

    let mut wss_per_connection = None;
    for tls in [true, false] {
        let gw = if tls {
            pubgate_tls(&cert, &key).start().await
        } else {
            pubgate().start().await
        };
        // One idle subscribed connection, TLS or not; the sockets stay open while it is held.
        let connect = |topic: String| {
            let client = client.clone();
            let addr = gw.addr;
            async move {
                if tls {
                    let (mut ws, _) = wss_connect(addr, &client).await;
                    subscribe(&mut ws, &topic).await;
                    Box::new(ws) as Box<dyn Send>
                } else {
                    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                        .await
                        .expect("ws");
                    subscribe(&mut ws, &topic).await;
                    Box::new(ws) as Box<dyn Send>
                }
            }
        };
        // Warm up lazily allocated state (allocator arenas, runtime) with a few connections.
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(connect("idle".to_string()).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = gw.rss_kib();
        // 32 at a time: both ends share two cores, and a handshake costs the server ~250 us.
        let topics: Vec<String> = (0..n).map(|i| format!("idle.{}", i % 100)).collect();
        for chunk in topics.chunks(32) {
            let batch = futures_util::future::join_all(chunk.iter().cloned().map(connect)).await;
            held.extend(batch);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = gw.rss_kib();
        let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
        println!(
            "MEASURE {} idle subscribed connections: {n}; server RSS {before} KiB -> {after} KiB; \
             {:.1} KiB per connection ({per:.0} B)",
            if tls { "WSS" } else { "WS (plain)" },
            per / 1024.0
        );
        if tls {
            wss_per_connection = Some(per);
        }
        drop(held);
    }
    let wss = wss_per_connection.expect("measured");
    assert!(
        wss <= max_wss as f64,
        "an idle WSS connection costs {wss:.0} B of server RSS, over the target of {max_wss} B"
    );
}

/// Full TLS handshakes per second against one node, from a few concurrent client tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand"]
async fn measure_handshake_rate() {
    let total = env_usize("PUBGATE_MEASURE_HANDSHAKES", 3000);
    let tasks = env_usize("PUBGATE_MEASURE_TASKS", 4);
    let ca = Ca::new();
    let tmp = TempDir::new("measure-hs");
    for kind in [KeyKind::EcdsaP256, KeyKind::RsaPkcs8] {
        let issued = ca.issue("measure", kind);
        let (cert, key) = write_pair(&tmp.join(&format!("{kind:?}")), &issued);
        let gw = pubgate_tls(&cert, &key).start().await;
        let x25519_only = || rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let variants = [
            (
                "TLS1.3 X25519MLKEM768",
                ca.client_config(&[&rustls::version::TLS13]),
            ),
            (
                "TLS1.3 X25519",
                ca.client_config_provider(&[&rustls::version::TLS13], false, x25519_only()),
            ),
            (
                "TLS1.2 X25519",
                ca.client_config(&[&rustls::version::TLS12]),
            ),
        ];
        for (label, client) in variants {
            let addr = gw.addr;
            let cpu_before = gw.cpu_time();
            let started = Instant::now();
            let mut joins = Vec::new();
            for t in 0..tasks {
                let client = client.clone();
                let count = total / tasks + usize::from(t < total % tasks);
                joins.push(tokio::spawn(async move {
                    for _ in 0..count {
                        let mut tls = tls_connect(addr, &client).await.expect("handshake");
                        // Wait for the server's side to finish too (TLS 1.3 tickets, etc.).
                        let _ = tls.shutdown().await;
                    }
                }));
            }
            for j in joins {
                j.await.expect("task");
            }
            let secs = started.elapsed().as_secs_f64();
            let server_cpu = (gw.cpu_time() - cpu_before).as_secs_f64();
            println!(
                "MEASURE {kind:?} {label}: {total} full handshakes over {tasks} tasks in {secs:.2}s \
                 = {:.0}/s wall (client in the same 2 cores); server CPU {:.0} us/handshake \
                 = {:.0}/s per core",
                total as f64 / secs,
                server_cpu * 1e6 / total as f64,
                total as f64 / server_cpu.max(1e-9),
            );
        }
    }
}

#[tokio::test]
async fn sigterm_closes_wss_clients_with_1001() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let ca = Ca::new();
    let tmp = TempDir::new("drain");
    let issued = ca.issue("drain", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let mut gw = pubgate_tls(&cert, &key)
        .env("PUBGATE__DRAIN__GRACE", "3s")
        .start()
        .await;
    let client = ca.client_config(&[]);
    let (mut ws, _) = wss_connect(gw.addr, &client).await;
    subscribe(&mut ws, "drain").await;

    // SAFETY: signalling our own child process by its pid.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, libc::SIGTERM) }, 0);
    let close = tokio::time::timeout(WAIT, async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Close(frame)) = msg {
                return frame;
            }
        }
        None
    })
    .await
    .expect("a close frame within the wait")
    .expect("the close frame has a code");
    assert_eq!(u16::from(close.code), 1001);
    eventually("the node to exit", || {
        let running = gw.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
}

/// `tls.max_handshakes`: while that many handshakes are under way, a new connection is closed at
/// once (counted as `tls_busy`); when they end, handshakes are served again.
#[tokio::test]
async fn handshakes_past_the_limit_are_refused_until_some_finish() {
    let ca = Ca::new();
    let tmp = TempDir::new("max-handshakes");
    let issued = ca.issue("max-handshakes", KeyKind::EcdsaP256);
    let (cert, key) = write_pair(&tmp.0, &issued);
    let gw = pubgate_tls(&cert, &key)
        .env("PUBGATE__TLS__MAX_HANDSHAKES", "2")
        .start()
        .await;
    let client = ca.client_config(&[]);

    // Two clients that connect and say nothing hold both handshake slots.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // Give the accept loop a moment to take them (it takes microseconds).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = tls_connect(gw.addr, &client).await;
    assert!(refused.is_err(), "a third handshake was served");

    // The slots come back when those clients leave.
    drop(silent);
    eventually("a handshake is served again", || async {
        tls_connect(gw.addr, &client).await.ok()
    })
    .await;
    let (_, metrics) = https(gw.addr, &client, "GET", "/metrics", "").await;
    let busy = metric(
        &metrics,
        "pubgate_handshake_failures_total{reason=\"tls_busy\"}",
    )
    .unwrap_or(0.0);
    assert!(busy >= 1.0, "tls_busy counted: {busy}");
}
