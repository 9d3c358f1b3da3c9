//! What the ticker's dashboards saw, held against what the feed published: per dashboard and per
//! kind (fast, slow), and the list of what went wrong.

use std::time::Duration;

use serde::Serialize;

use super::dashboard::Tally;
use super::feed::FeedResult;
use crate::report::CpuWindow;
use crate::stats::{self, Percentiles, r3};

/// A dashboard once stopped: its kind, what it counted, and the last offset it held per topic.
pub struct Finished {
    /// Whether it read slowly.
    pub slow: bool,
    /// Its counts.
    pub tally: Tally,
    /// Per topic, the last offset it held.
    pub last: Vec<u64>,
}

/// One dashboard in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Whether it read slowly.
    pub slow: bool,
    /// Message frames received.
    pub frames: u64,
    /// Values it never got although a later one of the same topic arrived: conflated.
    pub skipped: u64,
    /// Published messages it never got (skipped, and the ones after its last of each topic).
    pub lost: u64,
    /// Offsets at or below the last one of their topic.
    pub violations: u64,
    /// Topics whose final value it did not hold at the end.
    pub behind_topics: u64,
    /// Malformed frames and error frames.
    pub bad_frames: u64,
    /// How it ended (`stopped`: by the run, as it should).
    pub end: String,
    /// The first order violation, described.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_violation: Option<String>,
}

/// The dashboards of one kind together.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Kind {
    /// How many.
    pub dashboards: usize,
    /// Message frames delivered to them.
    pub frames: u64,
    /// Frames per second per dashboard, from the first publish until the kind held every final
    /// value.
    pub frames_per_s_each: f64,
    /// Values skipped (conflated, as the dashboards saw it).
    pub skipped: u64,
    /// Published messages not received.
    pub lost: u64,
    /// Order violations.
    pub violations: u64,
    /// Topics not at their final value at the end, summed over the dashboards.
    pub behind_topics: u64,
    /// Age of each value when it arrived (publish → receive): for a slow dashboard, how far behind
    /// the latest value it was.
    pub age: Percentiles,
    /// Milliseconds from the last publish answer until every dashboard of the kind held the final
    /// value of every topic (`None`: not within --catchup-timeout).
    pub caught_up_ms: Option<f64>,
}

/// The whole outcome.
pub struct Outcome {
    /// Fast dashboards.
    pub fast: Kind,
    /// Slow dashboards.
    pub slow: Kind,
    /// Every dashboard.
    pub rows: Vec<Row>,
}

impl Outcome {
    /// Holds the dashboards' counts against the feed's offsets.
    pub fn new(
        fed: &FeedResult,
        done: &[Finished],
        caught_up_ms: &(Option<f64>, Option<f64>),
        window: &CpuWindow,
    ) -> Outcome {
        let mut rows = Vec::with_capacity(done.len());
        let (mut fast, mut slow) = (Kind::default(), Kind::default());
        let (mut fast_age, mut slow_age) = (stats::new_hist(), stats::new_hist());
        for d in done {
            let row = row(fed, d);
            let (kind, age) = if d.slow {
                (&mut slow, &mut slow_age)
            } else {
                (&mut fast, &mut fast_age)
            };
            kind.dashboards += 1;
            kind.frames += row.frames;
            kind.skipped += row.skipped;
            kind.lost += row.lost;
            kind.violations += row.violations;
            kind.behind_topics += row.behind_topics;
            let _ = age.add(&d.tally.age);
            rows.push(row);
        }
        for (kind, age, caught) in [
            (&mut slow, &slow_age, caught_up_ms.0),
            (&mut fast, &fast_age, caught_up_ms.1),
        ] {
            kind.age = stats::percentiles(age);
            kind.caught_up_ms = caught;
            // The kind's reading time: from the first publish until it held every final value
            // (or, when it never did, the whole measured window).
            let secs = caught.map_or(window.wall_s, |ms| fed.elapsed_s + ms / 1000.0);
            if kind.dashboards > 0 && secs > 0.0 {
                kind.frames_per_s_each = r3(kind.frames as f64 / kind.dashboards as f64 / secs);
            }
        }
        Outcome { fast, slow, rows }
    }

    /// Frames delivered to all dashboards.
    pub fn deliveries(&self) -> u64 {
        self.fast.frames + self.slow.frames
    }

    /// Server CPU per published tick (taking the batch, and its fan-out or conflation to every
    /// dashboard), µs.
    pub fn server_us_per_publish(&self, servers: &[(u32, f64)], fed: &FeedResult) -> Option<f64> {
        (!servers.is_empty() && fed.ok > 0)
            .then(|| r3(servers.iter().map(|s| s.1).sum::<f64>() * 1e6 / fed.ok as f64))
    }

    /// Server CPU per delivered frame, µs.
    pub fn server_us_per_delivery(&self, servers: &[(u32, f64)]) -> Option<f64> {
        let d = self.deliveries();
        (!servers.is_empty() && d > 0)
            .then(|| r3(servers.iter().map(|s| s.1).sum::<f64>() * 1e6 / d as f64))
    }

    /// Everything that went wrong; empty when the run passed.
    pub fn failures(&self, fed: &FeedResult, limit: Duration, metrics_read: bool) -> Vec<String> {
        let mut f = Vec::new();
        if fed.failed_total() > 0 {
            f.push(format!(
                "feed: {} batches failed ({:?}): the final values are not known exactly",
                fed.failed_total(),
                fed.failed
            ));
        }
        if !fed.contiguous() {
            f.push(
                "feed: a topic's offsets are not contiguous (someone else publishes to these topics?)"
                    .into(),
            );
        }
        for (i, r) in self.rows.iter().enumerate() {
            let who = format!("dashboard {i} ({})", if r.slow { "slow" } else { "fast" });
            if r.violations > 0 {
                f.push(format!(
                    "{who}: {} order violations, the first: {}",
                    r.violations,
                    r.first_violation.as_deref().unwrap_or("?")
                ));
            }
            if !r.slow && r.lost > 0 {
                f.push(format!(
                    "{who}: lost {} of {} messages (it fell behind and was conflated, or they were dropped)",
                    r.lost, fed.ok
                ));
            }
            if r.end != "stopped" {
                f.push(format!("{who}: ended before the run did: {}", r.end));
            }
            if r.bad_frames > 0 {
                f.push(format!("{who}: {} malformed or error frames", r.bad_frames));
            }
        }
        for (name, kind) in [("slow", &self.slow), ("fast", &self.fast)] {
            if kind.dashboards > 0 && kind.caught_up_ms.is_none() {
                f.push(format!(
                    "{name} dashboards did not all hold the final value of every topic within {:.1} s of the last publish ({} topics behind)",
                    limit.as_secs_f64(),
                    kind.behind_topics
                ));
            }
        }
        if !metrics_read {
            f.push("could not read the node's /metrics after the run".into());
        }
        f
    }

    /// One summary line per kind on stderr.
    pub fn print(&self, server_us: Option<f64>, server_us_publish: Option<f64>) {
        for (name, k) in [("fast", &self.fast), ("slow", &self.slow)] {
            if k.dashboards == 0 {
                continue;
            }
            eprintln!(
                "ticker {name}: {} dashboards, {} frames ({:.0}/s each), skipped {}, lost {}, order violations {}; age p50 {:.1} ms p99 {:.1} ms max {:.1} ms; final values held {}",
                k.dashboards,
                k.frames,
                k.frames_per_s_each,
                k.skipped,
                k.lost,
                k.violations,
                k.age.p50_us / 1000.0,
                k.age.p99_us / 1000.0,
                k.age.max_us / 1000.0,
                k.caught_up_ms
                    .map_or("NOT within the timeout".into(), |ms| format!(
                        "{ms:.1} ms after the last publish"
                    )),
            );
        }
        let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        eprintln!(
            "ticker server: {} µs per delivery, {} µs per published tick",
            us(server_us),
            us(server_us_publish)
        );
    }
}

/// One dashboard against the feed.
fn row(fed: &FeedResult, d: &Finished) -> Row {
    let (mut skipped, mut lost, mut behind) = (0, 0, 0);
    for (t, published) in fed.topics.iter().enumerate() {
        let got = d.tally.counts[t];
        let last = d.last[t];
        if last > published.base() {
            skipped += (last - published.base()).saturating_sub(got);
        }
        lost += published.count.saturating_sub(got);
        if last < published.last {
            behind += 1;
        }
    }
    Row {
        slow: d.slow,
        frames: d.tally.frames,
        skipped,
        lost,
        violations: d.tally.violations,
        behind_topics: behind,
        bad_frames: d.tally.bad_frames + d.tally.errors,
        end: d.tally.end.clone(),
        first_violation: d.tally.first_violation.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::feed::TopicOffsets;
    use super::*;

    fn tally(counts: Vec<u64>, frames: u64) -> Tally {
        Tally {
            frames,
            counts,
            violations: 0,
            first_violation: None,
            bad_frames: 0,
            errors: 0,
            age: stats::new_hist(),
            end: "stopped".into(),
        }
    }

    #[test]
    fn fast_must_get_everything_and_slow_must_end_on_the_final_values() {
        // Two topics, offsets 11..=20 and 1..=5 published in this run.
        let fed = FeedResult {
            ok: 15,
            elapsed_s: 1.999,
            topics: vec![
                TopicOffsets {
                    count: 10,
                    first: 11,
                    last: 20,
                },
                TopicOffsets {
                    count: 5,
                    first: 1,
                    last: 5,
                },
            ],
            ..Default::default()
        };
        let done = vec![
            // Fast, complete.
            Finished {
                slow: false,
                tally: tally(vec![10, 5], 15),
                last: vec![20, 5],
            },
            // Fast, but 2 skipped on topic 0.
            Finished {
                slow: false,
                tally: tally(vec![8, 5], 13),
                last: vec![20, 5],
            },
            // Slow: 3 and 2 values, on the final ones.
            Finished {
                slow: true,
                tally: tally(vec![3, 2], 5),
                last: vec![20, 5],
            },
        ];
        let window = CpuWindow {
            wall_s: 2.0,
            ..Default::default()
        };
        let o = Outcome::new(&fed, &done, &(Some(12.5), Some(1.0)), &window);
        assert_eq!((o.rows[0].lost, o.rows[0].skipped), (0, 0));
        assert_eq!((o.rows[1].lost, o.rows[1].skipped), (2, 2));
        assert_eq!(
            (o.rows[2].lost, o.rows[2].skipped, o.rows[2].behind_topics),
            (10, 10, 0)
        );
        assert_eq!((o.fast.frames, o.slow.frames, o.deliveries()), (28, 5, 33));
        // 14 frames each over 1.999 s of publishing + 1 ms to the final values.
        assert_eq!(o.fast.frames_per_s_each, 7.0);
        assert_eq!(o.server_us_per_publish(&[(1, 0.000015)], &fed), Some(1.0));
        assert_eq!(o.slow.caught_up_ms, Some(12.5));
        let f = o.failures(&fed, Duration::from_secs(1), true);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].starts_with("dashboard 1 (fast): lost 2 of 15"),
            "{f:?}"
        );
        assert_eq!(o.server_us_per_delivery(&[(1, 0.000033)]), Some(1.0));

        // A slow dashboard one value short of the end, never caught up: both reported.
        let done = vec![Finished {
            slow: true,
            tally: tally(vec![3, 2], 5),
            last: vec![19, 5],
        }];
        let o = Outcome::new(&fed, &done, &(None, None), &window);
        assert_eq!(o.rows[0].behind_topics, 1);
        let f = o.failures(&fed, Duration::from_secs(1), false);
        assert!(
            f.iter()
                .any(|m| m.starts_with("slow dashboards did not all hold")),
            "{f:?}"
        );
        assert!(f.iter().any(|m| m.contains("/metrics")), "{f:?}");
    }
}
