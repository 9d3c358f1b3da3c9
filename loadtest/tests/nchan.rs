//! `--protocol nchan`: the same fan-out against two real nginx + nchan instances sharing one real
//! `redis-server` (configured by scripts/nchan/stack.sh), publishing to the first instance only,
//! so half the subscribers get every message across Redis. Every delivery is counted and checked
//! by the payload's per-topic sequence number.
//!
//! Skipped, with a message, when nginx or the nchan module is not installed
//! (`apt-get install nginx libnginx-mod-nchan`).

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Redis, free_port, run_tool, tmp};

const MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

fn nginx_bin() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// One nginx (master + workers) in a directory of its own, stopped on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Starts an instance on a free port with the config scripts/nchan/stack.sh generates, and
    /// waits (bounded) until a publish is answered.
    fn start(bin: &Path, redis_port: u16, name: &str, env: &[(&str, &str)]) -> Nginx {
        // Named by the port too: the tests of this file run in parallel in one process.
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "pubgate-nchan-{}-{name}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nchan/stack.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args(["conf", &dir.to_string_lossy(), &port.to_string()])
            .arg(redis_port.to_string())
            .envs(env.iter().copied())
            .output()
            .expect("run stack.sh conf");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, &out.stdout).expect("write nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let n = Nginx { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if n.publish_probe() {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(n.dir.join("error.log")).unwrap_or_default();
        panic!("nginx on {port} did not answer a publish: {log}");
    }

    /// Whether `POST /pub/probe` is answered with a 2xx (nchan is up and reaches Redis).
    fn publish_probe(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "POST /pub/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx";
        let mut buf = [0u8; 16];
        s.write_all(req.as_bytes()).is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 20"))
    }

    /// PIDs of the master and its workers (the workers do the work).
    fn pids(&self) -> Vec<String> {
        let pid = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid.to_string())
            .chain(children.split_whitespace().map(str::to_string))
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its own workers (SIGKILL would leave them running).
        // SAFETY: kill(2) on the PID of a child this test started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis and two nchan instances on it, or `None` (with a message) when nginx/nchan are missing.
fn stack(env: &[(&str, &str)]) -> Option<(Redis, Nginx, Nginx)> {
    let Some(bin) = nginx_bin() else {
        eprintln!("skipped: nginx is not installed (apt-get install nginx libnginx-mod-nchan)");
        return None;
    };
    if !Path::new(MODULE).exists() {
        eprintln!("skipped: no nchan module at {MODULE} (apt-get install libnginx-mod-nchan)");
        return None;
    }
    let redis = Redis::start();
    let a = Nginx::start(&bin, redis.port, "a", env);
    let b = Nginx::start(&bin, redis.port, "b", env);
    Some((redis, a, b))
}

/// 40 subscribers over 4 topics on both instances, 200 publishes to the first: 2,000 deliveries.
fn fanout(a: &Nginx, b: &Nginx, redis: &Redis, extra: &[&str], name: &str) -> serde_json::Value {
    let (ua, ub) = (
        format!("ws://127.0.0.1:{}", a.port),
        format!("ws://127.0.0.1:{}", b.port),
    );
    let mut args = vec![
        "fanout",
        "--protocol",
        "nchan",
        "--url",
        &ua,
        "--url",
        &ub,
        "--shared-broker",
        "--publish-nodes",
        "1",
        "--subscribers",
        "40",
        "--topics",
        "4",
        "--rate",
        "100",
        "--duration",
        "2",
        "--warmup",
        "1",
        "--payload",
        "256",
        "--publishers",
        "4",
        "--drain",
        "5",
    ];
    let pids: Vec<String> = a.pids().into_iter().chain(b.pids()).collect();
    for p in &pids {
        args.extend(["--server-pid", p.as_str()]);
    }
    let redis_pid = redis.pid().to_string();
    args.extend(["--broker-pid", redis_pid.as_str()]);
    args.extend(extra);
    let json = tmp(name);
    let r = run_tool(&args, &json);
    let _ = std::fs::remove_file(&json);
    r
}

fn assert_all_delivered(r: &serde_json::Value) {
    assert_eq!(r["params"]["protocol"], "nchan", "{:#}", r["params"]);
    let res = &r["result"];
    assert_eq!(res["subscribers_established"], 40, "{res:#}");
    let p = &res["phase"];
    assert_eq!(p["publish"]["ok"], 200, "{p:#}");
    assert_eq!(p["publish"]["failed"], serde_json::json!({}), "{p:#}");
    // Every publish went to the first instance.
    let rows = p["publish"]["ok_by_node_topic"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{p:#}");
    assert_eq!(p["expected"], 2000, "{p:#}");
    assert_eq!(p["delivered"], 2000, "{p:#}");
    assert_eq!(p["received"], 2000, "{p:#}");
    assert_eq!(p["lost"], 0, "{p:#}");
    let c = &p["counters"];
    for k in ["duplicates", "late", "gaps", "bad_frames", "errors"] {
        assert_eq!(c[k], 0, "{k}: {c:#}");
    }
    assert!(p["server_us_per_delivery"].as_f64().is_some(), "{p:#}");
    assert!(
        p["server_and_broker_us_per_delivery"].as_f64().is_some(),
        "{p:#}"
    );
}

#[test]
fn nchan_fanout_across_two_instances_delivers_every_message_in_order() {
    let Some((redis, a, b)) = stack(&[]) else {
        return;
    };
    let r = fanout(&a, &b, &redis, &[], "nchan-fanout");
    assert_all_delivered(&r);
    // The bare 256-byte body in a frame with a 4-byte header: nothing else on the wire.
    assert_eq!(
        r["result"]["phase"]["wire_bytes_per_delivery"], 260.0,
        "{r:#}"
    );
}

#[test]
fn nchan_fanout_with_permessage_deflate_inflates_every_message() {
    let Some((redis, a, b)) = stack(&[("NCHAN_DEFLATE", "1")]) else {
        return;
    };
    let r = fanout(&a, &b, &redis, &["--deflate"], "nchan-deflate");
    assert_all_delivered(&r);
    let bytes = r["result"]["phase"]["wire_bytes_per_delivery"]
        .as_f64()
        .expect("bytes");
    assert!(
        bytes < 256.0,
        "compressed frames expected, got {bytes} B per delivery"
    );
}
