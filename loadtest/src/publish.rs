//! Publishers: keep-alive HTTP/1.1 connections (hyper client) posting timestamped payloads at a set
//! rate, or (with `--redis-url`) raw `PUBLISH`es straight into Redis on the same schedule. They run
//! on a thread and runtime of their own, so their CPU time can be told apart from the receive path's
//! (`RUSAGE_THREAD`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::procfs;
use crate::redis_pub::{RedisPub, RedisTarget};
use crate::scan::write_payload;
use crate::stats::{self, Percentiles};
use crate::ws::{Node, Protocol, now_ns};

/// One batch of publishing: `count` messages at `rate` per second, spread round robin over the
/// topics, stopping at `max_time` whatever happens.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// Messages per second (all connections together).
    pub rate: f64,
    /// Messages in total.
    pub count: u64,
    /// Hard stop.
    pub max_time: Duration,
}

/// What a job did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishResult {
    /// How the messages went out: `http` (the publish API; offsets assigned) or `redis` (raw
    /// `PUBLISH` into Redis; no offsets, checked by `s`).
    #[serde(default)]
    pub path: String,
    /// Requests sent.
    pub sent: u64,
    /// Answered 200.
    pub ok: u64,
    /// Failed (status or transport), by reason.
    pub failed: BTreeMap<String, u64>,
    /// Successful publishes per node and topic: `ok[node][topic]` (for `redis`, all in row 0).
    pub ok_by_node_topic: Vec<Vec<u64>>,
    /// `redis`: successful `PUBLISH`es that no Redis subscriber (gateway node) received.
    #[serde(default)]
    pub zero_receivers: u64,
    /// Publish request round trip.
    pub latency: Percentiles,
    /// When the first request went out, ns since the Unix epoch.
    pub first_send_ns: u64,
    /// When the last request went out.
    pub last_send_ns: u64,
    /// Achieved requests per second.
    pub achieved_rate: f64,
    /// How far behind schedule the last request went out, ms (0 when on time).
    pub behind_ms: f64,
    /// CPU time of the publisher thread during the job, s.
    pub cpu_s: f64,
}

impl PublishResult {
    /// Failed requests in total.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

struct Request {
    job: Job,
    reply: oneshot::Sender<PublishResult>,
}

/// The publisher thread and its connections.
pub struct Publishers {
    tx: Option<std::sync::mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Settings of the publisher pool.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Nodes; connection `c` goes to node `c % nodes.len()`.
    pub nodes: Vec<Node>,
    /// Keep-alive connections.
    pub connections: usize,
    /// Topics; each connection cycles through all of them.
    pub topics: Arc<Vec<Arc<str>>>,
    /// Payload size in bytes.
    pub payload: usize,
    /// `Authorization: Bearer` value for the publish API.
    pub api_key: Option<String>,
    /// Publish straight into this Redis instead of over HTTP.
    pub redis: Option<RedisTarget>,
}

impl PoolSpec {
    /// `http` or `redis`.
    pub fn path(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "http"
        }
    }
}

/// What one publisher task sends through.
enum Sender<'a> {
    Http(&'a mut PubConn),
    Redis(&'a RedisPub, usize),
}

impl Publishers {
    /// Starts the thread and opens the connections.
    pub fn start(spec: PoolSpec) -> anyhow::Result<Publishers> {
        anyhow::ensure!(spec.connections > 0, "at least one publisher connection");
        anyhow::ensure!(!spec.topics.is_empty(), "at least one topic");
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("publishers".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut conns = Vec::new();
                    let mut redis = None;
                    if let Some(target) = &spec.redis {
                        match RedisPub::open(target, &spec.topics, spec.connections).await {
                            Ok(r) => redis = Some(r),
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    for c in 0..spec.connections {
                        if redis.is_some() {
                            break;
                        }
                        let node = spec.nodes[c % spec.nodes.len()].clone();
                        match PubConn::open(node, c % spec.nodes.len()).await {
                            Ok(conn) => conns.push(conn),
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    let spec = Arc::new(spec);
                    let seqs: Arc<Vec<AtomicU64>> =
                        Arc::new(spec.topics.iter().map(|_| AtomicU64::new(0)).collect());
                    // Jobs arrive from async callers on other runtimes; a blocking recv would stall
                    // this runtime, so poll the channel from a blocking task.
                    let rx = Arc::new(std::sync::Mutex::new(rx));
                    loop {
                        let rx2 = rx.clone();
                        let req = tokio::task::spawn_blocking(move || {
                            rx2.lock().unwrap_or_else(|e| e.into_inner()).recv().ok()
                        })
                        .await
                        .ok()
                        .flatten();
                        let Some(req) = req else { return };
                        let senders: Vec<Sender<'_>> = match &redis {
                            Some(r) => (0..spec.connections).map(|c| Sender::Redis(r, c)).collect(),
                            None => conns.iter_mut().map(Sender::Http).collect(),
                        };
                        let result = run_job(&spec, senders, &seqs, req.job).await;
                        let _ = req.reply.send(result);
                    }
                });
            })
            .context("spawning the publisher thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Publishers {
                tx: Some(tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e.context("opening publisher connections")),
            Err(_) => anyhow::bail!("publisher thread ended early"),
        }
    }

    /// Runs one job and waits for it.
    pub async fn run(&self, job: Job) -> anyhow::Result<PublishResult> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .context("publishers stopped")?
            .send(Request { job, reply })
            .map_err(|_| anyhow::anyhow!("publisher thread is gone"))?;
        rx.await.context("publisher thread dropped the job")
    }
}

impl Drop for Publishers {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One keep-alive HTTP/1.1 connection to a node's publish API (plain or TLS), reconnected when the
/// server closed it. Shared with `ticker`'s batch feed.
pub(crate) struct PubConn {
    node: Node,
    node_index: usize,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl PubConn {
    /// Connects to `node` (number `node_index` of the run's nodes).
    pub(crate) async fn open(node: Node, node_index: usize) -> anyhow::Result<PubConn> {
        let mut c = PubConn {
            node,
            node_index,
            sender: None,
        };
        c.connect().await?;
        Ok(c)
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let tcp = TcpStream::connect(self.node.addr)
            .await
            .with_context(|| format!("connecting to {}", self.node.addr))?;
        tcp.set_nodelay(true)?;
        let sender = match &self.node.tls {
            None => {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
            Some(tls) => {
                let stream = tls
                    .connect(tcp)
                    .await
                    .with_context(|| format!("TLS to {}", self.node.addr))?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
        };
        self.sender = Some(sender);
        Ok(())
    }

    /// Posts one message; returns the offset from the answer.
    async fn publish(
        &mut self,
        topic: &str,
        body: Bytes,
        api_key: Option<&str>,
    ) -> Result<u64, String> {
        let path = self.node.protocol.publish_path(topic);
        let body = self.post(&path, body, api_key).await?;
        Ok(offset_field(&body).unwrap_or(0))
    }

    /// Posts a JSON `body` to `path`; returns the answer's body when it is a 2xx, else a short
    /// label of what failed (`http_503`, `conn_closed`, …) for the report to count.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        body: Bytes,
        api_key: Option<&str>,
    ) -> Result<Bytes, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await.map_err(|_| "reconnect".to_string())?;
        }
        let sender = self.sender.as_mut().ok_or("no connection")?;
        sender.ready().await.map_err(|_| "not_ready".to_string())?;
        let mut req = http::Request::post(path)
            .header(http::header::HOST, self.node.host())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(k) = api_key {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|_| "bad_request".to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| {
            self.sender = None;
            if e.is_closed() || e.is_incomplete_message() {
                "conn_closed".to_string()
            } else {
                "transport".to_string()
            }
        })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| "body".to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("http_{}", status.as_u16()));
        }
        Ok(body)
    }
}

/// The `offset` of a publish answer `{"epoch":"…","offset":N}`.
pub fn offset_field(body: &[u8]) -> Option<u64> {
    let key = b"\"offset\":";
    let i = body.windows(key.len()).position(|w| w == key)? + key.len();
    body[i..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(None, |acc: Option<u64>, &b| {
            Some(acc.unwrap_or(0).checked_mul(10)? + u64::from(b - b'0'))
        })
}

async fn run_job(
    spec: &Arc<PoolSpec>,
    senders: Vec<Sender<'_>>,
    seqs: &Arc<Vec<AtomicU64>>,
    job: Job,
) -> PublishResult {
    let cpu0 = procfs::cpu_time(true);
    let nconn = senders.len() as u64;
    let start = tokio::time::Instant::now();
    let hard_stop = start + job.max_time;
    let ntopics = spec.topics.len() as u64;
    let rate = job.rate.max(0.001);
    // nchan messages carry no offset, so subscribers check order by `s`: a topic's publishes then go
    // out one at a time, as with raw Redis publishes (pubgate orders by offset and needs no turn).
    let turns: Option<Vec<tokio::sync::Mutex<()>>> = spec
        .nodes
        .iter()
        .any(|n| n.protocol == Protocol::Nchan)
        .then(|| {
            spec.topics
                .iter()
                .map(|_| tokio::sync::Mutex::new(()))
                .collect()
        });
    let turns = &turns;
    let tasks = senders.into_iter().enumerate().map(|(c, mut sender)| {
        let spec = spec.clone();
        let seqs = seqs.clone();
        async move {
            let mut r = PublishResult {
                ok_by_node_topic: vec![vec![0; spec.topics.len()]; spec.nodes.len()],
                ..Default::default()
            };
            let mut hist = stats::new_hist();
            let mut buf = Vec::with_capacity(spec.payload + 64);
            let mut k = c as u64;
            let mut behind = Duration::ZERO;
            while k < job.count {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                let now = tokio::time::Instant::now();
                if due > now {
                    tokio::time::sleep_until(due).await;
                } else {
                    behind = now - due;
                }
                if tokio::time::Instant::now() >= hard_stop {
                    break;
                }
                // Every connection cycles through all topics (so with several nodes and no shared
                // broker each node's subscribers of every topic get messages).
                let t = ((c as u64 + k / nconn) % ntopics) as usize;
                let (sent_at, outcome) = match &mut sender {
                    Sender::Http(conn) => {
                        let _turn = match turns {
                            Some(locks) => Some(locks[t].lock().await),
                            None => None,
                        };
                        let seq = seqs[t].fetch_add(1, Ordering::Relaxed) + 1;
                        let sent_at = now_ns();
                        write_payload(&mut buf, sent_at, seq, spec.payload);
                        let body = Bytes::copy_from_slice(&buf);
                        let node = conn.node_index;
                        let res = conn
                            .publish(&spec.topics[t], body, spec.api_key.as_deref())
                            .await;
                        (sent_at, res.map(|_| (node, 1)))
                    }
                    Sender::Redis(rp, rc) => {
                        // The topic's turn first, then its next `s`: Redis sees them in order.
                        let _turn = rp.turn(t).await;
                        let seq = seqs[t].fetch_add(1, Ordering::Relaxed) + 1;
                        let sent_at = now_ns();
                        write_payload(&mut buf, sent_at, seq, spec.payload);
                        (sent_at, rp.publish(*rc, t, &buf).await.map(|n| (0, n)))
                    }
                };
                if r.first_send_ns == 0 {
                    r.first_send_ns = sent_at;
                }
                r.last_send_ns = sent_at;
                r.sent += 1;
                match outcome {
                    Ok((node, receivers)) => {
                        r.ok += 1;
                        r.ok_by_node_topic[node][t] += 1;
                        if receivers == 0 {
                            r.zero_receivers += 1;
                        }
                    }
                    Err(label) => *r.failed.entry(label).or_default() += 1,
                }
                stats::record(&mut hist, now_ns().saturating_sub(sent_at));
                k += nconn;
            }
            r.behind_ms = behind.as_secs_f64() * 1000.0;
            (r, hist)
        }
    });
    let parts = futures_util::future::join_all(tasks).await;
    let mut total = PublishResult {
        path: spec.path().to_string(),
        ok_by_node_topic: vec![vec![0; spec.topics.len()]; spec.nodes.len()],
        ..Default::default()
    };
    let mut hist = stats::new_hist();
    for (r, h) in parts {
        total.sent += r.sent;
        total.ok += r.ok;
        total.zero_receivers += r.zero_receivers;
        for (k, v) in r.failed {
            *total.failed.entry(k).or_default() += v;
        }
        for (n, row) in r.ok_by_node_topic.iter().enumerate() {
            for (t, v) in row.iter().enumerate() {
                total.ok_by_node_topic[n][t] += v;
            }
        }
        if r.first_send_ns != 0
            && (total.first_send_ns == 0 || r.first_send_ns < total.first_send_ns)
        {
            total.first_send_ns = r.first_send_ns;
        }
        total.last_send_ns = total.last_send_ns.max(r.last_send_ns);
        total.behind_ms = total.behind_ms.max(r.behind_ms);
        let _ = hist.add(&h);
    }
    let span = (total.last_send_ns.saturating_sub(total.first_send_ns)) as f64 / 1e9;
    total.achieved_rate = if span > 0.0 {
        stats::r3((total.sent.saturating_sub(1)) as f64 / span)
    } else {
        total.sent as f64
    };
    total.behind_ms = stats::r3(total.behind_ms);
    total.latency = stats::percentiles(&hist);
    total.cpu_s = (procfs::cpu_time(true) - cpu0).as_secs_f64();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_offset_of_a_publish_answer() {
        assert_eq!(offset_field(br#"{"epoch":"00ab","offset":42}"#), Some(42));
        assert_eq!(offset_field(br#"{"epoch":"00ab"}"#), None);
        assert_eq!(offset_field(br#"{"offset":}"#), None);
    }
}
