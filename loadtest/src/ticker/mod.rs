//! `ticker`: a price ticker against a node whose `prices.>` namespace conflates slow subscribers.
//!
//! A backend feed posts batches of ticks for T topics at R messages/s (`feed`); D dashboards each
//! subscribe to every topic with one wildcard, some reading as fast as they can, some at a
//! dashboard's pace (`dashboard`). The run checks what conflation promises (docs/topics.md): per
//! topic, offsets only grow on every dashboard; a fast dashboard gets every message; a slow one
//! skips values but ends on the final value of every topic once publishing stops — the run fails
//! otherwise. It measures what that costs: server CPU per delivery, its memory, how old values are
//! when a slow dashboard gets them, how long it takes to catch up, and the server's own count of
//! conflated messages.

pub mod dashboard;
pub mod feed;
mod outcome;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli;
use crate::connect::check_capacity;
use crate::report::{CpuWatch, MachineWatch, Report, unix_now};
use crate::shards;
use crate::ws::{Node, now_ns};
use dashboard::{Board, Pace, Tally, TopicIndex};
use outcome::{Finished, Outcome};

/// The node configuration the scenario expects (deploy/bench/ticker.toml).
pub const CONFIG: &str = include_str!("../../../deploy/bench/ticker.toml");

/// The API key of [`CONFIG`].
pub const API_KEY: &str = "ticker-bench-key-0123456789abcdef";

/// Flags of `ticker`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct TickerArgs {
    /// The node: ws://127.0.0.1:PORT/ws, or wss://… with --tls-ca (loopback only). It must run
    /// with the configuration of --print-config.
    #[arg(long, value_name = "URL", required_unless_present = "print_config")]
    pub url: Option<String>,
    /// Print the node configuration this scenario expects (deploy/bench/ticker.toml) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// PEM root certificate to trust for a wss:// node.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// The server process to measure (CPU per delivery, RSS).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Where the node serves /metrics, when not on --url's port (its `server.metrics_listen`):
    /// http://127.0.0.1:PORT. A wss:// node needs it: /metrics is read over plain HTTP.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// Topics PREFIX.t0 … PREFIX.t(N-1).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub topics: usize,
    /// Topic prefix: the namespace's pattern is PREFIX.> and every dashboard subscribes to it.
    #[arg(long, default_value = "prices", value_name = "PREFIX")]
    pub prefix: String,
    /// Ticks published per second, all topics together (round robin over the topics).
    #[arg(long, default_value_t = 50_000.0, value_name = "PER_SEC")]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Ticks per `POST /v1/publish` batch.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub batch: usize,
    /// Feed connections, each with one batch in flight.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub publishers: usize,
    /// Size of each tick's `data` (`{"t":…,"s":…,"pad":…}`), bytes.
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub payload: usize,
    /// API key of the feed.
    #[arg(long, default_value = API_KEY, value_name = "KEY")]
    pub api_key: String,
    /// Dashboards, each subscribed to PREFIX.> once.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub dashboards: usize,
    /// Of the dashboards, how many read slowly (the others read as fast as they can).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub slow: usize,
    /// A slow dashboard reads at most this many frames per second [default: 2000].
    #[arg(long, value_name = "PER_SEC")]
    pub slow_rate: Option<f64>,
    /// Or: a slow dashboard sleeps this long after each frame.
    #[arg(long, value_name = "MS", conflicts_with = "slow_rate")]
    pub slow_pause_ms: Option<f64>,
    /// Receive buffer of a slow dashboard's socket, bytes (0: the kernel's default, which on
    /// loopback grows to megabytes: more stale ticks held, on top of the node's send buffer,
    /// before the node sees the dashboard fall behind).
    #[arg(long, default_value_t = 32_768, value_name = "BYTES")]
    pub slow_rcvbuf: u32,
    /// Seconds a slow dashboard may take, after the last publish, to hold the final value of
    /// every topic; the run fails past it.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub catchup_timeout: f64,
    /// Seconds one dashboard may take to connect and get its subscribe ack.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub connect_timeout: f64,
    /// Receive threads for the dashboards (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Write the JSON result here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
}

impl TickerArgs {
    /// How slow dashboards read.
    fn slow_pace(&self) -> anyhow::Result<Pace> {
        match (self.slow_rate, self.slow_pause_ms) {
            (_, Some(ms)) => {
                anyhow::ensure!(
                    ms.is_finite() && ms > 0.0 && ms <= 10_000.0,
                    "--slow-pause-ms must be in (0, 10000]"
                );
                Ok(Pace::Pause(Duration::from_secs_f64(ms / 1000.0)))
            }
            (r, None) => {
                let r = r.unwrap_or(2000.0);
                anyhow::ensure!(
                    r.is_finite() && r > 0.0 && r <= 10_000_000.0,
                    "--slow-rate must be in (0, 10000000]"
                );
                Ok(Pace::Rate(r))
            }
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.topics),
            "--topics must be 1..=1000000"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.dashboards),
            "--dashboards must be 1..=10000"
        );
        anyhow::ensure!(
            self.slow <= self.dashboards,
            "--slow ({}) must not exceed --dashboards ({})",
            self.slow,
            self.dashboards
        );
        anyhow::ensure!(
            self.rate.is_finite() && self.rate > 0.0 && self.rate <= 10_000_000.0,
            "--rate must be in (0, 10000000]"
        );
        anyhow::ensure!((1..=1000).contains(&self.batch), "--batch must be 1..=1000");
        anyhow::ensure!(
            (1..=64).contains(&self.publishers),
            "--publishers must be 1..=64"
        );
        anyhow::ensure!(self.payload <= 65_536, "--payload must be at most 64 KiB");
        anyhow::ensure!(
            !self.prefix.is_empty()
                && self
                    .prefix
                    .split('.')
                    .all(|l| !l.is_empty()
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')),
            "--prefix must be topic levels of letters, digits and _ (got {:?})",
            self.prefix
        );
        Ok(())
    }

    /// Where /metrics is.
    fn metrics_addr(&self, node: &Node) -> anyhow::Result<std::net::SocketAddr> {
        match &self.metrics_url {
            None => Ok(node.addr),
            Some(u) => {
                anyhow::ensure!(
                    !u.starts_with("https://"),
                    "--metrics-url: plain http:// only"
                );
                Ok(Node::parse(u)
                    .with_context(|| format!("--metrics-url {u}"))?
                    .addr)
            }
        }
    }
}

/// One dashboard while it runs.
struct Running {
    slow: bool,
    board: Arc<Board>,
    task: tokio::task::JoinHandle<Tally>,
}

/// Connects the dashboards (all subscribed before anything is published); fails when one cannot.
async fn connect_dashboards(
    args: &TickerArgs,
    node: &Node,
    names: &Arc<TopicIndex>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<Running>> {
    let pattern = format!("{}.>", args.prefix);
    let slow_pace = args.slow_pace()?;
    let timeout = cli::check_secs("connect-timeout", args.connect_timeout, 600.0)?;
    let mut out = Vec::with_capacity(args.dashboards);
    for i in 0..args.dashboards {
        let slow = i < args.slow;
        let rcvbuf = (slow && args.slow_rcvbuf > 0).then_some(args.slow_rcvbuf);
        let conn = crate::handshake::open_with(node, None, &pattern, timeout, rcvbuf)
            .await
            .map_err(|e| anyhow::anyhow!("dashboard {i}: {}: {}", e.label, e.detail))?;
        let board = Board::new(args.topics);
        let pace = if slow { slow_pace } else { Pace::Fast };
        let task = shards::spawn(
            i,
            dashboard::run(conn, pace, names.clone(), board.clone(), stop.clone()),
        );
        out.push(Running { slow, board, task });
    }
    Ok(out)
}

/// When every board of a kind first held every final value, ns since the Unix epoch.
#[derive(Default)]
struct CaughtUp {
    slow_ns: Option<u64>,
    fast_ns: Option<u64>,
}

/// Polls the boards until the slow and the fast dashboards all hold `finals`, or `limit` passed.
async fn wait_for_finals(running: &[Running], finals: &[u64], limit: Duration) -> CaughtUp {
    let deadline = tokio::time::Instant::now() + limit;
    let mut done = CaughtUp::default();
    loop {
        let now = now_ns();
        let all_at = |slow: bool| {
            running
                .iter()
                .filter(|r| r.slow == slow)
                .all(|r| r.board.holds(finals))
        };
        if done.slow_ns.is_none() && all_at(true) {
            done.slow_ns = Some(now);
        }
        if done.fast_ns.is_none() && all_at(false) {
            done.fast_ns = Some(now);
        }
        if (done.slow_ns.is_some() && done.fast_ns.is_some())
            || tokio::time::Instant::now() >= deadline
        {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The node's conflation counter, summed over its namespaces.
async fn conflated(addr: std::net::SocketAddr) -> anyhow::Result<f64> {
    let page = server::http_get(addr, "/metrics").await?;
    Ok(server::by_namespace(&page, server::CONFLATED)
        .values()
        .sum())
}

/// Runs `ticker`.
pub async fn run_ticker(args: TickerArgs) -> anyhow::Result<Report> {
    args.check()?;
    let url = args.url.as_deref().context("--url is required")?;
    let node = Node::parse_with(url, args.tls_ca.as_deref())?;
    let metrics = args.metrics_addr(&node)?;
    let duration = cli::check_secs("duration", args.duration, 3_600.0)?;
    let catchup_limit = cli::check_secs("catchup-timeout", args.catchup_timeout, 600.0)?;
    check_capacity(args.dashboards + args.publishers, 1, "dashboards")?;
    if let Some(pid) = args.server_pid {
        crate::procfs::sample(pid)
            .with_context(|| format!("--server-pid {pid}: no such process"))?;
    }
    let conflated_before = conflated(metrics).await.with_context(|| {
        format!(
            "reading /metrics at {metrics} (use --metrics-url when the node serves it elsewhere)"
        )
    })?;
    let machine = MachineWatch::start();
    let started_unix = unix_now();
    let names = Arc::new(TopicIndex::new(&format!("{}.t", args.prefix), args.topics));
    let topics: Arc<Vec<Arc<str>>> =
        Arc::new((0..args.topics).map(|i| Arc::from(names.name(i))).collect());
    let stop = CancellationToken::new();
    let running = match connect_dashboards(&args, &node, &names, &stop).await {
        Ok(r) => r,
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    if !args.quiet {
        eprintln!(
            "ticker: {} dashboards subscribed to {}.> ({} slow); publishing {:.0} ticks/s over {} topics for {:.1} s",
            args.dashboards,
            args.prefix,
            args.slow,
            args.rate,
            args.topics,
            duration.as_secs_f64()
        );
    }
    let memory = args.server_pid.map(server::MemoryWatch::start);
    let pids: Vec<u32> = args.server_pid.into_iter().collect();
    let cpu = CpuWatch::start(&pids, &[]);
    let spec = feed::FeedSpec {
        node: node.clone(),
        topics,
        rate: args.rate,
        count: (args.rate * duration.as_secs_f64()).round().max(1.0) as u64,
        batch: args.batch,
        connections: args.publishers,
        payload: args.payload,
        api_key: Some(args.api_key.clone()),
        max_time: duration + duration / 2 + Duration::from_secs(5),
    };
    let fed = tokio::task::spawn_blocking(move || feed::run(spec))
        .await
        .context("the feed task")?;
    let fed = match fed {
        Ok(f) => f,
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    let finals: Vec<u64> = fed.topics.iter().map(|t| t.last).collect();
    let caught = wait_for_finals(&running, &finals, catchup_limit).await;
    let (servers, window) = cpu.finish();
    let memory = match memory {
        Some(m) => Some(m.finish().await),
        None => None,
    };
    let conflated_after = conflated(metrics).await.ok();
    stop.cancel();
    let mut done = Vec::with_capacity(running.len());
    for r in running {
        let tally = tokio::time::timeout(Duration::from_secs(10), r.task)
            .await
            .context("a dashboard did not stop within 10 s")?
            .context("a dashboard task failed")?;
        let last = (0..args.topics).map(|t| r.board.last(t)).collect();
        done.push(Finished {
            slow: r.slow,
            tally,
            last,
        });
    }
    let outcome = Outcome::new(&fed, &done, &caught_up_ms(&caught, &fed), &window);
    let server_us = outcome.server_us_per_delivery(&servers);
    let server_us_publish = outcome.server_us_per_publish(&servers, &fed);
    if !args.quiet {
        eprintln!(
            "ticker feed: {} of {} ticks taken, {:.0}/s (offered {:.0}/s), batch p99 {:.1} ms, behind schedule {:.0} ms",
            fed.ok,
            fed.sent,
            fed.achieved_rate,
            fed.offered_rate,
            fed.batch_latency.p99_us / 1000.0,
            fed.behind_ms
        );
        outcome.print(server_us, server_us_publish);
    }
    let mut report = Report::new(
        "ticker",
        started_unix,
        &machine,
        json!({
            "url": url, "topics": args.topics, "prefix": args.prefix, "rate": args.rate,
            "duration_s": args.duration, "batch": args.batch, "publishers": args.publishers,
            "payload": args.payload, "dashboards": args.dashboards, "slow": args.slow,
            "slow_pace": format!("{:?}", args.slow_pace()?), "slow_rcvbuf": args.slow_rcvbuf,
            "catchup_timeout_s": args.catchup_timeout, "server_pid": args.server_pid,
        }),
        json!({
            "feed": fed,
            "fast": outcome.fast,
            "slow": outcome.slow,
            "dashboards": outcome.rows,
            "server": {
                "cpu_s": servers.iter().map(|s| s.1).sum::<f64>(),
                "us_per_delivery": server_us,
                "us_per_publish": server_us_publish,
                "memory": memory,
                "conflated_before": conflated_before,
                "conflated_after": conflated_after,
                "conflated": conflated_after.map(|a| a - conflated_before),
            },
            "cpu": window,
        }),
    );
    report.failures = outcome.failures(&fed, catchup_limit, conflated_after.is_some());
    Ok(report)
}

/// Milliseconds from the last publish answer to each kind of dashboard holding every final value.
fn caught_up_ms(c: &CaughtUp, fed: &feed::FeedResult) -> (Option<f64>, Option<f64>) {
    let ms = |at: Option<u64>| {
        at.map(|t| crate::stats::r3(t.saturating_sub(fed.last_answer_ns) as f64 / 1e6))
    };
    (ms(c.slow_ns), ms(c.fast_ns))
}
