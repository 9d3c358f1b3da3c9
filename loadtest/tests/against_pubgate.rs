//! Runs `pubgate-loadtest` against a real `pubgate` binary on loopback.
//!
//! The server binary is found, in this order, at:
//! 1. `$PUBGATE_BIN`;
//! 2. `<workspace>/target/debug/pubgate` (what `cargo build -p gateway` or
//!    `cargo test --workspace` builds), then `<workspace>/target/release/pubgate`.
//!
//! So `cargo build -p gateway && cargo test -p loadtest` works, and so does `cargo test --workspace`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn pubgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PUBGATE_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("pubgate");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "pubgate binary not found under {}: run `cargo build -p gateway` first or set PUBGATE_BIN",
        target.display()
    );
}

/// A pubgate process on a free loopback port, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(pubgate_bin())
            .args(["--listen", "127.0.0.1:0"])
            .env("PUBGATE__LOG__LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pubgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read pubgate's first line");
        let addr = line
            .trim()
            .strip_prefix("pubgate listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_tool(args: &[&str], json: &std::path::Path) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubgate-loadtest"));
    cmd.args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(json)
        .stdout(Stdio::null());
    let mut child = cmd.spawn().expect("start pubgate-loadtest");
    // Bounded: the tool stops by itself well within this.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("pubgate-loadtest did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "pubgate-loadtest failed: {status}");
    serde_json::from_str(&std::fs::read_to_string(json).expect("result file")).expect("json")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "pubgate-loadtest-{}-{name}.json",
        std::process::id()
    ))
}

#[test]
fn tiny_fanout_loses_nothing() {
    let server = Server::start();
    let url = format!("ws://{}/ws", server.addr);
    let pid = server.child.id().to_string();
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
fn small_connect_reports_memory_and_limits() {
    let server = Server::start();
    let url = format!("ws://{}/ws", server.addr);
    let pid = server.child.id().to_string();
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
