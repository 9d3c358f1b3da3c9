//! Shared pieces of the hostile-client tests (`hostile_*.rs`): slowloris handshakes, floods of
//! half-open connections, oversized and endless frames, invalid UTF-8, bad control frames, ping and
//! subscribe floods, connection floods past `server.max_connections` and past the process's
//! open-files limit, and slow consumers.
//!
//! Every test checks the same three things while a client misbehaves:
//!
//! - the server stays up (the harness panics if the process died);
//! - a well-behaved *control* client ([`Control`]) subscribed to a topic keeps receiving messages
//!   published over HTTP, each within [`MAX_CONTROL_LATENCY`], during the abuse and after it;
//! - its memory stays bounded: RSS is read from `/proc` before and after (and the peak, `VmHWM`),
//!   printed, and the growth is asserted under a bound stated in each test ([`Watch`], [`Rss`]).
//!
//! The tests of one binary take turns ([`serial`]) so that CPU and latency figures measure the
//! server, not two floods fighting for the same two cores; `cargo test` runs the binaries one after
//! the other. Run them with the figures shown:
//!
//! ```text
//! cargo test -p gateway --test 'hostile_*' -- --nocapture
//! ```
//!
//! docs/robustness.md lists every limit and quotes the figures. The test crate declares
//! `mod common` (the harness) next to this module.

// Each test binary uses a different subset of these.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::common::{HttpClient, RECV_TIMEOUT, RawWs, Server, WsClient, proc_status_kib};

/// One test at a time: each one measures latency, CPU or memory of its own server.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the binary's turn lock, for the whole test.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// The control client's topic.
pub const CONTROL_TOPIC: &str = "control.heartbeat";
/// How often the control client publishes a probe.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// The longest a probe may take from the start of its HTTP publish to its arrival on the control
/// client's WebSocket. Normal is a few milliseconds; the bound is generous for a loaded 2-core
/// machine, and still far below what a stalled event loop or a blocked fan-out would show.
pub const MAX_CONTROL_LATENCY: Duration = Duration::from_secs(1);

/// A well-behaved client that keeps probing the server while a test abuses it: it publishes a
/// message over a keep-alive HTTP connection every [`PROBE_EVERY`] and times its arrival on a
/// subscribed WebSocket. Both connections are opened before the abuse starts (so it also works
/// while the server cannot accept new ones).
pub struct Control {
    stop: Arc<AtomicBool>,
    probes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(WsClient, Vec<Duration>, usize)>,
}

impl Control {
    /// Subscribes the control client and starts probing.
    pub async fn start(server: &Server) -> Control {
        let mut ws = server.ws().await;
        let ack = ws.subscribe(CONTROL_TOPIC, 1).await;
        let mut expected = ack["offset"].as_u64().expect("ack offset");
        let addr = server.addr;
        let mut http = HttpClient::connect(addr).await;
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let (stop2, probes2) = (stop.clone(), probes.clone());
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut i = 0u64;
            let mut reconnects = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                if http.is_closed() {
                    // The server ends keep-alive connections idle for server.handshake_timeout;
                    // tests set it low, and a test process starved by a loaded machine can miss a
                    // probe period. A reconnect is fine; a lost or late message is not.
                    reconnects += 1;
                    http = HttpClient::connect(addr).await;
                }
                let started = Instant::now();
                let (_, offset) = http
                    .publish(CONTROL_TOPIC, format!(r#"{{"probe":{i}}}"#))
                    .await;
                expected += 1;
                assert_eq!(offset, expected, "control publish offset");
                let msg = ws.recv_json(RECV_TIMEOUT).await;
                assert_eq!(msg["op"], "message", "control client: {msg}");
                assert_eq!(msg["offset"], offset, "control client: {msg}");
                assert_eq!(msg["data"]["probe"], i, "control client: {msg}");
                samples.push(started.elapsed());
                probes2.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(PROBE_EVERY).await;
            }
            (ws, samples, reconnects)
        });
        Control { stop, probes, task }
    }

    /// Waits until `n` more probes went through (panics if that takes more than 30 s).
    pub async fn more_probes(&self, n: usize) {
        let target = self.probes.load(Ordering::Relaxed) + n;
        let started = Instant::now();
        while self.probes.load(Ordering::Relaxed) < target {
            if self.task.is_finished() {
                // It panicked (it never stops by itself): finish() reports why.
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the control client made no progress for 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Probes that went through so far.
    pub fn probes(&self) -> usize {
        self.probes.load(Ordering::Relaxed)
    }

    /// Stops probing after a few probes past this point (so "after the abuse" is covered), asserts
    /// that every probe arrived within [`MAX_CONTROL_LATENCY`], and prints the figures.
    /// Returns the control client's WebSocket.
    pub async fn finish(self, test: &str) -> WsClient {
        self.more_probes(3).await;
        self.stop.store(true, Ordering::Relaxed);
        let (ws, samples, reconnects) = match self.task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("control client task: {e}"),
        };
        let mut sorted = samples.clone();
        sorted.sort();
        let p50 = percentile(&sorted, 50.0);
        let max = sorted.last().copied().unwrap_or_default();
        eprintln!(
            "[{test}] control client: {} probes, p50 {:.1} ms, max {:.1} ms ({reconnects} HTTP \
             reconnects)",
            sorted.len(),
            ms(p50),
            ms(max)
        );
        assert!(
            max <= MAX_CONTROL_LATENCY,
            "[{test}] a control probe took {max:?} (limit {MAX_CONTROL_LATENCY:?}); all: {samples:?}"
        );
        ws
    }
}

/// Milliseconds, for the printed figures.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`th percentile (nearest rank) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// RSS figures of one flood.
pub struct Rss {
    /// Before the abuse (with the control client connected).
    pub before: u64,
    /// At the height of the abuse.
    pub during: u64,
    /// Once it is over.
    pub after: u64,
    /// The process's peak so far (`VmHWM`).
    pub peak: u64,
}

impl Rss {
    /// The figures of `server` now, after the abuse, given those from before it and at its height
    /// (`during`); printed.
    pub fn measure(test: &str, server: &Server, before: u64, during: u64) -> Rss {
        let rss = Rss {
            before,
            during,
            after: server.rss_kib(),
            peak: server.peak_rss_kib(),
        };
        rss.print(test);
        rss
    }

    /// Prints the figures.
    pub fn print(&self, test: &str) {
        eprintln!(
            "[{test}] server RSS: before {} KiB, during {} KiB, after {} KiB, peak (VmHWM) {} KiB",
            self.before, self.during, self.after, self.peak
        );
    }

    /// Asserts growth bounds, in KiB: at the height of the flood and once it is over.
    pub fn assert_bounded(&self, test: &str, max_during: u64, max_after: u64) {
        assert!(
            self.during.saturating_sub(self.before) < max_during,
            "[{test}] RSS grew from {} KiB to {} KiB during the flood (limit +{max_during} KiB)",
            self.before,
            self.during
        );
        assert!(
            self.after.saturating_sub(self.before) < max_after,
            "[{test}] RSS grew from {} KiB to {} KiB after the flood (limit +{max_after} KiB)",
            self.before,
            self.after
        );
    }
}

/// What every test watches while a client misbehaves: a [`Control`] client that keeps probing the
/// server, and the server's RSS from before the abuse.
pub struct Watch {
    /// The well-behaved client.
    pub control: Control,
    /// The server's RSS once the control client was connected, in KiB.
    pub rss_before: u64,
}

impl Watch {
    /// Starts the control client, then reads the server's RSS.
    pub async fn start(server: &Server) -> Watch {
        let control = Control::start(server).await;
        let rss_before = server.rss_kib();
        Watch {
            control,
            rss_before,
        }
    }

    /// Ends the watch once the abuse is over: [`Control::finish`] (every probe in time), then the
    /// RSS after the abuse, printed with the figures from before and `during` (its height).
    pub async fn finish(self, test: &str, server: &Server, during: u64) -> Rss {
        self.control.finish(test).await;
        Rss::measure(test, server, self.rss_before, during)
    }
}

/// Waits until the control client's is the only connection left: the abuse's are all gone.
pub async fn wait_only_control_connected(server: &Server, timeout: Duration) {
    server
        .wait_metric("pubgate_connections", timeout, |v| v == 1.0)
        .await;
}

/// A new client still gets in and is answered.
pub async fn assert_new_clients_served(server: &Server) {
    let mut fresh = server.ws().await;
    fresh.ping_pong(1).await;
}

/// Highest open descriptors and RSS seen by a [`Sampler`].
pub struct Peak {
    /// Open descriptors.
    pub fds: usize,
    /// RSS, in KiB.
    pub rss_kib: u64,
}

/// Samples a process's open descriptors and RSS every 20 ms in the background, keeping the maxima:
/// the height of a flood, whenever it happens.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Peak>,
}

impl Sampler {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = Peak { fds: 0, rss_kib: 0 };
            loop {
                if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    peak.fds = peak.fds.max(dir.count());
                }
                if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                    peak.rss_kib = peak.rss_kib.max(rss);
                }
                if stop2.load(Ordering::Relaxed) {
                    return peak;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Sampler { stop, task }
    }

    /// Stops sampling; the maxima seen.
    pub async fn finish(self) -> Peak {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("sampler task")
    }
}

/// Runs `make(i)` for `i in 0..n`, at most `concurrency` at a time; results in completion order.
pub async fn run_many<T, F, Fut>(n: usize, concurrency: usize, make: F) -> Vec<T>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = T>,
{
    futures_util::stream::iter((0..n).map(make))
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// An upgraded raw connection.
pub async fn raw(server: &Server) -> RawWs {
    RawWs::connect(server.addr).await
}

/// Whether a raw connection still answers the `ping` op.
pub async fn raw_ping_op(ws: &mut RawWs, id: u64) {
    ws.send_text(&json!({"op":"ping","id":id}).to_string())
        .await;
    let reply = ws.recv_json(RECV_TIMEOUT).await;
    assert_eq!(reply, json!({"op":"pong","id":id}), "ping op {id}");
}
