//! Opening many subscriber connections at a set rate, spread over nodes, topics and source
//! addresses, each left running a receive loop until told to stop.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::shards;
use crate::stats::{self, Percentiles, Recorder};
use crate::ws::{self, Node, Received};

/// Which connections to open.
#[derive(Debug, Clone)]
pub struct RampSpec {
    /// Nodes; connection `k` goes to node `k % nodes`.
    pub nodes: Vec<Node>,
    /// Topics; connection `k` subscribes to topic `(k / nodes) % topics`.
    pub topics: Arc<Vec<Arc<str>>>,
    /// Source addresses; connection `k` binds to `src_ips[k % len]` (none: let the kernel pick).
    pub src_ips: Vec<Ipv4Addr>,
    /// Connections this process opens.
    pub count: usize,
    /// Global index of this process's first connection, and the step between its connections
    /// (worker `i` of `n` opens `i, i+n, i+2n, …`).
    pub index_start: usize,
    /// See `index_start`.
    pub index_stride: usize,
    /// Opens per second (this process).
    pub rate: f64,
    /// Per-connection setup timeout.
    pub timeout: Duration,
    /// Setups in flight at most.
    pub max_in_flight: usize,
}

impl RampSpec {
    /// Node and topic of global connection `k`.
    pub fn placement(&self, k: usize) -> (usize, usize) {
        let n = self.nodes.len().max(1);
        (k % n, (k / n) % self.topics.len().max(1))
    }
}

/// How the setups went, in a form that can travel between processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenStats {
    /// Connections tried.
    pub attempted: u64,
    /// Connections subscribed.
    pub established: u64,
    /// Failures by reason.
    pub failed: BTreeMap<String, u64>,
    /// Established per node.
    pub per_node: Vec<u64>,
    /// Established per node and topic.
    pub per_node_topic: Vec<Vec<u64>>,
    /// The first few failure details.
    pub sample_errors: Vec<String>,
    /// Seconds from the first open to the last setup finishing.
    pub elapsed_s: f64,
    /// TCP connect time, histogram pairs (ns).
    pub tcp_ns: Vec<(u64, u64)>,
    /// Connect + upgrade time, histogram pairs (ns).
    pub upgrade_ns: Vec<(u64, u64)>,
    /// Connect + upgrade + subscribe ack, histogram pairs (ns).
    pub total_ns: Vec<(u64, u64)>,
}

impl OpenStats {
    fn new(nodes: usize, topics: usize) -> Self {
        OpenStats {
            per_node: vec![0; nodes],
            per_node_topic: vec![vec![0; topics]; nodes],
            ..Default::default()
        }
    }

    /// Failures in total.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Adds another process's numbers.
    pub fn merge(&mut self, o: &OpenStats) {
        self.attempted += o.attempted;
        self.established += o.established;
        for (k, v) in &o.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        if self.per_node.len() < o.per_node.len() {
            self.per_node.resize(o.per_node.len(), 0);
        }
        for (i, v) in o.per_node.iter().enumerate() {
            self.per_node[i] += v;
        }
        if self.per_node_topic.is_empty() {
            self.per_node_topic = o.per_node_topic.clone();
        } else {
            for (n, row) in o.per_node_topic.iter().enumerate() {
                for (t, v) in row.iter().enumerate() {
                    self.per_node_topic[n][t] += v;
                }
            }
        }
        for e in &o.sample_errors {
            if self.sample_errors.len() < 5 {
                self.sample_errors.push(e.clone());
            }
        }
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        for (mine, theirs) in [
            (&mut self.tcp_ns, &o.tcp_ns),
            (&mut self.upgrade_ns, &o.upgrade_ns),
            (&mut self.total_ns, &o.total_ns),
        ] {
            let mut h = stats::new_hist();
            stats::add_pairs(&mut h, mine);
            stats::add_pairs(&mut h, theirs);
            *mine = stats::to_pairs(&h);
        }
    }

    /// Percentiles of the three setup timings.
    pub fn latency(&self) -> SetupLatency {
        let p = |pairs: &[(u64, u64)]| {
            let mut h = stats::new_hist();
            stats::add_pairs(&mut h, pairs);
            stats::percentiles(&h)
        };
        SetupLatency {
            tcp_connect: p(&self.tcp_ns),
            upgrade: p(&self.upgrade_ns),
            subscribed: p(&self.total_ns),
        }
    }
}

/// Setup latency percentiles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetupLatency {
    /// TCP connect.
    pub tcp_connect: Percentiles,
    /// Until the 101 answer.
    pub upgrade: Percentiles,
    /// Until the subscribe ack (the whole setup).
    pub subscribed: Percentiles,
}

struct Acc {
    stats: OpenStats,
    tcp: Histogram<u64>,
    upgrade: Histogram<u64>,
    total: Histogram<u64>,
}

/// One connection left running.
pub struct Live {
    /// Node index.
    pub node: usize,
    /// Topic index.
    pub topic: usize,
    /// The receive loop (`None` when the setup failed).
    pub handle: JoinHandle<Option<Received>>,
}

/// The outcome of a ramp.
pub struct Ramped {
    /// Setup numbers.
    pub stats: OpenStats,
    /// Every connection task.
    pub live: Vec<Live>,
}

/// Opens `spec.count` connections at `spec.rate` per second and leaves each receiving into `rec`
/// until [`join_all`] stops them; `stop` ends the ramp early. Returns when every setup finished
/// (or timed out).
pub async fn ramp(
    spec: &RampSpec,
    rec: Arc<Recorder>,
    stop: CancellationToken,
    bar: &ProgressBar,
) -> Ramped {
    let acc = Arc::new(Mutex::new(Acc {
        stats: OpenStats::new(spec.nodes.len(), spec.topics.len()),
        tcp: stats::new_hist(),
        upgrade: stats::new_hist(),
        total: stats::new_hist(),
    }));
    let in_flight = spec.max_in_flight.max(1);
    let sem = Arc::new(Semaphore::new(in_flight));
    let start = tokio::time::Instant::now();
    let rate = spec.rate.max(0.001);
    let mut live = Vec::with_capacity(spec.count);
    for i in 0..spec.count {
        if stop.is_cancelled() {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let k = spec.index_start + i * spec.index_stride.max(1);
        let (node_i, topic_i) = spec.placement(k);
        let node = spec.nodes[node_i].clone();
        let topic = spec.topics[topic_i].clone();
        let src = if spec.src_ips.is_empty() {
            None
        } else {
            Some(spec.src_ips[k % spec.src_ips.len()])
        };
        let (acc, rec, bar, timeout) = (acc.clone(), rec.clone(), bar.clone(), spec.timeout);
        let handle = shards::spawn(k, async move {
            let opened = ws::open(&node, src, &topic, timeout).await;
            {
                let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
                a.stats.attempted += 1;
                match &opened {
                    Ok(c) => {
                        a.stats.established += 1;
                        a.stats.per_node[node_i] += 1;
                        a.stats.per_node_topic[node_i][topic_i] += 1;
                        stats::record(&mut a.tcp, c.timing.tcp_ns);
                        stats::record(&mut a.upgrade, c.timing.upgrade_ns);
                        stats::record(&mut a.total, c.timing.total_ns);
                    }
                    Err(e) => {
                        *a.stats.failed.entry(e.label.clone()).or_default() += 1;
                        if a.stats.sample_errors.len() < 5 {
                            a.stats
                                .sample_errors
                                .push(format!("{}: {}", e.label, e.detail));
                        }
                    }
                }
            }
            drop(permit);
            bar.inc(1);
            let conn = opened.ok()?;
            Some(ws::receive(conn, topic, rec, None).await)
        });
        live.push(Live {
            node: node_i,
            topic: topic_i,
            handle,
        });
    }
    // Every setup has finished once all permits are back.
    let _ = sem.acquire_many(in_flight as u32).await;
    let mut a = acc.lock().unwrap_or_else(|e| e.into_inner());
    a.stats.elapsed_s = stats::r3(start.elapsed().as_secs_f64());
    a.stats.tcp_ns = stats::to_pairs(&a.tcp);
    a.stats.upgrade_ns = stats::to_pairs(&a.upgrade);
    a.stats.total_ns = stats::to_pairs(&a.total);
    Ramped {
        stats: a.stats.clone(),
        live,
    }
}

/// Stops every receive loop still running and tells how they ended, by reason.
pub async fn join_all(live: Vec<Live>, limit: Duration) -> BTreeMap<String, u64> {
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    for l in &live {
        // A loop that already ended keeps its result; aborting a finished task does nothing.
        l.handle.abort();
    }
    for l in live {
        let label = match tokio::time::timeout_at(deadline, l.handle).await {
            Ok(Ok(Some(r))) => end_label(&r.end),
            Ok(Ok(None)) => continue,
            Ok(Err(e)) if e.is_cancelled() => "stopped".to_string(),
            Ok(Err(_)) => "panicked".to_string(),
            Err(_) => "not_stopped".to_string(),
        };
        *ends.entry(label).or_default() += 1;
    }
    ends
}

/// A short label for how a receive loop ended.
pub fn end_label(end: &ws::End) -> String {
    match end {
        ws::End::Stopped => "stopped".into(),
        ws::End::Left => "left".into(),
        ws::End::ServerClosed(code) => format!("server_closed_{code}"),
        ws::End::Failed(_) => "failed".into(),
    }
}

/// Connections still running.
pub fn running(live: &[Live]) -> usize {
    live.iter().filter(|l| !l.handle.is_finished()).count()
}
