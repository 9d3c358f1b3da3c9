//! Helpers for the tests that run `pubgate-loadtest` against real processes on loopback: a
//! `pubgate` node, a `redis-server`, and the tool itself, each bounded in time and stopped by PID.
//!
//! The server binary is found, in this order, at:
//! 1. `$PUBGATE_BIN`;
//! 2. `<target>/debug/pubgate` (what `cargo build -p gateway` or `cargo test --workspace` builds),
//!    then `<target>/release/pubgate`, where `<target>` is `$CARGO_TARGET_DIR` or the workspace's.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `pubgate` binary to test against.
pub fn pubgate_bin() -> PathBuf {
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

/// Stops a child we started: SIGKILL by its PID, then reap it.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A pubgate process on a free loopback port, killed on drop.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Server {
    /// A node with the default configuration.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A node with extra `PUBGATE__…` environment settings.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        Server::start_args(&[], env)
    }

    /// A node with extra command-line arguments (`--config FILE`) and environment settings.
    pub fn start_args(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(pubgate_bin());
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("PUBGATE__LOG__LEVEL", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start pubgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read pubgate's first line");
        let Some(addr) = line.trim().strip_prefix("pubgate listening on ") else {
            stop(&mut child);
            panic!("unexpected first line: {line:?}");
        };
        Server {
            addr: addr.to_string(),
            child,
        }
    }

    /// The PID, as an argument.
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Waits (bounded) until `GET /readyz` over plain HTTP answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if http_status(&self.addr, "/readyz") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pubgate on {} did not become ready", self.addr);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// The status of a plain `GET path` on `addr`, if it answered.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A `redis-server` on a free loopback port without persistence, killed by PID on drop.
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
}

impl Redis {
    /// Starts it and waits (bounded) until it answers.
    pub fn start() -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let r = Redis { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if r.ping() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} did not start");
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Its PID (for `--broker-pid`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Runs the tool (bounded: 120 s) with `--quiet --json FILE`; asserts it succeeded and returns the
/// JSON it wrote.
pub fn run_tool(args: &[&str], json: &Path) -> serde_json::Value {
    let (ok, stderr) = run_tool_status(args, Some(json));
    assert!(ok, "pubgate-loadtest failed: {stderr}");
    serde_json::from_str(&std::fs::read_to_string(json).expect("result file")).expect("json")
}

/// Runs the tool (bounded: 120 s); whether it succeeded, and its stderr.
pub fn run_tool_status(args: &[&str], json: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubgate-loadtest"));
    cmd.args(args).arg("--quiet");
    if let Some(j) = json {
        cmd.arg("--json").arg(j);
    }
    let err_path = tmp(&format!("stderr-{}", args.first().unwrap_or(&"x")));
    let err_file = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .expect("start pubgate-loadtest");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            stop(&mut child);
            panic!("pubgate-loadtest did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    (status.success(), stderr)
}

/// A temporary path, unique within this process (tests run in parallel).
pub fn tmp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "pubgate-loadtest-{}-{n}-{name}.json",
        std::process::id()
    ))
}
