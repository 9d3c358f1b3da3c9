//! The `pubgate` process under test: [`ServerBuilder`], [`Server`], and what `/proc` says about it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{
    HARNESS_DRAIN_GRACE, Metrics, STARTUP_TIMEOUT, STOP_TIMEOUT, WsClient, http_get, pubgate_bin,
};

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
