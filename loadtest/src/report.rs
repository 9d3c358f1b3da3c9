//! The JSON every scenario writes, and how busy the machine was meanwhile.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::procfs;
use crate::stats::r3;

/// The envelope of every result file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `connect`, `fanout`, `step`, `churn` or `ticker`.
    pub scenario: String,
    /// Tool version.
    pub tool_version: String,
    /// The command line that produced it.
    pub command: String,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// The machine and its load during the run.
    pub machine: Machine,
    /// The scenario's parameters.
    pub params: serde_json::Value,
    /// The scenario's results.
    pub result: serde_json::Value,
    /// What the run found wrong, when the scenario checks correctness (`ticker`): the tool writes
    /// the report and then exits with status 1 when this is not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

impl Report {
    /// The result of a `scenario` run that started at `started_unix` (with `machine` watching since):
    /// stamps the tool version and the command line, and closes the machine's CPU window now.
    pub fn new(
        scenario: &str,
        started_unix: u64,
        machine: &MachineWatch,
        params: serde_json::Value,
        result: serde_json::Value,
    ) -> Report {
        Report {
            scenario: scenario.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            command: command_line(),
            started_unix,
            machine: machine.finish(),
            params,
            result,
            failures: Vec::new(),
        }
    }
}

/// The machine and how busy it was.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// Online CPUs.
    pub cores: usize,
    /// Memory, KiB.
    pub mem_total_kib: u64,
    /// 1-minute load average at the start.
    pub loadavg_start: f64,
    /// 1-minute load average at the end.
    pub loadavg_end: f64,
    /// Share of all CPUs busy during the run, %.
    pub busy_pct: f64,
}

/// Measures machine-wide CPU use between `start` and `finish`.
pub struct MachineWatch {
    jiffies: (u64, u64),
    load: f64,
}

impl MachineWatch {
    /// Starts watching.
    pub fn start() -> Self {
        MachineWatch {
            jiffies: procfs::cpu_jiffies(),
            load: procfs::loadavg(),
        }
    }

    /// The machine description for the time since `start`.
    pub fn finish(&self) -> Machine {
        let (busy1, total1) = procfs::cpu_jiffies();
        let busy = busy1.saturating_sub(self.jiffies.0) as f64;
        let total = total1.saturating_sub(self.jiffies.1) as f64;
        Machine {
            cores: procfs::cores(),
            mem_total_kib: procfs::mem_total_kib(),
            loadavg_start: self.load,
            loadavg_end: procfs::loadavg(),
            busy_pct: if total > 0.0 {
                r3(busy / total * 100.0)
            } else {
                0.0
            },
        }
    }
}

/// CPU accounting of a measured window: the server(s), this tool, and everything else.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CpuWindow {
    /// Wall time, s.
    pub wall_s: f64,
    /// All CPUs busy, in core-seconds.
    pub machine_busy_s: f64,
    /// Servers' CPU (sum over --server-pid), s.
    pub servers_s: f64,
    /// Brokers' CPU (sum over --broker-pid), s.
    #[serde(default)]
    pub brokers_s: f64,
    /// This tool's CPU (process + waited-for workers), s.
    pub tool_s: f64,
    /// Everything else on the machine (other agents, builds…), s.
    pub other_s: f64,
    /// `other_s` as a share of the machine's capacity, %.
    pub other_pct: f64,
}

/// Starts a CPU window.
pub struct CpuWatch {
    at: Instant,
    jiffies: (u64, u64),
    servers: Vec<(u32, f64)>,
    brokers: Vec<(u32, f64)>,
    tool: f64,
}

fn cpu_now(pids: &[u32]) -> Vec<(u32, f64)> {
    pids.iter()
        .map(|&p| (p, procfs::cpu_seconds(p).unwrap_or(0.0)))
        .collect()
}

fn cpu_since(start: &[(u32, f64)]) -> Vec<(u32, f64)> {
    start
        .iter()
        .map(|&(p, c0)| (p, r3(procfs::cpu_seconds(p).unwrap_or(c0) - c0)))
        .collect()
}

impl CpuWatch {
    /// Starts measuring now.
    pub fn start(server_pids: &[u32], broker_pids: &[u32]) -> Self {
        CpuWatch {
            at: Instant::now(),
            jiffies: procfs::cpu_jiffies(),
            servers: cpu_now(server_pids),
            brokers: cpu_now(broker_pids),
            tool: (procfs::cpu_time(false) + procfs::children_cpu_time()).as_secs_f64(),
        }
    }

    /// Per-server CPU seconds since start, and the window.
    pub fn finish(&self) -> (Vec<(u32, f64)>, CpuWindow) {
        let wall = self.at.elapsed().as_secs_f64();
        let (busy1, _) = procfs::cpu_jiffies();
        let busy = busy1.saturating_sub(self.jiffies.0) as f64 * procfs::jiffy_seconds();
        let servers = cpu_since(&self.servers);
        let servers_s: f64 = servers.iter().map(|s| s.1).sum();
        let brokers_s: f64 = cpu_since(&self.brokers).iter().map(|s| s.1).sum();
        let tool =
            (procfs::cpu_time(false) + procfs::children_cpu_time()).as_secs_f64() - self.tool;
        let other = (busy - servers_s - brokers_s - tool).max(0.0);
        let capacity = wall * procfs::cores() as f64;
        (
            servers,
            CpuWindow {
                wall_s: r3(wall),
                machine_busy_s: r3(busy),
                servers_s: r3(servers_s),
                brokers_s: r3(brokers_s),
                tool_s: r3(tool),
                other_s: r3(other),
                other_pct: if capacity > 0.0 {
                    r3(other / capacity * 100.0)
                } else {
                    0.0
                },
            },
        )
    }
}

/// The command line as one string.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.contains(' ') || a.is_empty() {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes the report as pretty JSON to `path` (when given) and returns it as text.
pub fn write(report: &Report, path: Option<&std::path::Path>) -> anyhow::Result<String> {
    let text = serde_json::to_string_pretty(report)?;
    if let Some(p) = path {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, format!("{text}\n"))?;
    }
    Ok(text)
}
