//! Command-line flags shared by the scenarios.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::ws::{Node, Protocol};

/// Where to send load and what to watch.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// A node to connect to: ws://127.0.0.1:PORT/ws, or wss://… with --tls-ca (repeatable;
    /// connections are spread round robin). Only loopback addresses are accepted.
    #[arg(long = "url", required = true, value_name = "URL")]
    pub urls: Vec<String>,
    /// PEM root certificate to trust for wss:// nodes (required with them; their HTTPS publish API
    /// uses it too).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// A server process to measure (RSS, CPU, fd limit); repeatable, in the order of --url.
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,
    /// A broker process (redis-server) whose CPU counts with the servers' in the cost per
    /// delivery (repeatable).
    #[arg(long = "broker-pid", value_name = "PID")]
    pub broker_pids: Vec<u32>,
    /// Offer permessage-deflate on every subscriber connection (a node that declines fails the
    /// connection); every compressed message is inflated and checked.
    #[arg(long)]
    #[serde(default)]
    pub deflate: bool,
    /// The servers' protocol: `pubgate`, or `nchan` (nginx + nchan with subscribers on
    /// `/sub/<topic>` and publishers on `/pub/<topic>`, as scripts/nchan/stack.sh configures them;
    /// messages are checked by the payload's per-topic sequence number `s`).
    #[arg(long, value_enum, default_value_t = Protocol::Pubgate)]
    #[serde(default)]
    pub protocol: Protocol,
    /// Source addresses 127.0.0.2… to spread connections over (0: one per 16,000 connections).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub source_ips: usize,
    /// Topics named PREFIX.0 … PREFIX.(N-1).
    #[arg(long, value_name = "N")]
    pub topics: Option<usize>,
    /// Topic name prefix.
    #[arg(long, default_value = "bench", value_name = "PREFIX")]
    pub topic_prefix: String,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000.0, value_name = "PER_SEC")]
    pub connect_rate: f64,
    /// Seconds one connection may take to connect, upgrade and get its subscribe ack.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub connect_timeout: f64,
    /// Connection setups in flight at most.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_in_flight: usize,
    /// Write the JSON result here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl Target {
    /// The parsed nodes.
    pub fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        let mut nodes = Node::parse_all(&self.urls, self.tls_ca.as_deref())?;
        for n in &mut nodes {
            n.deflate = self.deflate;
            n.protocol = self.protocol;
        }
        Ok(nodes)
    }

    /// Topic names.
    pub fn topic_names(&self, default: usize) -> Arc<Vec<Arc<str>>> {
        let n = self.topics.unwrap_or(default).max(1);
        Arc::new(
            (0..n)
                .map(|i| Arc::from(format!("{}.{i}", self.topic_prefix)))
                .collect(),
        )
    }

    /// How many source addresses to use for `connections`.
    pub fn source_ip_count(&self, connections: usize) -> usize {
        if self.source_ips > 0 {
            self.source_ips
        } else {
            connections.div_ceil(16_000).max(1)
        }
    }

    /// The connect timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout.clamp(0.1, 600.0))
    }
}

/// Checks that a duration flag is sane (bounded runs only).
pub fn check_secs(name: &str, v: f64, max: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v.is_finite() && v >= 0.0 && v <= max,
        "--{name} must be between 0 and {max} seconds (got {v})"
    );
    Ok(Duration::from_secs_f64(v))
}

/// A progress bar on stderr (hidden with --quiet or when stderr is not a terminal).
pub fn bar(quiet: bool, len: u64, msg: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(msg.to_string());
    pb
}
