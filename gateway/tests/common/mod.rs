//! Shared harness for pubgate's integration tests.
//!
//! Every test runs the real `pubgate` binary over real loopback sockets; nothing is mocked. The pieces:
//!
//! - [`Server`] / [`ServerBuilder`]: start `pubgate --listen 127.0.0.1:0` with extra flags and env,
//!   wait for its `pubgate listening on ADDR` line, and stop exactly that process (by PID, SIGTERM
//!   then SIGKILL) when dropped. Its stderr is kept for debugging and printed when a test panics.
//!   [`ServerBuilder::run_to_exit`] runs a process that is expected to stop by itself (bad config).
//! - [`WsClient`]: a tokio-tungstenite client with JSON helpers (`send_json`, `recv_json` with a
//!   deadline, `expect_close`, `expect_silence`, `subscribe`, …).
//! - [`RawWs`]: a hand-written client for what a well-behaved library will not do: send raw (masked)
//!   frames, fragments, invalid UTF-8, never read, never answer pings or close frames;
//!   [`RawWs::into_split`] to write a flood from one task while another reads.
//! - [`HttpClient`] (hyper 1, keep-alive) and the one-shot [`http_get`] / [`http_post`].
//! - [`Metrics`] / [`Server::metrics`]: scrape `/metrics` and read one series.
//! - [`proc_status_kib`], [`Server::rss_kib`], [`Server::peak_rss_kib`]: memory from `/proc`;
//!   [`Server::cpu_time`], [`Server::open_fds`]: CPU time and open descriptors.
//! - [`ServerBuilder::nofile_limit`] starts the server with a lowered `RLIMIT_NOFILE`;
//!   [`raise_nofile_limit`] lifts the test process's own soft limit for floods of sockets.
//! - [`wait_until`] / [`Server::wait_metric`]: poll a condition with a deadline (never sleep-and-hope).
//!
//! Each test should start its own server: ports are picked by the kernel (port 0) and tests run in
//! parallel. Timeouts are generous because CI machines are small and shared; a deadline only decides
//! how long a *failing* test takes, a passing test returns as soon as its condition holds.
//!
//! `PUBGATE_TEST_BIN=/path/to/pubgate` runs the suite against another binary (a release build, an
//! older commit). `PUBGATE__*` and `RUST_LOG` from the caller's environment never reach the server;
//! set them per test with [`ServerBuilder::env`] (e.g. `PUBGATE__LOG__LEVEL=gateway=debug` while
//! debugging; the log is printed when the test fails).
//!
//! ```ignore
//! mod common;
//! use common::{HttpClient, Server};
//!
//! #[tokio::test]
//! async fn example() {
//!     let server = Server::builder()
//!         .env("PUBGATE__LIMITS__MAX_SUBSCRIPTIONS", "2")
//!         .start()
//!         .await;
//!     let mut client = server.ws().await;
//!     let ack = client.subscribe("scores.nba", 1).await;
//!     HttpClient::connect(server.addr).await.publish("scores.nba", r#"{"home":3}"#).await;
//!     let msg = client.recv().await;
//!     assert_eq!(msg["offset"], ack["offset"].as_u64().unwrap() + 1);
//! }
//! ```

// Each test binary compiles this module and uses a different subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a server may take to print its listening line (a cold debug binary on a loaded machine).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for one expected reply or message.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Server`]'s drop waits after SIGTERM before it sends SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Drain grace the harness sets (as `PUBGATE__DRAIN__GRACE`) unless a test sets that variable itself
/// or calls [`ServerBuilder::without_harness_grace`], so that tearing a server down with clients
/// still attached does not take the default 30 s.
pub const HARNESS_DRAIN_GRACE: &str = "3s";

/// Path of the binary under test: `$PUBGATE_TEST_BIN` when set (e.g. to run the suite against a
/// release build), else the `pubgate` cargo built for this test run.
pub fn pubgate_bin() -> String {
    std::env::var("PUBGATE_TEST_BIN")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_pubgate").to_string())
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Builds the command line and environment of one `pubgate` process.
#[derive(Clone, Debug, Default)]
pub struct ServerBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    metrics_listener: bool,
    no_listen_flag: bool,
    no_harness_grace: bool,
    nofile_limit: Option<u64>,
    kill_on_drop: bool,
}

/// Output of a process that ended by itself (see [`ServerBuilder::run_to_exit`]).
#[derive(Debug)]
pub struct Finished {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl ServerBuilder {
    /// A server on `127.0.0.1:0` with built-in defaults (plus [`HARNESS_DRAIN_GRACE`]).
    pub fn new() -> Self {
        ServerBuilder::default()
    }

    /// Adds one command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the process (e.g. `PUBGATE__LIMITS__MAX_SUBSCRIPTIONS`).
    /// A later call with the same key wins.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Also opens the separate metrics listener (`--metrics-listen 127.0.0.1:0`); its address is then
    /// [`Server::metrics_addr`], and `/metrics` is served only there.
    pub fn metrics_listener(mut self) -> Self {
        self.metrics_listener = true;
        self
    }

    /// Does not pass `--listen 127.0.0.1:0` (for tests of the `--listen` flag itself).
    pub fn without_listen_flag(mut self) -> Self {
        self.no_listen_flag = true;
        self
    }

    /// Does not set `PUBGATE__DRAIN__GRACE` (env beats the TOML file, so a test that sets
    /// `drain.grace` in a `--config` file needs this). [`ServerBuilder::run_to_exit`] never sets it.
    pub fn without_harness_grace(mut self) -> Self {
        self.no_harness_grace = true;
        self
    }

    /// Starts the process with `RLIMIT_NOFILE` lowered to `limit` (soft and hard), as
    /// `prlimit --nofile=N:N` would, for tests of what happens when accept(2) fails with EMFILE.
    pub fn nofile_limit(mut self, limit: u64) -> Self {
        self.nofile_limit = Some(limit);
        self
    }

    /// Makes dropping the [`Server`] kill the process at once (SIGKILL, no drain) and accept that it
    /// may have ended by itself, for nodes that tests stop, kill and restart at will (a crashed
    /// machine in a cluster) and for servers that only serve a handshake or a measurement.
    pub fn kill_on_drop(mut self) -> Self {
        self.kill_on_drop = true;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(pubgate_bin());
        if let Some(limit) = self.nofile_limit {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            // SAFETY: the closure runs in the child between fork and exec; it only makes the
            // setrlimit system call (async-signal-safe) and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // The developer's own settings must not leak into the process under test.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.to_ascii_uppercase().starts_with("PUBGATE") || k == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        if !self.no_harness_grace {
            cmd.env("PUBGATE__DRAIN__GRACE", HARNESS_DRAIN_GRACE);
        }
        // Plain log lines without ANSI colours, so stderr in a failure report is readable.
        cmd.env("NO_COLOR", "1");
        if !self.no_listen_flag {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if self.metrics_listener {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the process and waits until it listens. Panics (with the process's stderr) when it
    /// exits or stays silent for [`STARTUP_TIMEOUT`].
    pub async fn start(self) -> Server {
        let mut child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", pubgate_bin()));
        let pid = child.id();
        let stderr = collect_stderr(&mut child);
        let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_addr: None,
            stderr,
            exit: None,
            kill_on_drop: self.kill_on_drop,
        };
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let wanted = 1 + usize::from(self.metrics_listener);
        let mut found = 0;
        while found < wanted {
            let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let status = server.wait_exit(Duration::from_secs(5)).await;
                    panic!(
                        "pubgate exited before listening ({status:?}); args {:?}; stderr:\n{}",
                        self.args,
                        server.stderr()
                    );
                }
                Err(_) => panic!(
                    "pubgate printed no listening line within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    server.stderr()
                ),
            };
            if let Some(addr) = line.strip_prefix("pubgate listening on ") {
                server.addr = addr
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}"));
                found += 1;
            } else if let Some(addr) = line.strip_prefix("pubgate metrics listening on ") {
                server.metrics_addr = Some(
                    addr.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("bad metrics listening line {line:?}: {e}")),
                );
                found += 1;
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        server
    }

    /// Runs a process that is expected to end by itself within `timeout` (e.g. a bad config) and
    /// returns its exit status and output. Panics if it is still running then (after killing it).
    pub async fn run_to_exit(mut self, timeout: Duration) -> Finished {
        // The harness's grace default would hide a bad `drain.grace` in a config file.
        self.no_harness_grace = true;
        let mut child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", pubgate_bin()));
        let stderr = collect_stderr(&mut child);
        let stdout = Arc::new(Mutex::new(String::new()));
        if let Some(mut out) = child.stdout.take() {
            let sink = stdout.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = out.read_to_string(&mut s);
                lock(&sink).push_str(&s);
            });
        }
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < timeout => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(None) => {
                    // Not reaped yet, so the PID is still ours.
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "pubgate with args {:?} env {:?} was still running after {timeout:?}; stderr:\n{}",
                        self.args,
                        self.env,
                        lock(&stderr)
                    );
                }
                Err(e) => panic!("cannot wait for pubgate: {e}"),
            }
        };
        // The reader threads finish at EOF, right after the process ends; give them a moment.
        let grace = Instant::now();
        while grace.elapsed() < Duration::from_secs(2)
            && (Arc::strong_count(&stderr) > 1 || Arc::strong_count(&stdout) > 1)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stdout = lock(&stdout).clone();
        let stderr = lock(&stderr).clone();
        Finished {
            status,
            stdout,
            stderr,
        }
    }
}

/// Collects the child's stderr in the background; the thread holds a clone of the `Arc` until EOF.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    if let Some(err) = child.stderr.take() {
        let sink = buf.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(err);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => lock(&sink).push_str(&line),
                }
            }
        });
    }
    buf
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `pubgate` process. Dropping it stops that process: SIGTERM, then SIGKILL after
/// [`STOP_TIMEOUT`]. If the process died by itself during the test, the drop panics (unless the test
/// is already panicking) so crashes never go unnoticed; tests that stop it on purpose use
/// [`Server::sigterm`] + [`Server::wait_exit`]. Started with [`ServerBuilder::kill_on_drop`], the drop
/// just kills and reaps it.
pub struct Server {
    child: Child,
    pid: u32,
    /// The main listener (WebSocket + HTTP API).
    pub addr: SocketAddr,
    /// The separate metrics listener, when started with [`ServerBuilder::metrics_listener`].
    pub metrics_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
    kill_on_drop: bool,
}

impl Server {
    /// Starts a server with defaults.
    pub async fn start() -> Server {
        ServerBuilder::new().start().await
    }

    /// A builder for a server with extra flags or env.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn probe_addr(&self) -> SocketAddr {
        self.metrics_addr.unwrap_or(self.addr)
    }

    /// Everything the process printed on stderr so far (its logs).
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// The last `n` lines of stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let all = self.stderr();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process is still running (reaps it if it ended).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(status);
                false
            }
            _ => true,
        }
    }

    /// Sends a signal to this process, if it has not been reaped (so the PID is still ours).
    pub fn signal(&mut self, signal: libc::c_int) {
        if !self.is_running() {
            return;
        }
        let pid = libc::pid_t::try_from(self.pid).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the PID belongs to our unreaped child.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Sends SIGTERM (start draining).
    pub fn sigterm(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if !self.is_running() {
                return self.exit;
            }
            if started.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Panics with the server's stderr if the process is no longer running.
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            panic!(
                "pubgate (pid {}) is not running: {:?}; stderr:\n{}",
                self.pid,
                self.exit,
                self.stderr_tail(50)
            );
        }
    }

    /// Resident set size of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS")
            .unwrap_or_else(|| panic!("no VmRSS for pid {}", self.pid))
    }

    /// Peak resident set size of the process so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM")
            .unwrap_or_else(|| panic!("no VmHWM for pid {}", self.pid))
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        proc_cpu_time(self.pid).unwrap_or_else(|| panic!("no /proc/{}/stat", self.pid))
    }

    /// File descriptors the process holds open now (entries of `/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("cannot list /proc/{}/fd: {e}", self.pid))
    }

    /// Scrapes `/metrics` (on the metrics listener when there is one).
    pub async fn metrics(&self) -> Metrics {
        let r = http_get(self.probe_addr(), "/metrics").await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        Metrics { text: r.body }
    }

    /// Scrapes `/metrics` and reads one series (see [`Metrics::value`]; panics when it is absent).
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics().await.value(series)
    }

    /// Polls `/metrics` until `series` (see [`Metrics::get`]; absent counts as 0) satisfies `ok`, and
    /// returns its value. Panics with the last value after `timeout`.
    pub async fn wait_metric(
        &self,
        series: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let started = Instant::now();
        loop {
            let v = self.metrics().await.value_or_zero(series);
            if ok(v) {
                return v;
            }
            if started.elapsed() >= timeout {
                panic!(
                    "metric {series} never met the condition within {timeout:?}; last value {v}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Opens a WebSocket client on `/ws`.
    pub async fn ws(&self) -> WsClient {
        WsClient::connect(self.addr).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "---- pubgate (pid {}) stderr, last 80 lines ----\n{}\n----",
                self.pid,
                self.stderr_tail(80)
            );
        }
        if self.exit.is_some() {
            return;
        }
        if self.kill_on_drop {
            // Not reaped yet, so the PID is still ours.
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exit = Some(status);
            if !panicking {
                panic!(
                    "pubgate (pid {}) exited on its own during the test with {status}; stderr:\n{}",
                    self.pid,
                    self.stderr_tail(80)
                );
            }
            return;
        }
        // Still running and not reaped: the PID is ours to signal.
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: see Server::signal.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let started = Instant::now();
        while started.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A field of `/proc/PID/status` given in kB (`VmRSS`, `VmHWM`, …).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU time (utime + stime) of a process from `/proc/PID/stat`.
pub fn proc_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (children started afterwards
/// inherit it), for tests that hold thousands of sockets; returns the soft limit now in force.
pub fn raise_nofile_limit() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            panic!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// A fresh directory under the system temp dir, removed (with everything in it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `pubgate-TAG-PID-RANDOM`.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "pubgate-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file in a fresh [`TempDir`], removed on drop.
pub struct TempFile {
    _dir: TempDir,
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new file named `name`.
    pub fn new(name: &str, contents: &str) -> TempFile {
        let dir = TempDir::new("test");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        TempFile { _dir: dir, path }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a string, for command-line arguments.
    pub fn arg(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

/// A free loopback port for a server a test starts with a fixed address (a node restarted on the
/// same port, Redis, HAProxy). Taken below the kernel's ephemeral range (and checked by binding
/// it), so an outgoing connection cannot grab it before the server binds it.
pub fn free_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|low| *low > 12_000)
        .unwrap_or(32_768);
    for _ in 0..1000 {
        let port = 10_000 + rand::random::<u16>() % (low - 10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// Calls `f` every `every` until it returns `Some`, for at most `timeout` (it is called once more at
/// the deadline); `None` when it never did. The one polling loop behind [`wait_until`] and the
/// Redis and TLS helpers' `eventually`.
pub async fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let done = poll_until(timeout, Duration::from_millis(20), async || {
        check().await.then_some(())
    })
    .await;
    if done.is_none() {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (tokio-tungstenite)
// ---------------------------------------------------------------------------------------------

/// What a [`WsClient`] read next.
#[derive(Debug)]
pub enum Event {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A server ping (tungstenite answers it by itself).
    Ping,
    /// A pong.
    Pong,
    /// A close frame: code and reason (`None`: a close frame without a code).
    Close(Option<(u16, String)>),
    /// The stream ended or failed without a close frame.
    Ended(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// A WebSocket client for the pub/sub protocol.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Server pings seen so far.
    pub pings: usize,
}

impl WsClient {
    /// Connects to `ws://addr/ws`; panics on failure.
    pub async fn connect(addr: SocketAddr) -> WsClient {
        let url = format!("ws://{addr}/ws");
        match tokio::time::timeout(RECV_TIMEOUT, WsClient::try_connect(&url)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("WebSocket connect to {url} failed: {e}"),
            Err(_) => panic!("WebSocket connect to {url} timed out"),
        }
    }

    /// Connects to a URL.
    pub async fn try_connect(url: &str) -> Result<WsClient, tungstenite::Error> {
        let (ws, _response) = tokio_tungstenite::connect_async(url).await?;
        Ok(WsClient { ws, pings: 0 })
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::binary(data.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("send binary: {e}"));
    }

    /// Sends a close frame with `code` (does not wait for the reply).
    pub async fn send_close(&mut self, code: u16) {
        let frame = tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: "".into(),
        };
        self.ws
            .send(Message::Close(Some(frame)))
            .await
            .unwrap_or_else(|e| panic!("send close: {e}"));
    }

    /// Reads the next event, waiting at most `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        match tokio::time::timeout(timeout, self.ws.next()).await {
            Err(_) => Event::Timeout,
            Ok(None) => Event::Ended("stream ended".into()),
            Ok(Some(Err(e))) => Event::Ended(e.to_string()),
            Ok(Some(Ok(m))) => match m {
                Message::Text(t) => Event::Text(t.as_str().to_owned()),
                Message::Binary(b) => Event::Binary(b.to_vec()),
                Message::Ping(_) => {
                    self.pings += 1;
                    Event::Ping
                }
                Message::Pong(_) => Event::Pong,
                Message::Close(c) => {
                    Event::Close(c.map(|c| (u16::from(c.code), c.reason.as_str().to_owned())))
                }
                Message::Frame(_) => Event::Ended("unexpected raw frame".into()),
            },
        }
    }

    /// Next text message within `timeout`, skipping pings and pongs; panics on anything else.
    pub async fn recv_text(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Text(t) => return t,
                Event::Ping | Event::Pong => continue,
                Event::Timeout => panic!("no text message within {timeout:?}"),
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Next text message parsed as JSON (see [`WsClient::recv_text`]).
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        let text = self.recv_text(timeout).await;
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"))
    }

    /// Next text message within [`RECV_TIMEOUT`], as JSON.
    pub async fn recv(&mut self) -> Value {
        self.recv_json(RECV_TIMEOUT).await
    }

    /// Sends `request` and returns the next message.
    pub async fn request(&mut self, request: &Value) -> Value {
        self.send_json(request).await;
        self.recv().await
    }

    /// Reads until a close frame arrives (skipping anything else) and asserts its code; returns the
    /// reason. Panics if the connection ends without one or nothing comes within `timeout`.
    pub async fn expect_close(&mut self, code: u16, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut skipped = 0usize;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Close(Some((c, reason))) => {
                    assert_eq!(c, code, "close code (reason {reason:?})");
                    return reason;
                }
                Event::Close(None) => panic!("close frame without a code, expected {code}"),
                Event::Ended(e) => {
                    panic!("connection ended without a close frame (expected {code}): {e}")
                }
                Event::Timeout => panic!(
                    "no close frame within {timeout:?} (expected {code}; {skipped} other frames seen)"
                ),
                _ => skipped += 1,
            }
        }
    }

    /// Asserts that no text or binary message arrives for `window` (pings are fine).
    pub async fn expect_silence(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next_event(left).await {
                Event::Timeout => return,
                Event::Ping | Event::Pong => continue,
                other => panic!("expected silence for {window:?}, got {other:?}"),
            }
        }
    }

    /// Subscribes and asserts the ack (`op`, echoed `id`, `topic`, an `epoch` and an `offset`);
    /// returns it.
    pub async fn subscribe(&mut self, topic: &str, id: u64) -> Value {
        let ack = self
            .request(&serde_json::json!({"op": "subscribe", "topic": topic, "id": id}))
            .await;
        assert_eq!(ack["op"], "ack", "subscribe {topic}: {ack}");
        assert_eq!(ack["id"], id, "subscribe {topic}: {ack}");
        assert_eq!(ack["topic"], topic, "subscribe {topic}: {ack}");
        assert!(
            ack["epoch"].is_string(),
            "subscribe ack without epoch: {ack}"
        );
        assert!(
            ack["offset"].is_u64(),
            "subscribe ack without offset: {ack}"
        );
        ack
    }

    /// Unsubscribes and asserts the ack.
    pub async fn unsubscribe(&mut self, topic: &str, id: u64) -> Value {
        let ack = self
            .request(&serde_json::json!({"op": "unsubscribe", "topic": topic, "id": id}))
            .await;
        assert_eq!(ack["op"], "ack", "unsubscribe {topic}: {ack}");
        assert_eq!(ack["id"], id, "unsubscribe {topic}: {ack}");
        assert_eq!(ack["topic"], topic, "unsubscribe {topic}: {ack}");
        ack
    }

    /// Sends the `ping` op and asserts that the very next message is its `pong`.
    pub async fn ping_pong(&mut self, id: u64) {
        let pong = self
            .request(&serde_json::json!({"op": "ping", "id": id}))
            .await;
        assert_eq!(
            pong,
            serde_json::json!({"op": "pong", "id": id}),
            "ping {id}"
        );
    }
}

/// The top-level fields of a server message as raw JSON text, exactly as sent (for byte-identity
/// checks of `data` and `id`).
pub fn raw_fields(text: &str) -> BTreeMap<String, Box<RawValue>> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON object {text:?}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket client
// ---------------------------------------------------------------------------------------------

/// WebSocket opcodes, for [`RawWs`].
pub mod op {
    /// Continuation frame.
    pub const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping frame.
    pub const PING: u8 = 0x9;
    /// Pong frame.
    pub const PONG: u8 = 0xA;
}

/// One frame as the server sent it.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (see [`op`]).
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == op::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Why [`RawWs::read_frame`] returned no frame.
#[derive(Debug)]
pub enum RawReadError {
    /// Nothing complete arrived before the deadline.
    Timeout,
    /// The server closed the TCP connection (EOF).
    Eof,
    /// A socket error (e.g. connection reset).
    Io(std::io::Error),
    /// The bytes are not a valid server frame.
    Protocol(String),
}

/// A parsed HTTP response (status, lower-cased headers, body).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body as text (lossy UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON {:?}: {e}", self.status, self.body)
        })
    }
}

/// A WebSocket client that writes frames by hand and reads whatever comes back, for protocol
/// violations and misbehaving peers (never reads, never answers pings).
pub struct RawWs {
    /// The socket (after the handshake).
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// The `Sec-WebSocket-Key` of RFC 6455's example; the server's accept value is not checked.
const RAW_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl RawWs {
    /// Connects to `addr` and upgrades `/ws`; panics unless the server answers 101.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let stream = tcp_connect(addr).await;
        match RawWs::handshake(stream, addr, "/ws").await {
            Ok(ws) => ws,
            Err(r) => panic!("upgrade refused: {} {}", r.status, r.body),
        }
    }

    /// Connects with the socket's receive buffer set to `bytes` (see [`tcp_connect_small_rcvbuf`])
    /// and upgrades `/ws`: the client that stops reading, whose window fills after a few frames.
    /// Panics unless the server answers 101.
    pub async fn connect_small_rcvbuf(addr: SocketAddr, bytes: u32) -> RawWs {
        let stream = tcp_connect_small_rcvbuf(addr, bytes).await;
        match RawWs::handshake(stream, addr, "/ws").await {
            Ok(ws) => ws,
            Err(r) => panic!("upgrade refused: {} {}", r.status, r.body),
        }
    }

    /// Sends a `subscribe` op and returns the next JSON frame (its `ack` or `error`; the caller
    /// asserts which).
    pub async fn subscribe(&mut self, topic: &str, id: u64) -> Value {
        self.send_text(&serde_json::json!({"op":"subscribe","topic":topic,"id":id}).to_string())
            .await;
        self.recv_json(RECV_TIMEOUT).await
    }

    /// Performs the upgrade on an already connected socket (e.g. one with a small receive buffer).
    /// Returns the server's response when it is not 101.
    pub async fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
    ) -> Result<RawWs, HttpResponse> {
        RawWs::handshake_with(stream, addr, path, &[]).await
    }

    /// Like [`RawWs::handshake`], with extra request headers (e.g. `Origin`).
    pub async fn handshake_with(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<RawWs, HttpResponse> {
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in extra_headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write upgrade request");
        let mut buf = Vec::new();
        let response = read_http_response(&mut stream, &mut buf, RECV_TIMEOUT, true)
            .await
            .unwrap_or_else(|e| panic!("reading the upgrade response: {e}"));
        if response.status == 101 {
            Ok(RawWs { stream, buf })
        } else {
            Err(response)
        }
    }

    /// Writes one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame = masked_frame(fin, opcode, payload);
        self.stream
            .write_all(&frame)
            .await
            .unwrap_or_else(|e| panic!("write frame (opcode {opcode}): {e}"));
    }

    /// Writes several frames in one write (so the server sees them back to back).
    pub async fn send_frames(&mut self, frames: &[(bool, u8, &[u8])]) {
        let mut all = Vec::new();
        for (fin, opcode, payload) in frames {
            all.extend_from_slice(&masked_frame(*fin, *opcode, payload));
        }
        self.stream
            .write_all(&all)
            .await
            .unwrap_or_else(|e| panic!("write frames: {e}"));
    }

    /// Sends a whole text message in one frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, op::TEXT, text.as_bytes()).await;
    }

    /// Reads the next frame within `timeout`.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawReadError> {
        read_frame_from(&mut self.stream, &mut self.buf, timeout).await
    }

    /// Splits the connection so that one task can keep writing while another reads (floods from a
    /// client that does read).
    pub fn into_split(self) -> (RawWsReader, tokio::net::tcp::OwnedWriteHalf) {
        let (read, write) = self.stream.into_split();
        (
            RawWsReader {
                read,
                buf: self.buf,
            },
            write,
        )
    }

    /// Next text message (skipping pings and pongs) as JSON.
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self
                .read_frame(left)
                .await
                .unwrap_or_else(|e| panic!("expected a text frame: {e:?}"));
            match frame.opcode {
                op::PING | op::PONG => continue,
                op::TEXT if frame.fin => {
                    return serde_json::from_slice(&frame.payload).unwrap_or_else(|e| {
                        panic!("server sent invalid JSON {:?}: {e}", frame.payload)
                    });
                }
                _ => panic!("expected a text frame, got {frame:?}"),
            }
        }
    }

    /// Reads until a close frame (skipping anything else) and asserts its code; returns the frames
    /// skipped before it. Panics if the connection ends first or nothing comes within `timeout`.
    pub async fn expect_close(&mut self, code: u16, timeout: Duration) -> Vec<RawFrame> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left).await {
                Ok(f) if f.opcode == op::CLOSE => {
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default());
                    assert_eq!(f.close_code(), Some(code), "close code (reason {reason:?})");
                    return skipped;
                }
                Ok(f) => skipped.push(f),
                Err(e) => panic!(
                    "no close frame {code} within {timeout:?}: {e:?} ({} frames before)",
                    skipped.len()
                ),
            }
        }
    }

    /// Reads and discards until the server closes the TCP connection; returns how many bytes came.
    /// Panics if the connection is still open after `timeout` or more than `max_bytes` arrive.
    pub async fn expect_eof(&mut self, timeout: Duration, max_bytes: usize) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut total = self.buf.len();
        self.buf.clear();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("connection still open after {timeout:?} ({total} bytes read)"),
                Ok(Ok(0)) | Ok(Err(_)) => return total,
                Ok(Ok(n)) => {
                    total += n;
                    assert!(
                        total <= max_bytes,
                        "more than {max_bytes} bytes before the connection closed"
                    );
                }
            }
        }
    }
}

/// The read half of a [`RawWs`] after [`RawWs::into_split`].
pub struct RawWsReader {
    read: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
}

impl RawWsReader {
    /// Reads the next frame within `timeout`.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawReadError> {
        read_frame_from(&mut self.read, &mut self.buf, timeout).await
    }
}

/// Reads one server frame from `io`, keeping unparsed bytes in `buf`.
async fn read_frame_from<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<RawFrame, RawReadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some((frame, used)) = parse_server_frame(buf)? {
            buf.drain(..used);
            return Ok(frame);
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Err(RawReadError::Timeout),
            Ok(Ok(0)) => return Err(RawReadError::Eof),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(RawReadError::Io(e)),
        }
    }
}

/// Sends `request` (a complete HTTP/1.1 request, written as is) on a fresh connection and reads one
/// response, for requests a normal client would not send.
pub async fn raw_http(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut stream = tcp_connect(addr).await;
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    read_http_response(&mut stream, &mut buf, RECV_TIMEOUT, true)
        .await
        .unwrap_or_else(|e| panic!("reading the response to {request:?}: {e}"))
}

/// Encodes one client frame, masked as RFC 6455 requires of clients.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Parses one server frame from the front of `buf`: `Ok(None)` when incomplete.
fn parse_server_frame(buf: &[u8]) -> Result<Option<(RawFrame, usize)>, RawReadError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    if buf[0] & 0x70 != 0 {
        return Err(RawReadError::Protocol("reserved bits set".into()));
    }
    if buf[1] & 0x80 != 0 {
        return Err(RawReadError::Protocol("server frame is masked".into()));
    }
    let (len, header) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(n);
            let n = usize::try_from(n)
                .ok()
                .filter(|n| *n <= 256 << 20)
                .ok_or_else(|| RawReadError::Protocol(format!("frame of {n} bytes")))?;
            (n, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    let frame = RawFrame {
        fin,
        opcode,
        payload: buf[header..header + len].to_vec(),
    };
    Ok(Some((frame, header + len)))
}

/// Connects a plain TCP socket, with a deadline.
pub async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    match tokio::time::timeout(RECV_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("connect {addr}: {e}"),
        Err(_) => panic!("connect {addr}: timed out"),
    }
}

/// Connects a TCP socket whose receive buffer is set to `bytes` *before* connecting (so the window
/// the server sees stays small), for clients that stop reading.
pub async fn tcp_connect_small_rcvbuf(addr: SocketAddr, bytes: u32) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    match tokio::time::timeout(RECV_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("connect {addr}: {e}"),
        Err(_) => panic!("connect {addr}: timed out"),
    }
}

/// Reads from `stream` until the server closes it (EOF or reset). Returns what the server sent and
/// when the connection ended, measured from `started`; panics when it is still open at
/// `started + limit`.
pub async fn read_until_closed(
    stream: &mut TcpStream,
    started: Instant,
    limit: Duration,
) -> (Vec<u8>, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open {limit:?} after it started; server sent {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP/1.1 response head and its body (by `Content-Length`; to EOF without one, unless
/// `head_only_on_101` and the status is 101). Bytes after the response stay in `buf`.
async fn read_http_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
    head_only_on_101: bool,
) -> Result<HttpResponse, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err("response head larger than 64 KiB".into());
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(format!("timed out; got {:?}", String::from_utf8_lossy(buf))),
            Ok(Ok(0)) => return Err(format!("EOF; got {:?}", String::from_utf8_lossy(buf))),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: String::new(),
    };
    if status == 101 && head_only_on_101 {
        return Ok(response);
    }
    let length: Option<usize> = response
        .header("content-length")
        .and_then(|v| v.parse().ok());
    loop {
        if length.is_some_and(|n| buf.len() >= n) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err("timed out reading the body".into()),
            Ok(Ok(0)) if length.is_none() => break,
            Ok(Ok(0)) => return Err("EOF inside the body".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    let n = length.unwrap_or(buf.len());
    response.body = String::from_utf8_lossy(&buf[..n]).into_owned();
    buf.drain(..n);
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// HTTP client (hyper 1)
// ---------------------------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 connection (hyper's low-level client), for many requests in a row.
pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpClient {
    /// Opens a connection.
    pub async fn connect(addr: SocketAddr) -> HttpClient {
        let stream = tcp_connect(addr).await;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap_or_else(|e| panic!("HTTP handshake with {addr}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        HttpClient {
            sender,
            host: addr.to_string(),
        }
    }

    /// Whether the connection is closed (e.g. the server ended an idle keep-alive connection after
    /// `server.handshake_timeout`); a closed client cannot send requests any more.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends one request and reads the whole response (within [`RECV_TIMEOUT`]).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> HttpResponse {
        let body: Bytes = body.into();
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host);
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("valid request");
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection not ready: {e}"))?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(HttpResponse {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        match tokio::time::timeout(RECV_TIMEOUT, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("{method} {path}: {e}"),
            Err(_) => panic!("{method} {path}: no response within {RECV_TIMEOUT:?}"),
        }
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], Bytes::new()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> HttpResponse {
        self.request("POST", path, &[], body).await
    }

    /// `POST /v1/publish/{topic}` with `data` as the body; asserts 200 and returns
    /// `(epoch, offset)`.
    pub async fn publish(&mut self, topic: &str, data: impl Into<Bytes>) -> (String, u64) {
        let r = self.post(&format!("/v1/publish/{topic}"), data).await;
        assert_eq!(r.status, 200, "publish to {topic}: {}", r.body);
        let v = r.json();
        let epoch = v["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("publish reply without epoch: {v}"))
            .to_string();
        let offset = v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("publish reply without offset: {v}"));
        (epoch, offset)
    }
}

/// One `GET` on a fresh connection.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    HttpClient::connect(addr).await.get(path).await
}

/// One `POST` with a JSON body on a fresh connection.
pub async fn http_post(addr: SocketAddr, path: &str, body: impl Into<Bytes>) -> HttpResponse {
    HttpClient::connect(addr).await.post(path, body).await
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// One scrape of `/metrics` (Prometheus text format).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The raw exposition.
    pub text: String,
}

impl Metrics {
    /// The value of one series, written exactly as in the exposition: `pubgate_connections` or
    /// `pubgate_messages_published_total{transport="http"}`. `None` when absent.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.text.lines().find_map(|line| {
            if line.starts_with('#') {
                return None;
            }
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
    }

    /// Like [`Metrics::get`], panicking when the series is absent.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("metric {series} not found in:\n{}", self.text))
    }

    /// Like [`Metrics::get`], with 0 for an absent series (labelled counters appear on first use).
    pub fn value_or_zero(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }

    /// The sum of every series of the metric `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                (metric == name)
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}
