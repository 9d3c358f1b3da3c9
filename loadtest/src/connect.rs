//! `connect`: ramp up N idle subscribed connections, hold them, and measure what they cost the
//! server (RSS) and the kernel (socket and slab memory), per connection.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::cli::{self, Target};
use crate::procfs::{self, KernelSample, ProcSample};
use crate::ramp::{self, OpenStats, RampSpec};
use crate::report::{self, MachineWatch, Report};
use crate::stats::{Recorder, r3};
use crate::ws;

/// Flags of `connect`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: Target,
    /// Connections to open in total.
    #[arg(long, value_name = "N")]
    pub connections: usize,
    /// Seconds to hold the connections after the ramp (memory is sampled after --settle).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub hold: f64,
    /// Seconds to wait after the ramp before sampling memory.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub settle: f64,
    /// Worker processes to spread the connections over (each may hold at most RLIMIT_NOFILE).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub procs: usize,
}

/// What a worker process is told to do (passed as JSON on its command line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    urls: Vec<String>,
    tls_ca: Option<std::path::PathBuf>,
    topics: usize,
    topic_prefix: String,
    source_ips: usize,
    total: usize,
    index: usize,
    procs: usize,
    rate: f64,
    timeout_s: f64,
    max_in_flight: usize,
    max_hold_s: f64,
}

/// Connections one process can hold, given its open-files limit.
pub fn capacity() -> (u64, u64, u64) {
    let soft = procfs::raise_nofile_limit();
    let (_, hard) = procfs::nofile_limit();
    (soft, hard, soft.saturating_sub(procfs::FD_RESERVE))
}

/// Refuses a plan that needs more files than a process may open.
pub fn check_capacity(connections: usize, procs: usize, what: &str) -> anyhow::Result<()> {
    let (soft, hard, cap) = capacity();
    let per_proc = connections.div_ceil(procs.max(1)) as u64;
    if per_proc > cap {
        let need = (connections as u64).div_ceil(cap.max(1));
        bail!(
            "{what}: {connections} connections over {procs} process(es) is {per_proc} per process, \
             but one process may hold at most {cap} (RLIMIT_NOFILE soft {soft}, hard {hard}, minus \
             {} reserved). Use --procs {need} or more (connect only), or fewer connections.",
            procfs::FD_RESERVE
        );
    }
    Ok(())
}

fn topic_names(prefix: &str, n: usize) -> Arc<Vec<Arc<str>>> {
    Arc::new(
        (0..n.max(1))
            .map(|i| Arc::from(format!("{prefix}.{i}")))
            .collect(),
    )
}

#[derive(Debug, Clone, Serialize)]
struct ServerMem {
    pid: u32,
    open_files_limit: Option<(String, String)>,
    connections: u64,
    before: ProcSample,
    after: ProcSample,
    peak_rss_kib_during_hold: u64,
    rss_delta_kib: i64,
    rss_per_conn_bytes: f64,
    rss_abs_per_conn_bytes: f64,
}

/// Slab caches that grow with each TCP connection: the socket, its inode, dentry and file, and the
/// epoll entry.
const SOCKET_CACHES: &[&str] = &[
    "TCP",
    "TCPv6",
    "sock_inode_cache",
    "dentry",
    "filp",
    "eventpoll_epi",
    "eventpoll_pwq",
    "lsm_file_cache",
    "lsm_inode_cache",
];

fn kernel_delta(before: &KernelSample, after: &KernelSample, conns: u64) -> serde_json::Value {
    let c = conns.max(1) as f64;
    let slab_delta_kib = after.slab_kib as i64 - before.slab_kib as i64;
    let tcp_mem_delta_kib = after.sockstat.tcp_mem_kib as i64 - before.sockstat.tcp_mem_kib as i64;
    let mut top: Vec<(String, i64)> = Vec::new();
    if let (Some(b), Some(a)) = (&before.slab_caches, &after.slab_caches) {
        for (name, &bytes) in a {
            let d = bytes as i64 - b.get(name).copied().unwrap_or(0) as i64;
            if d != 0 {
                top.push((name.clone(), d));
            }
        }
        top.sort_by_key(|(_, d)| -d.abs());
        top.truncate(12);
    }
    let slab_top: Vec<serde_json::Value> = top
        .iter()
        .map(|(n, d)| json!({"cache": n, "delta_bytes": d, "per_conn_bytes": r3(*d as f64 / c)}))
        .collect();
    // Per connection, count only the caches a TCP socket lives in (other activity on the machine
    // moves the rest of the slab); the whole slab delta is reported beside it.
    let mut socket_slab: i64 = 0;
    if let (Some(b), Some(a)) = (&before.slab_caches, &after.slab_caches) {
        for name in SOCKET_CACHES {
            socket_slab += a.get(*name).copied().unwrap_or(0) as i64
                - b.get(*name).copied().unwrap_or(0) as i64;
        }
    } else {
        socket_slab = slab_delta_kib * 1024;
    }
    let both = (socket_slab + tcp_mem_delta_kib * 1024) as f64 / c;
    json!({
        "note": "system-wide: client and server sockets are on the same machine, so each connection is two sockets; the server's share is about half",
        "before": before.sockstat,
        "after": after.sockstat,
        "sockets_delta": after.sockstat.sockets_used as i64 - before.sockstat.sockets_used as i64,
        "tcp_mem_delta_kib": tcp_mem_delta_kib,
        "slab_delta_kib": slab_delta_kib,
        "slab_top": slab_top,
        "socket_slab_caches": SOCKET_CACHES,
        "socket_slab_delta_bytes": socket_slab,
        "per_conn_bytes_both_ends": r3(both),
        "per_conn_bytes_server_share": r3(both / 2.0),
    })
}

/// Runs `connect`.
pub async fn run(args: ConnectArgs) -> anyhow::Result<Report> {
    let t = &args.target;
    let nodes = t.nodes()?;
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        args.procs >= 1 && args.procs <= 64,
        "--procs must be 1..=64"
    );
    let hold = cli::check_secs("hold", args.hold, 86_400.0)?;
    let settle = cli::check_secs("settle", args.settle, 3_600.0)?;
    check_capacity(args.connections, args.procs, "connect")?;
    let (soft, hard, cap) = capacity();
    let ntopics = t.topics.unwrap_or(100).max(1);
    let topics = topic_names(&t.topic_prefix, ntopics);
    let src_ips = t.source_ip_count(args.connections);
    let machine = MachineWatch::start();
    let started_unix = report::unix_now();

    let limits: Vec<_> = t
        .server_pids
        .iter()
        .map(|&p| procfs::open_files_limit(p))
        .collect();
    let before_kernel = procfs::kernel_sample(true);
    let before_servers: Vec<ProcSample> = t
        .server_pids
        .iter()
        .map(|&p| procfs::sample(p).with_context(|| format!("--server-pid {p}: no such process")))
        .collect::<anyhow::Result<_>>()?;

    let bar = cli::bar(t.quiet, args.connections as u64, "connecting");
    let stop = CancellationToken::new();
    let rec = Recorder::new();
    let spec = RampSpec {
        nodes: nodes.clone(),
        topics: topics.clone(),
        src_ips: ws::source_ips(src_ips),
        count: args.connections,
        index_start: 0,
        index_stride: 1,
        rate: t.connect_rate,
        timeout: t.timeout(),
        max_in_flight: t.max_in_flight,
    };
    // Ramp: in this process, or in workers.
    let mut workers = Vec::new();
    let mut collector = None;
    let (open_stats, live) = if args.procs == 1 {
        let r = ramp::ramp(&spec, rec.clone(), stop.clone(), &bar).await;
        (r.stats, Some(r.live))
    } else {
        let exe = std::env::current_exe().context("locating this executable")?;
        let max_hold_s = args.connections as f64 / t.connect_rate.max(0.001)
            + t.connect_timeout
            + args.settle
            + args.hold
            + 120.0;
        let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
        for index in 0..args.procs {
            let ws = WorkerSpec {
                urls: t.urls.clone(),
                tls_ca: t.tls_ca.clone(),
                topics: ntopics,
                topic_prefix: t.topic_prefix.clone(),
                source_ips: src_ips,
                total: args.connections,
                index,
                procs: args.procs,
                rate: t.connect_rate / args.procs as f64,
                timeout_s: t.connect_timeout,
                max_in_flight: t.max_in_flight.div_ceil(args.procs),
                max_hold_s,
            };
            let mut child = tokio::process::Command::new(&exe)
                .arg("connect-worker")
                .arg("--spec")
                .arg(serde_json::to_string(&ws)?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("spawning a worker process")?;
            let mut lines = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
            let tx = line_tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(l)) = lines.next_line().await {
                    if tx.send((index, l)).is_err() {
                        break;
                    }
                }
                let _ = tx.send((index, "EOF".into()));
            });
            workers.push(child);
        }
        drop(line_tx);
        let mut merged = OpenStats::default();
        let mut progress = vec![0u64; args.procs];
        let mut ramped = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(max_hold_s);
        // Read progress lines until every worker reported its ramp.
        while ramped < args.procs {
            let Ok(Some((i, line))) = tokio::time::timeout_at(deadline, line_rx.recv()).await
            else {
                bail!("workers did not finish their ramp in time");
            };
            if let Some(n) = line.strip_prefix("PROGRESS ") {
                progress[i] = n.trim().parse().unwrap_or(progress[i]);
                bar.set_position(progress.iter().sum());
            } else if let Some(j) = line.strip_prefix("RAMPED ") {
                let s: OpenStats = serde_json::from_str(j)?;
                merged.merge(&s);
                ramped += 1;
            } else if line == "EOF" {
                bail!("worker {i} ended before its ramp finished");
            }
        }
        // Keep collecting lines (DONE) in the background.
        let procs = args.procs;
        collector = Some(tokio::spawn(async move {
            let mut done: Vec<Option<String>> = vec![None; procs];
            while let Some((i, line)) = line_rx.recv().await {
                if let Some(j) = line.strip_prefix("DONE ") {
                    done[i] = Some(j.to_string());
                }
            }
            done
        }));
        (merged, None)
    };
    bar.finish_and_clear();
    let ramp_elapsed = open_stats.elapsed_s;

    tokio::time::sleep(settle).await;
    // Kernel first: listing /proc/PID/fd creates dentries and proc inodes for every fd, which
    // would otherwise show up as slab growth.
    let after_kernel = procfs::kernel_sample(true);
    let after_servers: Vec<ProcSample> = t
        .server_pids
        .iter()
        .map(|&p| procfs::sample(p).unwrap_or_default())
        .collect();
    let mut peak = after_servers.iter().map(|s| s.rss_kib).collect::<Vec<_>>();

    // Hold, watching the servers and the connections.
    let hold_end = tokio::time::Instant::now() + hold.saturating_sub(settle);
    while tokio::time::Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_secs(1).min(hold_end - tokio::time::Instant::now()))
            .await;
        for (i, &p) in t.server_pids.iter().enumerate() {
            if let Some(s) = procfs::sample(p) {
                peak[i] = peak[i].max(s.rss_kib);
            }
        }
    }
    let alive_at_end = match &live {
        Some(l) => ramp::running(l) as u64,
        None => open_stats.established, // workers report drops in their ends
    };
    stop.cancel();
    let ends: BTreeMap<String, u64> = match live {
        Some(l) => ramp::join_all(l, Duration::from_secs(30)).await,
        None => {
            let mut ends = BTreeMap::new();
            for child in workers.iter_mut() {
                if let Some(stdin) = child.stdin.as_mut() {
                    let _ = stdin.write_all(b"STOP\n").await;
                }
            }
            for child in workers.iter_mut() {
                let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
            }
            let collected = match collector.take() {
                Some(h) => tokio::time::timeout(Duration::from_secs(30), h)
                    .await
                    .ok()
                    .and_then(|r| r.ok()),
                None => None,
            };
            if let Some(lines) = collected {
                for j in lines.into_iter().flatten() {
                    if let Ok(m) = serde_json::from_str::<BTreeMap<String, u64>>(&j) {
                        for (k, v) in m {
                            *ends.entry(k).or_default() += v;
                        }
                    }
                }
            }
            ends
        }
    };

    let established = open_stats.established;
    let servers: Vec<ServerMem> = t
        .server_pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            // Pid i serves --url i when both lists line up; otherwise all connections count.
            let conns = if t.server_pids.len() == nodes.len() {
                open_stats.per_node.get(i).copied().unwrap_or(0)
            } else {
                established
            };
            let b = &before_servers[i];
            let a = &after_servers[i];
            let delta = a.rss_kib as i64 - b.rss_kib as i64;
            let c = conns.max(1) as f64;
            ServerMem {
                pid,
                open_files_limit: limits[i].clone(),
                connections: conns,
                before: b.clone(),
                after: a.clone(),
                peak_rss_kib_during_hold: peak[i],
                rss_delta_kib: delta,
                rss_per_conn_bytes: r3(delta as f64 * 1024.0 / c),
                rss_abs_per_conn_bytes: r3(a.rss_kib as f64 * 1024.0 / c),
            }
        })
        .collect();
    let kernel = kernel_delta(&before_kernel, &after_kernel, established);
    let server_rss_per_conn: Option<f64> = if servers.is_empty() {
        None
    } else {
        let delta: i64 = servers.iter().map(|s| s.rss_delta_kib).sum();
        Some(r3(delta as f64 * 1024.0 / established.max(1) as f64))
    };
    let kernel_share = kernel["per_conn_bytes_server_share"]
        .as_f64()
        .unwrap_or(0.0);

    let result = json!({
        "requested": args.connections,
        "established": established,
        "failed_total": open_stats.failed_total(),
        "failed": open_stats.failed,
        "sample_errors": open_stats.sample_errors,
        "per_node": open_stats.per_node,
        "ramp_elapsed_s": ramp_elapsed,
        "ramp_rate_achieved": if ramp_elapsed > 0.0 { r3(established as f64 / ramp_elapsed) } else { 0.0 },
        "setup_latency": open_stats.latency(),
        "alive_at_end_of_hold": alive_at_end,
        "ends": ends,
        "fd_limits": {
            "tool_soft": soft, "tool_hard": hard, "per_process_capacity": cap, "procs": args.procs,
            "servers": servers.iter().map(|s| json!({"pid": s.pid, "open_files_limit": s.open_files_limit, "open_fds_after": s.after.open_fds})).collect::<Vec<_>>(),
        },
        "servers": servers,
        "server_rss_per_conn_bytes": server_rss_per_conn,
        "kernel": kernel,
        "server_total_per_conn_bytes": server_rss_per_conn.map(|r| r3(r + kernel_share)),
    });
    let params = json!({
        "urls": t.urls, "tls": nodes.iter().any(|n| n.tls.is_some()), "connections": args.connections, "topics": ntopics,
        "connect_rate": t.connect_rate, "source_ips": src_ips, "hold_s": args.hold,
        "settle_s": args.settle, "procs": args.procs,
    });
    Ok(Report::new(
        "connect",
        started_unix,
        &machine,
        params,
        result,
    ))
}

/// The hidden `connect-worker` subcommand: ramps its share, reports, holds until told to stop.
pub async fn worker(spec_json: &str) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec_json).context("worker spec")?;
    procfs::raise_nofile_limit();
    let nodes = ws::Node::parse_all(&spec.urls, spec.tls_ca.as_deref())?;
    let count = (spec.index..spec.total).step_by(spec.procs).count();
    let ramp_spec = RampSpec {
        nodes,
        topics: topic_names(&spec.topic_prefix, spec.topics),
        src_ips: ws::source_ips(spec.source_ips),
        count,
        index_start: spec.index,
        index_stride: spec.procs,
        rate: spec.rate,
        timeout: Duration::from_secs_f64(spec.timeout_s),
        max_in_flight: spec.max_in_flight,
    };
    let stop = CancellationToken::new();
    let rec = Recorder::new();
    let bar = indicatif::ProgressBar::hidden();
    let reporter = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                println!("PROGRESS {}", bar.position());
            }
        })
    };
    let ramped = ramp::ramp(&ramp_spec, rec, stop.clone(), &bar).await;
    reporter.abort();
    println!("RAMPED {}", serde_json::to_string(&ramped.stats)?);
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let _ = tokio::time::timeout(Duration::from_secs_f64(spec.max_hold_s), stdin.next_line()).await;
    stop.cancel();
    let ends = ramp::join_all(ramped.live, Duration::from_secs(30)).await;
    println!("DONE {}", serde_json::to_string(&ends)?);
    Ok(())
}
