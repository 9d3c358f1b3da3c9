//! Shared harness for pubgate's integration tests.
//!
//! Every test runs the real `pubgate` binary over real loopback sockets; nothing is mocked. The pieces
//! (`process.rs`, `ws.rs`, `raw.rs`, `http_client.rs`, `scratch.rs`; waiting is here):
//!
//! - [`Server`] / [`ServerBuilder`]: start `pubgate --listen 127.0.0.1:0` with extra flags and env,
//!   wait for its `pubgate listening on ADDR` line, and stop exactly that process (by PID, SIGTERM
//!   then SIGKILL; at once with [`ServerBuilder::kill_on_drop`]) when dropped. Its stderr is kept for debugging and printed when a test panics.
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
//! - [`TempDir`] / [`TempFile`]: scratch files removed on drop; [`free_port`] for a server that
//!   must come back on the same address; [`poll_until`], the polling loop every helper shares.
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

use std::future::Future;
use std::time::{Duration, Instant};

mod http_client;
mod process;
mod raw;
mod scratch;
mod ws;

// Not every test binary uses every part.
#[allow(unused_imports)]
pub use http_client::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use raw::*;
#[allow(unused_imports)]
pub use scratch::*;
#[allow(unused_imports)]
pub use ws::*;

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
