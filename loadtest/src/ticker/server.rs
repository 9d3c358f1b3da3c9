//! What the ticker reads from the server besides its WebSocket frames: the conflation counter of
//! its `/metrics`, and its memory while the run goes on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::procfs;

/// The metric that counts messages a slow subscriber skipped, by namespace.
pub const CONFLATED: &str = "pubgate_namespace_messages_conflated_total";

/// `GET path` over plain HTTP/1.0 (so the body is neither chunked nor kept alive), bounded to 5 s
/// and 16 MiB; returns the body of a 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(16 << 20).read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET http://{addr}{path}: no answer in 5 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET http://{addr}{path}: no HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    anyhow::ensure!(status == "200", "GET http://{addr}{path}: status {status}");
    Ok(body.to_string())
}

/// The samples of `metric` in a Prometheus text page, by their `namespace` label (`""` without
/// one).
pub fn by_namespace(page: &str, metric: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue, // a longer metric name that starts with this one
        };
        let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let ns = labels
            .split(',')
            .find_map(|l| l.strip_prefix("namespace=\""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or("");
        *out.entry(ns.to_string()).or_insert(0.0) += v;
    }
    out
}

/// The server's memory over the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    /// RSS when the dashboards were connected, before publishing, KiB.
    pub rss_before_kib: u64,
    /// RSS at the end (dashboards still connected), KiB.
    pub rss_after_kib: u64,
    /// Highest RSS sampled (every 100 ms) in between, KiB.
    pub rss_peak_kib: u64,
    /// `VmHWM` at the end: the peak over the process's whole life, KiB.
    pub hwm_after_kib: u64,
}

/// Samples a process's RSS every 100 ms until stopped.
pub struct MemoryWatch {
    pid: u32,
    before: u64,
    stop: CancellationToken,
    task: JoinHandle<u64>,
}

impl MemoryWatch {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> Self {
        let before = procfs::sample(pid).map_or(0, |s| s.rss_kib);
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = before;
            while !s.is_cancelled() {
                if let Some(p) = procfs::sample(pid) {
                    peak = peak.max(p.rss_kib);
                }
                tokio::select! {
                    _ = s.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            peak
        });
        MemoryWatch {
            pid,
            before,
            stop,
            task,
        }
    }

    /// Stops sampling; the figures.
    pub async fn finish(self) -> Memory {
        self.stop.cancel();
        let after = procfs::sample(self.pid).unwrap_or_default();
        let peak = self.task.await.unwrap_or(0).max(after.rss_kib);
        Memory {
            rss_before_kib: self.before,
            rss_after_kib: after.rss_kib,
            rss_peak_kib: peak,
            hwm_after_kib: after.hwm_kib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_counter_by_namespace() {
        let page = "# HELP pubgate_namespace_messages_conflated_total Messages skipped\n\
            # TYPE pubgate_namespace_messages_conflated_total counter\n\
            pubgate_namespace_messages_conflated_total{namespace=\"default\"} 0\n\
            pubgate_namespace_messages_conflated_total{namespace=\"prices\"} 1234\n\
            pubgate_namespace_messages_conflated_total_other{namespace=\"prices\"} 9\n\
            pubgate_other 5\n";
        let m = by_namespace(page, CONFLATED);
        assert_eq!(m.len(), 2);
        assert_eq!(m["prices"], 1234.0);
        assert_eq!(m["default"], 0.0);
        assert_eq!(by_namespace("pubgate_other 5\n", "pubgate_other")[""], 5.0);
        assert!(by_namespace(page, "pubgate_none").is_empty());
    }
}
