//! Latency histograms and counters, sharded per OS thread so the receive path never contends.
//!
//! Each worker thread records into its own shard (one uncontended lock per message); readers merge
//! the shards when they report.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest value a histogram holds: one hour in nanoseconds.
const MAX_NS: u64 = 3_600_000_000_000;

/// A histogram of nanoseconds, 1 ns to 1 h, 3 significant figures.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// Records a value, clamping it into range.
#[inline]
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    let _ = h.record(ns.clamp(1, MAX_NS));
}

/// Percentiles of a histogram of nanoseconds, reported in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Mean, µs.
    pub mean_us: f64,
    /// Minimum, µs.
    pub min_us: f64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Maximum, µs.
    pub max_us: f64,
}

/// Summarizes a histogram of nanoseconds.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let us = |ns: u64| (ns as f64 / 1000.0 * 1000.0).round() / 1000.0;
    Percentiles {
        count: h.len(),
        mean_us: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        min_us: us(h.min()),
        p50_us: us(h.value_at_quantile(0.50)),
        p90_us: us(h.value_at_quantile(0.90)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

/// A histogram as (value, count) pairs, to pass between processes as JSON.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds (value, count) pairs into a histogram.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        let _ = h.record_n(v.clamp(1, MAX_NS), n);
    }
}

/// Counters of the receive path.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Message frames received.
    pub received: u64,
    /// Of those, duplicates.
    pub duplicates: u64,
    /// Of those, late (out of order, filling a gap).
    pub late: u64,
    /// Offsets skipped when a later one arrived first.
    pub gaps: u64,
    /// `error` frames received.
    pub errors: u64,
    /// Frames that did not parse as expected (no timestamp, wrong topic).
    pub bad_frames: u64,
    /// Latest receive time, ns since the Unix epoch.
    pub last_recv_ns: u64,
    /// Bytes the message frames took on the wire (WebSocket header included, TLS records not).
    #[serde(default)]
    pub wire_bytes: u64,
}

impl Counters {
    /// Adds another set of counters.
    pub fn add(&mut self, o: &Counters) {
        self.received += o.received;
        self.duplicates += o.duplicates;
        self.late += o.late;
        self.gaps += o.gaps;
        self.errors += o.errors;
        self.bad_frames += o.bad_frames;
        self.wire_bytes += o.wire_bytes;
        self.last_recv_ns = self.last_recv_ns.max(o.last_recv_ns);
    }

    /// Distinct messages received (duplicates excluded).
    pub fn unique(&self) -> u64 {
        self.received.saturating_sub(self.duplicates)
    }
}

/// One thread's share of the numbers.
pub struct Shard {
    /// End-to-end latency, ns.
    pub latency: Histogram<u64>,
    /// Counters.
    pub counters: Counters,
}

static NEXT_RECORDER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static LOCAL: RefCell<Vec<(u64, Arc<Mutex<Shard>>)>> = const { RefCell::new(Vec::new()) };
}

/// The per-thread sharded recorder of one run.
pub struct Recorder {
    id: u64,
    shards: Mutex<Vec<Arc<Mutex<Shard>>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            id: NEXT_RECORDER.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Recorder {
    /// A new recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Recorder::default())
    }

    /// Runs `f` on this thread's shard.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&mut Shard) -> R) -> R {
        let shard = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if let Some((_, s)) = l.iter().find(|(id, _)| *id == self.id) {
                return s.clone();
            }
            let s = Arc::new(Mutex::new(Shard {
                latency: new_hist(),
                counters: Counters::default(),
            }));
            lock(&self.shards).push(s.clone());
            // Forget shards of finished recorders so the list stays short.
            l.retain(|(_, s)| Arc::strong_count(s) > 1);
            l.push((self.id, s.clone()));
            s
        });
        let mut g = lock(&shard);
        f(&mut g)
    }

    /// The counters summed over all threads.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for s in lock(&self.shards).iter() {
            c.add(&lock(s).counters);
        }
        c
    }

    /// Merges all shards; with `reset`, starts them over.
    pub fn collect(&self, reset: bool) -> (Histogram<u64>, Counters) {
        let mut h = new_hist();
        let mut c = Counters::default();
        for s in lock(&self.shards).iter() {
            let mut g = lock(s);
            let _ = h.add(&g.latency);
            c.add(&g.counters);
            if reset {
                g.latency.reset();
                g.counters = Counters::default();
            }
        }
        (h, c)
    }
}

/// Rounds to 3 decimals for readable JSON.
pub fn r3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_values() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            record(&mut h, v * 1000); // 1..1000 µs
        }
        let p = percentiles(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99_us - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.max_us - 1000.0).abs() <= 1.0, "{p:?}");
        assert_eq!(percentiles(&new_hist()), Percentiles::default());
    }

    #[test]
    fn pairs_round_trip() {
        let mut h = new_hist();
        for v in [5u64, 5, 7_000, 9_000_000] {
            record(&mut h, v);
        }
        let mut back = new_hist();
        add_pairs(&mut back, &to_pairs(&h));
        assert_eq!(percentiles(&back), percentiles(&h));
    }

    #[test]
    fn recorder_merges_threads_and_resets() {
        let rec = Recorder::new();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for i in 0..100 {
                        rec.with(|sh| {
                            record(&mut sh.latency, 1000 + i);
                            sh.counters.received += 1;
                        });
                    }
                });
            }
        });
        assert_eq!(rec.counters().received, 300);
        let (h, c) = rec.collect(true);
        assert_eq!((h.len(), c.received), (300, 300));
        assert_eq!(rec.counters().received, 0);
        // A second recorder on the same thread keeps its own shard.
        let other = Recorder::new();
        other.with(|sh| sh.counters.received += 1);
        rec.with(|sh| sh.counters.received += 2);
        assert_eq!((other.counters().received, rec.counters().received), (1, 2));
    }
}
