//! `fanout`, `step` and `churn`: subscribers over topics, publishers at a rate, and what arrives.

use std::collections::BTreeMap;
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
use crate::report::{self, CpuWatch, CpuWindow, MachineWatch, Report};
use crate::stats::{self, Counters, Percentiles, Recorder, r3};
use crate::ws::{self, Leave};

/// Flags of the fan-out scenarios.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,
    /// Subscriber connections (each subscribes to one topic; topics are filled round robin).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub subscribers: usize,
    /// Publishes per second over HTTP (all publishers together).
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
    /// Keep-alive HTTP connections publishing.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub publishers: usize,
    /// Seconds to wait after the last publish for stragglers.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub drain: f64,
    /// The nodes share one broker (Redis): a publish to any node reaches subscribers on all.
    #[arg(long)]
    pub shared_broker: bool,
    /// API key for the publish API (Authorization: Bearer).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Worker threads for the receive path (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Extra flags of `step`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct StepArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// First step's delivery rate (deliveries per second).
    #[arg(long, default_value_t = 10_000.0, value_name = "PER_SEC")]
    pub start: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.25, value_name = "X")]
    pub factor: f64,
    /// Highest delivery rate to try.
    #[arg(long, default_value_t = 400_000.0, value_name = "PER_SEC")]
    pub max: f64,
    /// A step fails when p99 end-to-end latency exceeds this.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    pub p99_limit_ms: f64,
    /// A step fails when more than this share of deliveries is lost, %.
    #[arg(long, default_value_t = 0.0, value_name = "PCT")]
    pub max_loss_pct: f64,
    /// A step fails when the achieved delivery rate is below this share of the offered one, %.
    #[arg(long, default_value_t = 95.0, value_name = "PCT")]
    pub min_achieved_pct: f64,
}

/// Extra flags of `churn`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// Churning connections opened per second during the run.
    #[arg(long, default_value_t = 100.0, value_name = "PER_SEC")]
    pub churn_rate: f64,
    /// Seconds each churning connection stays.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub churn_life: f64,
    /// Share of churning connections that leave by dropping the socket instead of closing, %.
    #[arg(long, default_value_t = 20.0, value_name = "PCT")]
    pub churn_drop_pct: f64,
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
    /// End-to-end latency: publisher send → subscriber receive.
    pub latency: Percentiles,
    /// Subscribers still connected at the end.
    pub subscribers_alive: u64,
    /// CPU of each --server-pid, s.
    pub server_cpu_s: Vec<(u32, f64)>,
    /// Server CPU per delivery (all servers), µs.
    pub server_us_per_delivery: Option<f64>,
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
    nodes: Vec<ws::Node>,
    topics: Arc<Vec<Arc<str>>>,
    /// Setup numbers of the subscribers.
    pub open: OpenStats,
    live: Vec<Live>,
    rec: Arc<Recorder>,
    stop: CancellationToken,
    publishers: Publishers,
    before: Vec<ProcSample>,
}

impl Setup {
    /// Connects the subscribers and the publishers.
    pub async fn start(args: &FanoutArgs, extra_conns: usize) -> anyhow::Result<Setup> {
        let t = &args.target;
        let nodes = t.nodes()?;
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
        let publishers = Publishers::start(PoolSpec {
            nodes: nodes.clone(),
            connections: args.publishers,
            topics: topics.clone(),
            payload: args.payload,
            api_key: args.api_key.clone(),
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
        let reach = if self.args.shared_broker || self.nodes.len() == 1 {
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
        if self.args.shared_broker {
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
        let watch = CpuWatch::start(pids);
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
            latency: stats::percentiles(&hist),
            subscribers_alive: ramp::running(&self.live) as u64,
            server_us_per_delivery: (!servers.is_empty() && delivered > 0)
                .then(|| r3(server_total * 1e6 / delivered as f64)),
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

    fn publish_rate(&self, args: &FanoutArgs) -> f64 {
        match (args.rate, args.delivery_rate) {
            (Some(r), _) => r,
            (None, Some(d)) => d / self.subs_per_topic(),
            (None, None) => 1000.0,
        }
    }
}

fn print_phase(name: &str, p: &Phase) {
    eprintln!(
        "{name}: offered {:.0} deliveries/s ({:.0} publishes/s): delivered {} of {} ({:.0}/s), lost {}, dup {}, late {}; e2e p50 {:.0}µs p99 {:.0}µs p99.9 {:.0}µs max {:.0}µs; server {} µs/delivery; tool {:.2} µs/msg; other load {:.0}%",
        p.offered_delivery_rate,
        p.offered_publish_rate,
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
        p.tool.us_per_received,
        p.cpu.other_pct,
    );
}

fn params(args: &FanoutArgs, setup: &Setup, rate: f64) -> serde_json::Value {
    json!({
        "urls": args.target.urls, "subscribers": args.subscribers, "topics": setup.topics.len(),
        "publish_rate": r3(rate), "delivery_rate": r3(rate * setup.subs_per_topic()),
        "duration_s": args.duration, "warmup_s": args.warmup, "payload": args.payload,
        "publishers": args.publishers, "shared_broker": args.shared_broker,
        "server_pids": args.target.server_pids,
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
    Ok(Report {
        scenario: "fanout".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        command: report::command_line(),
        started_unix,
        machine: machine.finish(),
        params,
        result: json!({
            "subscribers_established": open.established,
            "subscribers_failed": open.failed,
            "setup_latency": setup_latency,
            "phase": phase,
            "end": tail,
        }),
    })
}

/// Runs `step`.
pub async fn run_step(args: StepArgs) -> anyhow::Result<Report> {
    let f = &args.fanout;
    let duration = cli::check_secs("duration", f.duration, 3_600.0)?;
    let warmup = cli::check_secs("warmup", f.warmup, 3_600.0)?;
    anyhow::ensure!(args.factor > 1.0, "--factor must be above 1");
    anyhow::ensure!(
        args.start > 0.0 && args.max >= args.start,
        "need 0 < --start <= --max"
    );
    let machine = MachineWatch::start();
    let started_unix = report::unix_now();
    let setup = Setup::start(f, 0).await?;
    let per = setup.subs_per_topic();
    if !warmup.is_zero() {
        setup.phase(args.start / per, warmup, "warmup").await?;
    }
    let mut steps = Vec::new();
    let mut best: Option<f64> = None;
    let mut failed_because = None;
    let mut rate = args.start;
    // Bounded: the rate grows geometrically up to --max.
    for _ in 0..200 {
        if rate > args.max * 1.000_001 {
            break;
        }
        let p = setup
            .phase(rate / per, duration, &format!("{rate:.0}/s"))
            .await?;
        print_phase("step", &p);
        let mut why = Vec::new();
        if p.loss_pct > args.max_loss_pct {
            why.push(format!("loss {}%", p.loss_pct));
        }
        if p.latency.p99_us > args.p99_limit_ms * 1000.0 {
            why.push(format!("p99 {}µs", p.latency.p99_us));
        }
        let published = p.publish.achieved_rate / p.offered_publish_rate.max(1e-9) * 100.0;
        if published < args.min_achieved_pct {
            why.push(format!(
                "publishers reached only {:.0} of {:.0} publishes/s (the tool, not the server, is the limit: add --publishers)",
                p.publish.achieved_rate, p.offered_publish_rate
            ));
        }
        let achieved = p.deliveries_per_s / p.offered_delivery_rate.max(1e-9) * 100.0;
        if achieved < args.min_achieved_pct {
            why.push(format!("achieved only {achieved:.1}% of the offered rate"));
        }
        if p.subscribers_alive < setup.open.established {
            why.push(format!(
                "{} subscribers disconnected",
                setup.open.established - p.subscribers_alive
            ));
        }
        let pass = why.is_empty();
        steps.push(json!({"rate": r3(rate), "pass": pass, "why": why, "phase": p}));
        if !pass {
            failed_because = Some(why);
            break;
        }
        best = Some(p.deliveries_per_s);
        rate *= args.factor;
    }
    let params = json!({
        "fanout": params(f, &setup, args.start / per),
        "start": args.start, "factor": args.factor, "max": args.max,
        "p99_limit_ms": args.p99_limit_ms, "max_loss_pct": args.max_loss_pct,
        "min_achieved_pct": args.min_achieved_pct,
    });
    let open = setup.open.clone();
    let tail = setup.finish().await;
    Ok(Report {
        scenario: "step".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        command: report::command_line(),
        started_unix,
        machine: machine.finish(),
        params,
        result: json!({
            "subscribers_established": open.established,
            "highest_sustained_deliveries_per_s": best,
            "stopped_because": failed_because,
            "steps": steps,
            "end": tail,
        }),
    })
}

/// Runs `churn`.
pub async fn run_churn(args: ChurnArgs) -> anyhow::Result<Report> {
    let f = &args.fanout;
    let duration = cli::check_secs("duration", f.duration, 86_400.0)?;
    let life = cli::check_secs("churn-life", args.churn_life, 3_600.0)?;
    anyhow::ensure!(
        args.churn_rate > 0.0 && args.churn_rate <= 50_000.0,
        "--churn-rate must be in (0, 50000]"
    );
    let concurrent = (args.churn_rate * (life.as_secs_f64() + f.target.connect_timeout)) as usize;
    let machine = MachineWatch::start();
    let started_unix = report::unix_now();
    let setup = Setup::start(f, concurrent).await?;
    let rate = setup.publish_rate(f);
    let fds_before: Vec<u64> = setup.before.iter().map(|s| s.open_fds).collect();
    let churn_rec = Recorder::new();
    let churn_stop = CancellationToken::new();
    // Churners: one opens every 1/churn_rate s for the duration, each leaves after --churn-life.
    let churn_total = (args.churn_rate * duration.as_secs_f64()).round() as usize;
    let churn_spec = RampSpec {
        nodes: setup.nodes.clone(),
        topics: setup.topics.clone(),
        src_ips: ws::source_ips(f.target.source_ip_count(f.subscribers + concurrent)),
        count: churn_total,
        index_start: 0,
        index_stride: 1,
        rate: args.churn_rate,
        timeout: f.target.timeout(),
        max_in_flight: f.target.max_in_flight,
    };
    let churner = {
        let rec = churn_rec.clone();
        let stop = churn_stop.clone();
        let drop_every = if args.churn_drop_pct > 0.0 {
            (100.0 / args.churn_drop_pct).round().max(1.0) as usize
        } else {
            usize::MAX
        };
        tokio::spawn(churn_loop(churn_spec, rec, stop, life, drop_every))
    };
    let phase = setup.phase(rate, duration, "churning").await?;
    print_phase("churn steady", &phase);
    churn_stop.cancel();
    let (churn_open, churn_ends) = churner.await.context("churn loop")?;
    let (churn_hist, churn_counters) = churn_rec.collect(true);
    // Give the server a moment to tear the churned connections down, then compare fds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_after: Vec<Option<u64>> = f
        .target
        .server_pids
        .iter()
        .map(|&p| procfs::sample(p).map(|s| s.open_fds))
        .collect();
    let params = json!({
        "fanout": params(f, &setup, rate),
        "churn_rate": args.churn_rate, "churn_life_s": args.churn_life,
        "churn_drop_pct": args.churn_drop_pct,
    });
    let open = setup.open.clone();
    let tail = setup.finish().await;
    Ok(Report {
        scenario: "churn".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        command: report::command_line(),
        started_unix,
        machine: machine.finish(),
        params,
        result: json!({
            "subscribers_established": open.established,
            "steady": phase,
            "churn": {
                "attempted": churn_open.attempted,
                "established": churn_open.established,
                "failed": churn_open.failed,
                "sample_errors": churn_open.sample_errors,
                "setup_latency": churn_open.latency(),
                "ends": churn_ends,
                "received": churn_counters.received,
                "duplicates": churn_counters.duplicates,
                "late": churn_counters.late,
                "gaps": churn_counters.gaps,
                "bad_frames": churn_counters.bad_frames,
                "latency": stats::percentiles(&churn_hist),
            },
            "server_fds_before": fds_before,
            "server_fds_after_churn": fds_after,
            "end": tail,
        }),
    })
}

/// Opens churning connections at a rate; each receives for `life` and then leaves (every
/// `drop_every`-th by dropping the socket, the others with a close frame).
async fn churn_loop(
    spec: RampSpec,
    rec: Arc<Recorder>,
    stop: CancellationToken,
    life: Duration,
    drop_every: usize,
) -> (OpenStats, BTreeMap<String, u64>) {
    let start = tokio::time::Instant::now();
    let mut stats = OpenStats {
        per_node: vec![0; spec.nodes.len()],
        per_node_topic: vec![vec![0; spec.topics.len()]; spec.nodes.len()],
        ..Default::default()
    };
    let mut tcp = stats::new_hist();
    let mut up = stats::new_hist();
    let mut total = stats::new_hist();
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(spec.max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.count {
        let due = start + Duration::from_secs_f64(i as f64 / spec.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => break,
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let (node_i, topic_i) = spec.placement(i);
        let node = spec.nodes[node_i].clone();
        let topic = spec.topics[topic_i].clone();
        let src = spec.src_ips[i % spec.src_ips.len()];
        let (rec, timeout) = (rec.clone(), spec.timeout);
        let leave = if (i + 1) % drop_every == 0 {
            Leave::Drop
        } else {
            Leave::Close
        };
        tasks.spawn(async move {
            let opened = ws::open(&node, Some(src), &topic, timeout).await;
            drop(permit);
            match opened {
                Ok(conn) => {
                    let timing = conn.timing;
                    let until = Some((tokio::time::Instant::now() + life, leave));
                    let r = ws::receive(conn, topic, rec, until).await;
                    (node_i, topic_i, Ok((timing, r.end)))
                }
                Err(e) => (node_i, topic_i, Err(e)),
            }
        });
        // Reap finished ones as we go so the set stays small.
        while let Some(Ok(done)) = tasks.try_join_next() {
            account(&mut stats, &mut ends, [&mut tcp, &mut up, &mut total], done);
        }
    }
    let deadline = tokio::time::Instant::now() + life + spec.timeout + Duration::from_secs(5);
    while let Ok(Some(Ok(done))) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        account(&mut stats, &mut ends, [&mut tcp, &mut up, &mut total], done);
    }
    tasks.abort_all();
    stats.tcp_ns = stats::to_pairs(&tcp);
    stats.upgrade_ns = stats::to_pairs(&up);
    stats.total_ns = stats::to_pairs(&total);
    stats.elapsed_s = r3(start.elapsed().as_secs_f64());
    (stats, ends)
}

type ChurnDone = (
    usize,
    usize,
    Result<(ws::OpenTiming, ws::End), ws::OpenError>,
);

fn account(
    stats: &mut OpenStats,
    ends: &mut BTreeMap<String, u64>,
    [tcp, up, total]: [&mut hdrhistogram::Histogram<u64>; 3],
    done: ChurnDone,
) {
    let (n, t, r) = done;
    stats.attempted += 1;
    match r {
        Ok((timing, end)) => {
            *ends.entry(ramp::end_label(&end)).or_default() += 1;
            stats.established += 1;
            stats.per_node[n] += 1;
            stats.per_node_topic[n][t] += 1;
            stats::record(tcp, timing.tcp_ns);
            stats::record(up, timing.upgrade_ns);
            stats::record(total, timing.total_ns);
        }
        Err(e) => {
            *stats.failed.entry(e.label.clone()).or_default() += 1;
            if stats.sample_errors.len() < 5 {
                stats
                    .sample_errors
                    .push(format!("{}: {}", e.label, e.detail));
            }
        }
    }
}
