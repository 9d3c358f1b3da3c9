//! `churn`: connections joining and leaving continuously while a fan-out runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cli;
use crate::fanout::{FanoutArgs, Setup, params, print_phase};
use crate::procfs;
use crate::ramp::{self, OpenStats, RampSpec};
use crate::report::{self, MachineWatch, Report};
use crate::stats::{self, Recorder, r3};
use crate::ws::{self, Leave};

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

/// Runs `churn`.
pub async fn run_churn(args: ChurnArgs) -> anyhow::Result<Report> {
    let f = &args.fanout;
    anyhow::ensure!(
        f.redis_url.is_none(),
        "churn: --redis-url is not supported (churning subscribers join mid-stream, and raw publishes have no offsets to start from); use fanout or step"
    );
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
    Ok(Report::new(
        "churn",
        started_unix,
        &machine,
        params,
        json!({
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
    ))
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
