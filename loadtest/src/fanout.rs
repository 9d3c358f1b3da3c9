//! `fanout`: subscribers over topics, publishers at a rate, and what arrives. [`Setup`] and
//! [`Phase`] also serve `step` (step.rs) and `churn` (churn.rs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli::{self, Target};
use crate::connect::check_capacity;
use crate::procfs::{self, ProcSample};
use crate::publish::{Job, PoolSpec, PublishResult, Publishers};
use crate::ramp::{self, Live, OpenStats, RampSpec};
use crate::redis_pub::{self, RedisTarget};
use crate::report::{self, CpuWatch, CpuWindow, MachineWatch, Report};
use crate::stats::{self, Counters, Percentiles, Recorder, r3};
use crate::ws;

/// Flags of the fan-out scenarios.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,
    /// Subscriber connections (each subscribes to one topic; topics are filled round robin).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub subscribers: usize,
    /// Publishes per second (all publishers together).
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<f64>,
    /// Or: the delivery rate to aim for; the publish rate is this divided by subscribers per topic.
    #[arg(long, value_name = "PER_SEC", conflicts_with = "rate")]
    pub delivery_rate: Option<f64>,
    /// Seconds of publishing (measured).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Seconds of publishing before the measurement (not counted).
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    pub warmup: f64,
    /// Payload size in bytes (the JSON `data` of each message).
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    pub payload: usize,
    /// Publisher tasks: one keep-alive HTTP connection each (with --redis-url they share at most 4
    /// Redis connections).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub publishers: usize,
    /// Publish straight into Redis instead of over HTTP: raw `PUBLISH <prefix><topic> <payload>` to
    /// redis://127.0.0.1:PORT (loopback only; the Redis the nodes use). Such messages carry no
    /// offset, so order and loss are checked by the payload's per-topic sequence number `s`, and
    /// every subscriber of a topic counts, on every node (as with --shared-broker). fanout and step
    /// only.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// The nodes' `broker.prefix`, which channels start with (with --redis-url).
    #[arg(long, default_value = "pubgate:", value_name = "PREFIX")]
    pub broker_prefix: String,
    /// Seconds to wait after the last publish for stragglers.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub drain: f64,
    /// Publish to the first N --url nodes only (default: all of them). With --shared-broker, 1 sends
    /// every publish to the first node, so the other nodes' subscribers get each message across the
    /// broker (the cross-node hop) and the first node's locally.
    #[arg(long, value_name = "N")]
    pub publish_nodes: Option<usize>,
    /// The nodes share one broker (Redis): a publish to any node reaches subscribers on all.
    #[arg(long)]
    pub shared_broker: bool,
    /// API key for the publish API (Authorization: Bearer).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Threads for the receive path, each with its own share of the connections (default: one per
    /// core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// The measured outcome of one publishing window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phase {
    /// Offered publishes per second.
    pub offered_publish_rate: f64,
    /// Offered deliveries per second (publish rate × subscribers per topic).
    pub offered_delivery_rate: f64,
    /// Seconds of publishing asked for.
    pub duration_s: f64,
    /// What the publishers did.
    pub publish: PublishResult,
    /// Deliveries expected: successful publishes × live subscribers of their topic.
    pub expected: u64,
    /// Distinct messages received.
    pub delivered: u64,
    /// Message frames received (duplicates included).
    pub received: u64,
    /// Expected but not received.
    pub lost: u64,
    /// `lost` / `expected`, %.
    pub loss_pct: f64,
    /// Receive-side counters (duplicates, late, gaps, errors, bad frames).
    pub counters: Counters,
    /// Delivered per second, from the first publish to the last delivery.
    pub deliveries_per_s: f64,
    /// WebSocket bytes on the wire per received message frame (header included; with --deflate,
    /// compressed size).
    #[serde(default)]
    pub wire_bytes_per_delivery: f64,
    /// End-to-end latency: publisher send → subscriber receive.
    pub latency: Percentiles,
    /// Subscribers still connected at the end.
    pub subscribers_alive: u64,
    /// CPU of each --server-pid, s.
    pub server_cpu_s: Vec<(u32, f64)>,
    /// Server CPU per delivery (all servers), µs.
    pub server_us_per_delivery: Option<f64>,
    /// Servers' and brokers' CPU per delivery, µs (with --broker-pid).
    #[serde(default)]
    pub server_and_broker_us_per_delivery: Option<f64>,
    /// This tool's CPU: all, publisher thread, receive side, and receive side per message (µs).
    pub tool: ToolCpu,
    /// Where the machine's CPU went.
    pub cpu: CpuWindow,
}

/// The tool's own CPU in a phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolCpu {
    /// Whole process, s.
    pub total_s: f64,
    /// The publisher thread, s.
    pub publisher_s: f64,
    /// Everything else (the receive path), s.
    pub receive_s: f64,
    /// Receive-side CPU per received message, µs.
    pub us_per_received: f64,
}

/// Subscribers connected, with publishers ready.
pub struct Setup {
    args: FanoutArgs,
    pub(crate) nodes: Vec<ws::Node>,
    pub(crate) topics: Arc<Vec<Arc<str>>>,
    /// Setup numbers of the subscribers.
    pub open: OpenStats,
    live: Vec<Live>,
    rec: Arc<Recorder>,
    stop: CancellationToken,
    publishers: Publishers,
    pub(crate) before: Vec<ProcSample>,
}

impl FanoutArgs {
    /// Where raw publishes go, with --redis-url (checked: redis://, loopback).
    pub fn redis_target(&self) -> anyhow::Result<Option<RedisTarget>> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        redis_pub::check_url(url)?;
        anyhow::ensure!(
            !self.broker_prefix.is_empty(),
            "--broker-prefix must not be empty"
        );
        Ok(Some(RedisTarget {
            url: url.clone(),
            prefix: self.broker_prefix.clone(),
        }))
    }

    /// Does a publish reach the subscribers of every node (a shared broker, or straight into it)?
    fn reaches_all_nodes(&self) -> bool {
        self.shared_broker || self.redis_url.is_some()
    }
}

impl Setup {
    /// Connects the subscribers and the publishers.
    pub async fn start(args: &FanoutArgs, extra_conns: usize) -> anyhow::Result<Setup> {
        let t = &args.target;
        let nodes = t.nodes()?;
        let redis = args.redis_target()?;
        anyhow::ensure!(args.subscribers > 0, "--subscribers must be at least 1");
        anyhow::ensure!(
            (1..=256).contains(&args.publishers),
            "--publishers must be 1..=256"
        );
        anyhow::ensure!(args.payload <= 1 << 20, "--payload must be at most 1 MiB");
        check_capacity(
            args.subscribers + extra_conns + args.publishers,
            1,
            "subscribers",
        )?;
        let before = t
            .server_pids
            .iter()
            .map(|&p| {
                procfs::sample(p).with_context(|| format!("--server-pid {p}: no such process"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let topics = t.topic_names(20);
        let rec = Recorder::new();
        let stop = CancellationToken::new();
        let spec = RampSpec {
            nodes: nodes.clone(),
            topics: topics.clone(),
            src_ips: ws::source_ips(t.source_ip_count(args.subscribers + extra_conns)),
            count: args.subscribers,
            index_start: 0,
            index_stride: 1,
            rate: t.connect_rate,
            timeout: t.timeout(),
            max_in_flight: t.max_in_flight,
        };
        let bar = cli::bar(t.quiet, args.subscribers as u64, "subscribing");
        let ramped = ramp::ramp(&spec, rec.clone(), stop.clone(), &bar).await;
        bar.finish_and_clear();
        if ramped.stats.established == 0 {
            anyhow::bail!(
                "no subscriber could connect: {:?} {:?}",
                ramped.stats.failed,
                ramped.stats.sample_errors
            );
        }
        let pub_nodes = match args.publish_nodes {
            None => nodes.len(),
            Some(n) => {
                anyhow::ensure!(
                    (1..=nodes.len()).contains(&n),
                    "--publish-nodes must be 1..={} (the number of --url)",
                    nodes.len()
                );
                n
            }
        };
        let publishers = Publishers::start(PoolSpec {
            nodes: nodes[..pub_nodes].to_vec(),
            connections: args.publishers,
            topics: topics.clone(),
            payload: args.payload,
            api_key: args.api_key.clone(),
            redis,
        })?;
        // Acks are in; anything else the subscribers receive from now on is counted.
        rec.collect(true);
        Ok(Setup {
            args: args.clone(),
            nodes,
            topics,
            open: ramped.stats,
            live: ramped.live,
            rec,
            stop,
            publishers,
            before,
        })
    }

    /// Live subscribers per node and topic.
    fn subs_by_node_topic(&self) -> Vec<Vec<u64>> {
        let mut m = vec![vec![0u64; self.topics.len()]; self.nodes.len()];
        for l in &self.live {
            if !l.handle.is_finished() {
                m[l.node][l.topic] += 1;
            }
        }
        m
    }

    /// Average subscribers per topic (for converting delivery rates to publish rates).
    pub fn subs_per_topic(&self) -> f64 {
        let n = self.open.established as f64;
        let reach = if self.args.reaches_all_nodes() || self.nodes.len() == 1 {
            n
        } else {
            // Without a shared broker a publish reaches one node's subscribers only.
            n / self.nodes.len() as f64
        };
        (reach / self.topics.len() as f64).max(1e-9)
    }

    /// Deliveries a publish result should produce.
    fn expected(&self, p: &PublishResult, subs: &[Vec<u64>]) -> u64 {
        let mut e = 0;
        if self.args.reaches_all_nodes() {
            for t in 0..self.topics.len() {
                let published: u64 = p.ok_by_node_topic.iter().map(|row| row[t]).sum();
                let s: u64 = subs.iter().map(|row| row[t]).sum();
                e += published * s;
            }
        } else {
            for (n, row) in p.ok_by_node_topic.iter().enumerate() {
                for (t, published) in row.iter().enumerate() {
                    e += published * subs[n][t];
                }
            }
        }
        e
    }

    /// Publishes at `rate` for `duration`, waits for stragglers, and measures everything.
    pub async fn phase(&self, rate: f64, duration: Duration, label: &str) -> anyhow::Result<Phase> {
        let pids = &self.args.target.server_pids;
        let subs = self.subs_by_node_topic();
        self.rec.collect(true);
        let count = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
        let bar = cli::bar(self.args.target.quiet, count, label);
        let watch = CpuWatch::start(pids, &self.args.target.broker_pids);
        let job = Job {
            rate,
            count,
            max_time: duration + duration / 2 + Duration::from_secs(5),
        };
        let progress = {
            let bar = bar.clone();
            let rec = self.rec.clone();
            let per = self.subs_per_topic();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let c = rec.counters();
                    bar.set_position(((c.unique() as f64) / per) as u64);
                }
            })
        };
        let publish = self.publishers.run(job).await?;
        let expected = self.expected(&publish, &subs);
        // Wait for the deliveries still in flight: until all arrived, nothing moved for a second,
        // or --drain passed.
        let drain = cli::check_secs("drain", self.args.drain, 600.0)?;
        let drain_end = tokio::time::Instant::now() + drain;
        let mut last = self.rec.counters().unique();
        let mut last_move = tokio::time::Instant::now();
        while tokio::time::Instant::now() < drain_end {
            let u = self.rec.counters().unique();
            if u >= expected {
                break;
            }
            if u != last {
                last = u;
                last_move = tokio::time::Instant::now();
            } else if last_move.elapsed() > Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (servers, cpu) = watch.finish();
        progress.abort();
        bar.finish_and_clear();
        let (hist, counters) = self.rec.collect(true);
        let delivered = counters.unique();
        let window_ns = counters.last_recv_ns.saturating_sub(publish.first_send_ns);
        let server_total: f64 = servers.iter().map(|s| s.1).sum();
        let receive_s = (cpu.tool_s - publish.cpu_s).max(0.0);
        let lost = expected.saturating_sub(delivered);
        Ok(Phase {
            offered_publish_rate: r3(rate),
            offered_delivery_rate: r3(rate * self.subs_per_topic()),
            duration_s: duration.as_secs_f64(),
            expected,
            delivered,
            received: counters.received,
            lost,
            loss_pct: if expected > 0 {
                r3(lost as f64 * 100.0 / expected as f64)
            } else {
                0.0
            },
            counters,
            deliveries_per_s: if window_ns > 0 {
                r3(delivered as f64 / (window_ns as f64 / 1e9))
            } else {
                0.0
            },
            wire_bytes_per_delivery: if counters.received > 0 {
                r3(counters.wire_bytes as f64 / counters.received as f64)
            } else {
                0.0
            },
            latency: stats::percentiles(&hist),
            subscribers_alive: ramp::running(&self.live) as u64,
            server_us_per_delivery: (!servers.is_empty() && delivered > 0)
                .then(|| r3(server_total * 1e6 / delivered as f64)),
            server_and_broker_us_per_delivery: (!self.args.target.broker_pids.is_empty()
                && delivered > 0)
                .then(|| r3((server_total + cpu.brokers_s) * 1e6 / delivered as f64)),
            server_cpu_s: servers,
            tool: ToolCpu {
                total_s: cpu.tool_s,
                publisher_s: r3(publish.cpu_s),
                receive_s: r3(receive_s),
                us_per_received: if counters.received > 0 {
                    r3(receive_s * 1e6 / counters.received as f64)
                } else {
                    0.0
                },
            },
            cpu,
            publish,
        })
    }

    /// Stops the subscribers and reports how they ended and what the servers look like now.
    pub async fn finish(self) -> serde_json::Value {
        let after: Vec<ProcSample> = self
            .args
            .target
            .server_pids
            .iter()
            .map(|&p| procfs::sample(p).unwrap_or_default())
            .collect();
        self.stop.cancel();
        drop(self.publishers);
        let ends = ramp::join_all(self.live, Duration::from_secs(30)).await;
        json!({
            "subscriber_ends": ends,
            "servers_before": self.before,
            "servers_after": after,
        })
    }

    pub(crate) fn publish_rate(&self, args: &FanoutArgs) -> f64 {
        match (args.rate, args.delivery_rate) {
            (Some(r), _) => r,
            (None, Some(d)) => d / self.subs_per_topic(),
            (None, None) => 1000.0,
        }
    }
}

pub(crate) fn print_phase(name: &str, p: &Phase) {
    eprintln!(
        "{name}: offered {:.0} deliveries/s ({:.0} publishes/s via {}): delivered {} of {} ({:.0}/s), lost {}, dup {}, late {}; e2e p50 {:.0}µs p99 {:.0}µs p99.9 {:.0}µs max {:.0}µs; server {} µs/delivery{}; {:.1} B/delivery on the wire; tool {:.2} µs/msg; other load {:.0}%",
        p.offered_delivery_rate,
        p.offered_publish_rate,
        p.publish.path,
        p.delivered,
        p.expected,
        p.deliveries_per_s,
        p.lost,
        p.counters.duplicates,
        p.counters.late,
        p.latency.p50_us,
        p.latency.p99_us,
        p.latency.p999_us,
        p.latency.max_us,
        p.server_us_per_delivery
            .map_or("-".into(), |v| format!("{v:.2}")),
        p.server_and_broker_us_per_delivery
            .map_or(String::new(), |v| format!(" ({v:.2} with the broker)")),
        p.wire_bytes_per_delivery,
        p.tool.us_per_received,
        p.cpu.other_pct,
    );
}

pub(crate) fn params(args: &FanoutArgs, setup: &Setup, rate: f64) -> serde_json::Value {
    json!({
        "urls": args.target.urls, "tls": setup.nodes.iter().any(|n| n.tls.is_some()),
        "deflate": args.target.deflate, "protocol": args.target.protocol,
        "publish_nodes": args.publish_nodes,
        "subscribers": args.subscribers, "topics": setup.topics.len(),
        "publish_rate": r3(rate), "delivery_rate": r3(rate * setup.subs_per_topic()),
        "duration_s": args.duration, "warmup_s": args.warmup, "payload": args.payload,
        "publishers": args.publishers, "shared_broker": args.shared_broker,
        "publish_path": if args.redis_url.is_some() { "redis" } else { "http" },
        "redis_url": args.redis_url,
        "broker_prefix": args.redis_url.as_ref().map(|_| &args.broker_prefix),
        "server_pids": args.target.server_pids,
        "broker_pids": args.target.broker_pids,
    })
}

/// Runs `fanout`.
pub async fn run_fanout(args: FanoutArgs) -> anyhow::Result<Report> {
    let duration = cli::check_secs("duration", args.duration, 86_400.0)?;
    let warmup = cli::check_secs("warmup", args.warmup, 3_600.0)?;
    let machine = MachineWatch::start();
    let started_unix = report::unix_now();
    let setup = Setup::start(&args, 0).await?;
    let rate = setup.publish_rate(&args);
    anyhow::ensure!(
        rate > 0.0 && rate <= 10_000_000.0,
        "publish rate out of range"
    );
    if !warmup.is_zero() {
        setup.phase(rate, warmup, "warmup").await?;
    }
    let phase = setup.phase(rate, duration, "measuring").await?;
    print_phase("fanout", &phase);
    let params = params(&args, &setup, rate);
    let setup_latency = setup.open.latency();
    let open = setup.open.clone();
    let tail = setup.finish().await;
    Ok(Report::new(
        "fanout",
        started_unix,
        &machine,
        params,
        json!({
            "subscribers_established": open.established,
            "subscribers_failed": open.failed,
            "setup_latency": setup_latency,
            "phase": phase,
            "end": tail,
        }),
    ))
}
