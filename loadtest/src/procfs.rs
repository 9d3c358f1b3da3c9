//! What the tool reads from the kernel: its own fd limit and CPU time, and a server process's RSS,
//! CPU time and fd limit, plus system-wide socket and slab memory.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The process's `RLIMIT_NOFILE` (soft, hard).
pub fn nofile_limit() -> (u64, u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rc != 0 {
        return (1024, 1024);
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    (rl.rlim_cur as u64, rl.rlim_max as u64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    let (soft, hard) = nofile_limit();
    if soft < hard {
        let rl = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we pass.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
        if rc == 0 {
            return hard;
        }
    }
    soft
}

/// Files a process needs besides its connections (runtime, stdio, publishers, /proc reads).
pub const FD_RESERVE: u64 = 64;

/// CPU time of this process (`RUSAGE_SELF`) or the calling thread (`RUSAGE_THREAD`).
pub fn cpu_time(thread_only: bool) -> Duration {
    let who = if thread_only {
        libc::RUSAGE_THREAD
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of children that were waited for (`RUSAGE_CHILDREN`).
pub fn children_cpu_time() -> Duration {
    // SAFETY: as above.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// One look at a (server) process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcSample {
    /// The pid.
    pub pid: u32,
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `RssAnon`, KiB.
    pub rss_anon_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub hwm_kib: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// utime + stime, seconds.
    pub cpu_s: f64,
}

/// Field `key` (e.g. `VmRSS:`) of a /proc status file, as its first number.
pub fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime in clock ticks from a /proc/PID/stat line.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) … utime is field 14 of the full line, i.e. index 11 here.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Samples a process; `None` when it is gone or unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcSample {
        pid,
        rss_kib: status_field(&status, "VmRSS:").unwrap_or(0),
        rss_anon_kib: status_field(&status, "RssAnon:").unwrap_or(0),
        hwm_kib: status_field(&status, "VmHWM:").unwrap_or(0),
        threads: status_field(&status, "Threads:").unwrap_or(0),
        open_fds,
        cpu_s: stat_cpu_ticks(&stat).unwrap_or(0) as f64 / clock_ticks() as f64,
    })
}

/// Just the CPU seconds of a process (cheap: one small read).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_cpu_ticks(&stat)? as f64 / clock_ticks() as f64)
}

/// `Max open files` (soft, hard) from a /proc/PID/limits text.
pub fn parse_open_files_limit(limits: &str) -> Option<(String, String)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    Some((f.next()?.to_string(), f.next()?.to_string()))
}

/// The open-files limit of a process.
pub fn open_files_limit(pid: u32) -> Option<(String, String)> {
    parse_open_files_limit(&std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?)
}

/// System-wide socket numbers from /proc/net/sockstat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sockstat {
    /// `sockets: used`.
    pub sockets_used: u64,
    /// `TCP: inuse`.
    pub tcp_inuse: u64,
    /// `TCP: alloc`.
    pub tcp_alloc: u64,
    /// `TCP: mem`, converted from pages to KiB.
    pub tcp_mem_kib: u64,
}

/// Parses /proc/net/sockstat.
pub fn parse_sockstat(text: &str) -> Sockstat {
    let mut s = Sockstat::default();
    let field = |line: &str, key: &str| -> Option<u64> {
        let mut it = line.split_whitespace();
        while let Some(w) = it.next() {
            if w == key {
                return it.next()?.parse().ok();
            }
        }
        None
    };
    for line in text.lines() {
        if line.starts_with("sockets:") {
            s.sockets_used = field(line, "used").unwrap_or(0);
        } else if line.starts_with("TCP:") {
            s.tcp_inuse = field(line, "inuse").unwrap_or(0);
            s.tcp_alloc = field(line, "alloc").unwrap_or(0);
            s.tcp_mem_kib = field(line, "mem").unwrap_or(0) * page_size() / 1024;
        }
    }
    s
}

/// Reads /proc/net/sockstat.
pub fn sockstat() -> Sockstat {
    parse_sockstat(&std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default())
}

/// Bytes held per slab cache (active objects × object size), from /proc/slabinfo.
pub fn parse_slabinfo(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        if let (Ok(active), Ok(size)) = (f[1].parse::<u64>(), f[3].parse::<u64>()) {
            out.insert(f[0].to_string(), active * size);
        }
    }
    out
}

/// /proc/slabinfo, when readable (needs root).
pub fn slabinfo() -> Option<BTreeMap<String, u64>> {
    std::fs::read_to_string("/proc/slabinfo")
        .ok()
        .map(|t| parse_slabinfo(&t))
}

/// `Slab:` of /proc/meminfo, KiB.
pub fn meminfo_slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_field(&t, "Slab:"))
        .unwrap_or(0)
}

/// System-wide memory that sockets cost: the kernel side of connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelSample {
    /// /proc/net/sockstat.
    pub sockstat: Sockstat,
    /// `Slab:` from /proc/meminfo, KiB.
    pub slab_kib: u64,
    /// Per-cache slab bytes (only when /proc/slabinfo is readable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slab_caches: Option<BTreeMap<String, u64>>,
}

/// Samples the kernel side.
pub fn kernel_sample(with_caches: bool) -> KernelSample {
    KernelSample {
        sockstat: sockstat(),
        slab_kib: meminfo_slab_kib(),
        slab_caches: if with_caches { slabinfo() } else { None },
    }
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
pub fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_cpu_jiffies(&text)
}

/// Parses the `cpu` line of /proc/stat into (busy, total) jiffies.
pub fn parse_cpu_jiffies(text: &str) -> (u64, u64) {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Seconds of CPU per jiffy.
pub fn jiffy_seconds() -> f64 {
    1.0 / clock_ticks() as f64
}

/// Online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Total memory, KiB.
pub fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_field(&t, "MemTotal:"))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tpubgate\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    8000 kB\nThreads:\t3\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(10240));
        assert_eq!(status_field(status, "RssAnon:"), Some(8000));
        assert_eq!(status_field(status, "Threads:"), Some(3));
        assert_eq!(status_field(status, "Nope:"), None);
        let stat =
            "1234 (pub gate) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 1000 200";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn parses_limits_sockstat_slab_and_cpu() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            20000                20000                files     \n";
        assert_eq!(
            parse_open_files_limit(limits),
            Some(("20000".into(), "20000".into()))
        );
        let s = parse_sockstat(
            "sockets: used 29\nTCP: inuse 2 orphan 0 tw 0 alloc 3 mem 211\nUDP: inuse 0 mem 0\n",
        );
        assert_eq!((s.sockets_used, s.tcp_inuse, s.tcp_alloc), (29, 2, 3));
        assert_eq!(s.tcp_mem_kib, 211 * page_size() / 1024);
        let slab = parse_slabinfo(
            "slabinfo - version: 2.1\n# name ...\nTCP                   26     26   2368   13    8 : tunables    0    0    0 : slabdata      2      2      0\n",
        );
        assert_eq!(slab["TCP"], 26 * 2368);
        let (busy, total) = parse_cpu_jiffies("cpu  10 1 5 100 4 0 2 0 0 0\ncpu0 1 2\n");
        assert_eq!((busy, total), (18, 122));
    }

    #[test]
    fn own_process_is_readable() {
        let me = sample(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kib > 0 && me.threads >= 1 && me.open_fds >= 1);
        let (soft, hard) = nofile_limit();
        assert!(soft >= 1 && hard >= soft);
        assert!(open_files_limit(std::process::id()).is_some());
    }
}
