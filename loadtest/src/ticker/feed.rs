//! The ticker's price feed: a backend posting batches of ticks to `POST /v1/publish` with an API
//! key, paced to a total rate, and remembering from the answers which offsets each topic got, so
//! the dashboards can be checked against exact numbers (every offset for a fast one, the last one
//! for a slow one).
//!
//! It runs on a thread and runtime of its own, like the fan-out publishers, so its CPU time is
//! told apart from the dashboards' (`RUSAGE_THREAD`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::procfs;
use crate::publish::PubConn;
use crate::scan::write_payload;
use crate::stats::{self, Percentiles, r3};
use crate::ws::{Node, now_ns};

/// What the feed is asked to do.
#[derive(Debug, Clone)]
pub struct FeedSpec {
    /// The node whose publish API takes the batches.
    pub node: Node,
    /// Topic names; message `i` goes to topic `i % topics.len()`.
    pub topics: Arc<Vec<Arc<str>>>,
    /// Messages per second, all connections together.
    pub rate: f64,
    /// Messages in total.
    pub count: u64,
    /// Messages per batch (per request).
    pub batch: usize,
    /// Keep-alive connections, each with one batch in flight at a time.
    pub connections: usize,
    /// Size of each message's `data`, bytes.
    pub payload: usize,
    /// `Authorization: Bearer` value.
    pub api_key: Option<String>,
    /// Hard stop, whatever is left.
    pub max_time: Duration,
}

/// The offsets one topic got from the publish answers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicOffsets {
    /// Messages the node took.
    pub count: u64,
    /// The lowest offset answered (0: none).
    pub first: u64,
    /// The highest offset answered: the topic's final value once publishing stopped.
    pub last: u64,
}

impl TopicOffsets {
    fn add(&mut self, offset: u64) {
        self.count += 1;
        if self.first == 0 || offset < self.first {
            self.first = offset;
        }
        self.last = self.last.max(offset);
    }

    fn merge(&mut self, o: &TopicOffsets) {
        self.count += o.count;
        if o.first != 0 && (self.first == 0 || o.first < self.first) {
            self.first = o.first;
        }
        self.last = self.last.max(o.last);
    }

    /// The offset before the first message of the run: a subscriber that got everything received
    /// exactly `base + 1 ..= last`.
    pub fn base(&self) -> u64 {
        self.first.saturating_sub(1)
    }
}

/// What the feed did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FeedResult {
    /// Messages offered per second.
    pub offered_rate: f64,
    /// Messages taken per second, from the first request to the last answer.
    pub achieved_rate: f64,
    /// Messages sent (in requests that went out).
    pub sent: u64,
    /// Messages the node took (answered 200).
    pub ok: u64,
    /// Requests sent.
    pub batches: u64,
    /// Failed requests by reason.
    pub failed: BTreeMap<String, u64>,
    /// Request round trip of a batch.
    pub batch_latency: Percentiles,
    /// How far behind schedule the last batch went out, ms (0 when on time): past a few
    /// milliseconds, the node did not take the offered rate.
    pub behind_ms: f64,
    /// Seconds from the first request to the last answer.
    pub elapsed_s: f64,
    /// CPU time of the feed's thread, s.
    pub cpu_s: f64,
    /// Per topic: the offsets the node answered.
    #[serde(skip)]
    pub topics: Vec<TopicOffsets>,
    /// When the first request went out, ns since the Unix epoch.
    #[serde(skip)]
    pub first_send_ns: u64,
    /// When the last answer came back.
    #[serde(skip)]
    pub last_answer_ns: u64,
}

impl FeedResult {
    /// Failed requests in total.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Whether every topic's offsets are contiguous (nobody else published to them meanwhile).
    pub fn contiguous(&self) -> bool {
        self.topics
            .iter()
            .all(|t| t.count == 0 || t.last - t.base() == t.count)
    }
}

/// The answer of `POST /v1/publish`, of which only the offsets matter (in message order).
#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

#[derive(Deserialize)]
struct BatchResult {
    offset: u64,
}

/// Writes the body of batch `k`: `{"messages":[{"topic":…,"data":{"t":…,"s":…,"pad":…}},…]}`,
/// where message `i` goes to topic `i % T` with per-topic sequence `i / T + 1`.
pub fn write_batch(out: &mut Vec<u8>, spec: &FeedSpec, k: u64, t_ns: u64, scratch: &mut Vec<u8>) {
    let ntopics = spec.topics.len() as u64;
    let from = k * spec.batch as u64;
    let to = (from + spec.batch as u64).min(spec.count);
    out.clear();
    out.extend_from_slice(b"{\"messages\":[");
    for i in from..to {
        if i > from {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"topic\":\"");
        out.extend_from_slice(spec.topics[(i % ntopics) as usize].as_bytes());
        out.extend_from_slice(b"\",\"data\":");
        write_payload(scratch, t_ns, i / ntopics + 1, spec.payload);
        out.extend_from_slice(scratch);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// Runs the feed on a thread of its own and returns what it did.
pub fn run(spec: FeedSpec) -> anyhow::Result<FeedResult> {
    anyhow::ensure!(spec.connections > 0, "at least one feed connection");
    anyhow::ensure!(spec.batch > 0, "batches of at least one message");
    anyhow::ensure!(!spec.topics.is_empty(), "at least one topic");
    std::thread::Builder::new()
        .name("feed".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(feed(spec))
        })
        .context("spawning the feed thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the feed thread panicked"))?
}

/// One connection's share of the result.
struct Part {
    r: FeedResult,
    hist: hdrhistogram::Histogram<u64>,
}

async fn feed(spec: FeedSpec) -> anyhow::Result<FeedResult> {
    let mut conns = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        conns.push(PubConn::open(spec.node.clone(), 0).await?);
    }
    let cpu0 = procfs::cpu_time(true);
    let spec = Arc::new(spec);
    let batches = spec.count.div_ceil(spec.batch as u64);
    let nconn = conns.len() as u64;
    let start = tokio::time::Instant::now();
    let hard_stop = start + spec.max_time;
    let per_batch_s = spec.batch as f64 / spec.rate.max(0.001);
    let tasks = conns.into_iter().enumerate().map(|(c, mut conn)| {
        let spec = spec.clone();
        async move {
            let mut part = Part {
                r: FeedResult {
                    topics: vec![TopicOffsets::default(); spec.topics.len()],
                    ..Default::default()
                },
                hist: stats::new_hist(),
            };
            let (mut body, mut scratch) = (Vec::new(), Vec::new());
            let mut k = c as u64;
            while k < batches {
                let due = start + Duration::from_secs_f64(per_batch_s * k as f64);
                let now = tokio::time::Instant::now();
                if due > now {
                    tokio::time::sleep_until(due).await;
                } else {
                    part.r.behind_ms = (now - due).as_secs_f64() * 1000.0;
                }
                if tokio::time::Instant::now() >= hard_stop {
                    break;
                }
                let sent_at = now_ns();
                write_batch(&mut body, &spec, k, sent_at, &mut scratch);
                let n = ((k + 1) * spec.batch as u64).min(spec.count) - k * spec.batch as u64;
                let answer = conn
                    .post(
                        "/v1/publish",
                        Bytes::copy_from_slice(&body),
                        spec.api_key.as_deref(),
                    )
                    .await;
                let answered = now_ns();
                if part.r.first_send_ns == 0 {
                    part.r.first_send_ns = sent_at;
                }
                part.r.last_answer_ns = answered;
                part.r.batches += 1;
                part.r.sent += n;
                stats::record(&mut part.hist, answered.saturating_sub(sent_at));
                match answer.and_then(|b| offsets_of(&b, n as usize)) {
                    Ok(offsets) => {
                        part.r.ok += n;
                        let first = k * spec.batch as u64;
                        let ntopics = spec.topics.len() as u64;
                        for (j, off) in offsets.into_iter().enumerate() {
                            part.r.topics[((first + j as u64) % ntopics) as usize].add(off);
                        }
                    }
                    Err(label) => *part.r.failed.entry(label).or_default() += 1,
                }
                k += nconn;
            }
            part
        }
    });
    let parts = futures_util::future::join_all(tasks).await;
    let mut total = FeedResult {
        offered_rate: r3(spec.rate),
        topics: vec![TopicOffsets::default(); spec.topics.len()],
        ..Default::default()
    };
    let mut hist = stats::new_hist();
    for p in parts {
        total.sent += p.r.sent;
        total.ok += p.r.ok;
        total.batches += p.r.batches;
        for (k, v) in p.r.failed {
            *total.failed.entry(k).or_default() += v;
        }
        for (t, o) in total.topics.iter_mut().zip(&p.r.topics) {
            t.merge(o);
        }
        if p.r.first_send_ns != 0
            && (total.first_send_ns == 0 || p.r.first_send_ns < total.first_send_ns)
        {
            total.first_send_ns = p.r.first_send_ns;
        }
        total.last_answer_ns = total.last_answer_ns.max(p.r.last_answer_ns);
        total.behind_ms = total.behind_ms.max(p.r.behind_ms);
        let _ = hist.add(&p.hist);
    }
    let span = total.last_answer_ns.saturating_sub(total.first_send_ns) as f64 / 1e9;
    total.elapsed_s = r3(span);
    total.achieved_rate = if span > 0.0 {
        r3(total.ok as f64 / span)
    } else {
        0.0
    };
    total.behind_ms = r3(total.behind_ms);
    total.batch_latency = stats::percentiles(&hist);
    total.cpu_s = r3((procfs::cpu_time(true) - cpu0).as_secs_f64());
    Ok(total)
}

/// The offsets of a batch answer, which must have one result per message sent.
fn offsets_of(body: &[u8], n: usize) -> Result<Vec<u64>, String> {
    let a: BatchAnswer = serde_json::from_slice(body).map_err(|_| "bad_answer".to_string())?;
    if a.results.len() != n {
        return Err("short_answer".into());
    }
    Ok(a.results.into_iter().map(|r| r.offset).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(count: u64, batch: usize) -> FeedSpec {
        FeedSpec {
            node: Node::parse("127.0.0.1:9").unwrap(),
            topics: Arc::new(vec![
                Arc::from("p.t0"),
                Arc::from("p.t1"),
                Arc::from("p.t2"),
            ]),
            rate: 100.0,
            count,
            batch,
            connections: 1,
            payload: 0,
            api_key: None,
            max_time: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_batch_spreads_messages_over_topics_with_per_topic_sequences() {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        // Batch 1 of batches of 4 out of 7 messages: messages 4, 5, 6.
        write_batch(&mut out, &spec(7, 4), 1, 99, &mut scratch);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let m = v["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        let got: Vec<(String, u64, u64)> = m
            .iter()
            .map(|m| {
                (
                    m["topic"].as_str().unwrap().to_string(),
                    m["data"]["s"].as_u64().unwrap(),
                    m["data"]["t"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("p.t1".to_string(), 2, 99),
                ("p.t2".to_string(), 2, 99),
                ("p.t0".to_string(), 3, 99)
            ]
        );
    }

    #[test]
    fn offsets_come_from_the_answer_in_message_order() {
        let body = br#"{"results":[{"topic":"a","epoch":"e","offset":7},{"topic":"b","epoch":"e","offset":3}]}"#;
        assert_eq!(offsets_of(body, 2), Ok(vec![7, 3]));
        assert_eq!(offsets_of(body, 3), Err("short_answer".into()));
        assert_eq!(offsets_of(b"{}", 0), Err("bad_answer".into()));
    }

    #[test]
    fn topic_offsets_merge_and_tell_the_base() {
        let mut a = TopicOffsets::default();
        a.add(12);
        a.add(11);
        let mut b = TopicOffsets::default();
        b.add(13);
        a.merge(&b);
        assert_eq!(
            a,
            TopicOffsets {
                count: 3,
                first: 11,
                last: 13
            }
        );
        assert_eq!(a.base(), 10);
        let r = FeedResult {
            topics: vec![a, TopicOffsets::default()],
            ..Default::default()
        };
        assert!(r.contiguous());
    }
}
