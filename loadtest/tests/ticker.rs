//! `pubgate-loadtest ticker` against a real `pubgate` (found as described in `support/mod.rs`) run
//! with the configuration the scenario prints: a short price ticker whose slow dashboards must be
//! conflated and still end on every final value, while the fast ones get every message.

mod support;

use support::{Server, run_tool, run_tool_status, tmp};

/// The node configuration, as the tool prints it (deploy/bench/ticker.toml), in a temporary file.
fn config_file() -> std::path::PathBuf {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pubgate-loadtest"))
        .args(["ticker", "--print-config"])
        .output()
        .expect("run pubgate-loadtest ticker --print-config");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.contains("slow_consumer = \"conflate\""), "{text}");
    let path = tmp("ticker-config").with_extension("toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

#[test]
fn short_ticker_conflates_slow_dashboards_and_loses_nothing_for_fast_ones() {
    let config = config_file();
    let server = Server::start_args(&["--config", config.to_str().expect("path")], &[]);
    let _ = std::fs::remove_file(&config);
    let url = format!("ws://{}/ws", server.addr);
    let pid = server.pid();
    let json = tmp("ticker");
    // 1,000 topics at 5,000 ticks/s for 2 s (10,000 ticks in batches of 100); 2 fast dashboards
    // and 2 that read at most 1,000 frames/s through a small socket buffer. A topic changes every
    // 200 ms, so a fast dashboard would have to stall that long on a busy machine to be conflated.
    // Ticks of 2 KB: the node only sees a dashboard fall behind once the kernel's send buffer of
    // its socket is full (it grows to 4 MB on loopback, see docs/benchmarks.md), and 2 s of 2 KB
    // ticks (20 MB) fill it whatever the machine's load.
    let r = run_tool(
        &[
            "ticker",
            "--url",
            &url,
            "--server-pid",
            &pid,
            "--topics",
            "1000",
            "--rate",
            "5000",
            "--duration",
            "2",
            "--dashboards",
            "4",
            "--slow",
            "2",
            "--slow-rate",
            "1000",
            "--payload",
            "2000",
            "--catchup-timeout",
            "30",
        ],
        &json,
    );
    let _ = std::fs::remove_file(&json);
    assert_eq!(r["scenario"], "ticker");
    assert!(r.get("failures").is_none(), "{:#}", r["failures"]);
    let res = &r["result"];
    let feed = &res["feed"];
    assert_eq!(feed["ok"], 10_000, "{feed:#}");
    assert_eq!(feed["sent"], 10_000, "{feed:#}");
    let (fast, slow) = (&res["fast"], &res["slow"]);
    // Fast dashboards: every tick, in order.
    assert_eq!(fast["dashboards"], 2, "{fast:#}");
    assert_eq!(fast["frames"], 20_000, "{fast:#}");
    assert_eq!(fast["lost"], 0, "{fast:#}");
    assert_eq!(fast["skipped"], 0, "{fast:#}");
    assert_eq!(fast["violations"], 0, "{fast:#}");
    // Slow dashboards: fewer frames, offsets only growing, every final value held.
    assert_eq!(slow["dashboards"], 2, "{slow:#}");
    assert_eq!(slow["violations"], 0, "{slow:#}");
    assert_eq!(slow["behind_topics"], 0, "{slow:#}");
    assert!(slow["caught_up_ms"].is_number(), "{slow:#}");
    let slow_frames = slow["frames"].as_u64().expect("frames");
    let skipped = slow["skipped"].as_u64().expect("skipped");
    assert!(skipped > 0, "slow dashboards were conflated: {slow:#}");
    // What a slow dashboard did not get, it skipped: the two add up to every tick, per dashboard.
    assert_eq!(slow_frames + skipped, 20_000, "{slow:#}");
    for d in res["dashboards"].as_array().expect("rows") {
        assert_eq!(d["end"], "stopped", "{d:#}");
        assert_eq!(d["behind_topics"], 0, "{d:#}");
    }
    // The node counted conflations too.
    let server = &res["server"];
    assert!(
        server["conflated"].as_f64().expect("scraped") > 0.0,
        "{server:#}"
    );
    assert!(server["us_per_delivery"].as_f64().is_some(), "{server:#}");
    assert!(
        server["memory"]["rss_peak_kib"].as_u64().expect("rss") > 0,
        "{server:#}"
    );
}

#[test]
fn without_conflation_a_slow_dashboard_is_cut_off_and_the_run_fails() {
    // The default configuration (no namespace, anyone may publish and subscribe): nothing is
    // conflated, so a dashboard that reads slowly overflows its queue of 64 frames and is
    // disconnected (slow consumer), which the run reports as a failure.
    let server = Server::start_with(&[("PUBGATE__LIMITS__SEND_QUEUE_FRAMES", "64")]);
    let url = format!("ws://{}/ws", server.addr);
    let (ok, stderr) = run_tool_status(
        &[
            "ticker",
            "--url",
            &url,
            "--topics",
            "50",
            "--rate",
            "5000",
            "--duration",
            "1",
            "--dashboards",
            "2",
            "--slow",
            "1",
            "--slow-rate",
            "100",
            "--catchup-timeout",
            "3",
        ],
        None,
    );
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("FAILED: dashboard 0 (slow): ended before the run did: server_closed_1008"),
        "{stderr}"
    );
}
