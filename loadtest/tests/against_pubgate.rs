//! Runs `pubgate-loadtest` against a real `pubgate` binary on loopback (found as described in
//! `support/mod.rs`): `cargo build -p gateway && cargo test -p loadtest` works, and so does
//! `cargo test --workspace`.

mod support;

use std::process::Command;

use support::{Server, run_tool, tmp};

#[test]
fn tiny_fanout_loses_nothing() {
    let server = Server::start();
    let url = format!("ws://{}/ws", server.addr);
    let pid = server.pid();
    let json = tmp("fanout");
    // 20 subscribers over 4 topics (5 each), 200 messages: 1,000 deliveries.
    let r = run_tool(
        &[
            "fanout",
            "--url",
            &url,
            "--server-pid",
            &pid,
            "--subscribers",
            "20",
            "--topics",
            "4",
            "--rate",
            "100",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--payload",
            "128",
            "--drain",
            "5",
        ],
        &json,
    );
    let _ = std::fs::remove_file(&json);
    assert_eq!(r["scenario"], "fanout");
    let res = &r["result"];
    assert_eq!(res["subscribers_established"], 20, "{res:#}");
    let p = &res["phase"];
    assert_eq!(p["publish"]["ok"], 200, "{p:#}");
    assert_eq!(p["expected"], 1000, "{p:#}");
    assert_eq!(p["delivered"], 1000, "{p:#}");
    assert_eq!(p["lost"], 0, "{p:#}");
    assert_eq!(p["counters"]["duplicates"], 0, "{p:#}");
    assert_eq!(p["counters"]["late"], 0, "{p:#}");
    assert_eq!(p["counters"]["bad_frames"], 0, "{p:#}");
    assert!(p["latency"]["count"].as_u64() == Some(1000), "{p:#}");
    assert!(p["server_us_per_delivery"].as_f64().is_some(), "{p:#}");
}

#[test]
fn tiny_fanout_with_deflate_inflates_and_checks_every_message() {
    let server = Server::start();
    let url = format!("ws://{}/ws", server.addr);
    let pid = server.pid();
    let json = tmp("fanout-deflate");
    // 10 subscribers over 2 topics, 100 messages of 600 bytes (over compression.min_size).
    let r = run_tool(
        &[
            "fanout",
            "--url",
            &url,
            "--server-pid",
            &pid,
            "--deflate",
            "--subscribers",
            "10",
            "--topics",
            "2",
            "--rate",
            "50",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--payload",
            "600",
            "--drain",
            "5",
        ],
        &json,
    );
    let _ = std::fs::remove_file(&json);
    let res = &r["result"];
    assert_eq!(res["subscribers_established"], 10, "{res:#}");
    let p = &res["phase"];
    assert_eq!(p["expected"], 500, "{p:#}");
    assert_eq!(p["delivered"], 500, "{p:#}");
    assert_eq!(p["counters"]["bad_frames"], 0, "{p:#}");
    assert_eq!(p["counters"]["duplicates"], 0, "{p:#}");
    // A plain frame would be more than the 600-byte payload; compressed it is far less.
    let wire = p["wire_bytes_per_delivery"].as_f64().unwrap();
    assert!(wire > 50.0 && wire < 450.0, "{wire} B/delivery: {p:#}");
}

#[test]
fn small_connect_reports_memory_and_limits() {
    let server = Server::start();
    let url = format!("ws://{}/ws", server.addr);
    let pid = server.pid();
    let json = tmp("connect");
    let r = run_tool(
        &[
            "connect",
            "--url",
            &url,
            "--server-pid",
            &pid,
            "--connections",
            "50",
            "--hold",
            "1",
            "--settle",
            "0.5",
            "--source-ips",
            "2",
        ],
        &json,
    );
    let _ = std::fs::remove_file(&json);
    let res = &r["result"];
    assert_eq!(res["established"], 50, "{res:#}");
    assert_eq!(res["alive_at_end_of_hold"], 50, "{res:#}");
    assert!(res["servers"][0]["open_files_limit"].is_array(), "{res:#}");
    assert!(res["server_rss_per_conn_bytes"].is_number(), "{res:#}");
}

#[test]
fn refuses_more_connections_than_one_process_can_hold() {
    let out = Command::new(env!("CARGO_BIN_EXE_pubgate-loadtest"))
        .args([
            "connect",
            "--url",
            "ws://127.0.0.1:9/ws",
            "--connections",
            "100000000",
            "--quiet",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RLIMIT_NOFILE") && err.contains("--procs"),
        "{err}"
    );
}

#[test]
fn refuses_non_loopback_targets() {
    let out = Command::new(env!("CARGO_BIN_EXE_pubgate-loadtest"))
        .args([
            "connect",
            "--url",
            "ws://192.0.2.1:80/ws",
            "--connections",
            "1",
            "--quiet",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
