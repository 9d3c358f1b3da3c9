//! Clients talk only to a real HAProxy in front of several nodes on one Redis; the balancer
//! health-checks `/readyz`. Also runs `deploy/local-cluster.sh` end to end.
//!
//! Needs `redis-server`, `haproxy` and `curl` on PATH.

mod common;
mod redis_support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use redis_support::{Collector, Haproxy, Node, Redis, TempDir, Ws, eventually, free_port, http};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_haproxy_get_every_message_once_in_order() {
    let redis = Redis::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Node::redis("redis", &redis.url(), &[]).await);
    }
    // A fourth node that can never reach its Redis: the balancer must keep clients away from it.
    let broken = Node::redis("redis", &format!("redis://127.0.0.1:{}", free_port()), &[]).await;
    for node in &nodes {
        node.wait_ready(READY).await;
    }
    assert!(!broken.is_ready().await);
    let mut backends: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    backends.push(broken.addr);
    let lb = Haproxy::start(&backends);
    assert!(
        eventually(READY, async || http(lb.addr(), "GET", "/readyz", "")
            .await
            .0
            == 200)
        .await,
        "haproxy routes to a ready node"
    );
    // Let the health checks mark the broken node down (inter 500ms, fall 2).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let topic = "lb.demo";
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut ws = Ws::connect(lb.addr()).await;
        let ack = ws.subscribe(topic).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        clients.push(ws);
    }
    let mut per_node = HashMap::new();
    for node in &nodes {
        per_node.insert(
            node.addr,
            node.metric("pubgate_connections").await.unwrap_or(0.0),
        );
    }
    assert_eq!(broken.metric("pubgate_connections").await, Some(0.0));
    assert_eq!(per_node.values().sum::<f64>(), 6.0, "{per_node:?}");
    assert!(
        per_node.values().filter(|n| **n > 0.0).count() >= 2,
        "connections spread over the nodes: {per_node:?}"
    );

    let total = 30;
    let collector = Collector::start(clients, total, Duration::from_secs(20));
    let mut expected = Vec::new();
    let mut offset = 0u64;
    for i in 0..total {
        let data = json!({"i": i});
        if i % 3 == 2 {
            redis.cli(&["PUBLISH", &format!("pubgate:{topic}"), &data.to_string()]);
            expected.push((Value::Null, data));
        } else {
            let (status, body) = http(
                lb.addr(),
                "POST",
                &format!("/v1/publish/{topic}"),
                &data.to_string(),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            offset += 1;
            expected.push((json!(offset), data));
        }
    }
    let (_, got) = collector.finish().await;
    for (i, messages) in got.iter().enumerate() {
        let seen: Vec<(Value, Value)> = messages
            .iter()
            .map(|m| (m["offset"].clone(), m["data"].clone()))
            .collect();
        assert_eq!(seen, expected, "client {i}");
    }
}

/// Reads `KEY=value` from the script's state file.
fn state_value(state: &str, key: &str) -> Option<String> {
    state
        .lines()
        .rev()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

fn pid_alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_script_starts_a_working_stack_and_stops_exactly_it() {
    let dir = TempDir::new("stack");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local-cluster.sh");
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(script)
            .args(args)
            .env("PUBGATE_BIN", env!("CARGO_BIN_EXE_pubgate"))
            .env("PUBGATE_STACK_DIR", &dir.0)
            .output()
            .expect("run local-cluster.sh")
    };
    let out = run(&["start", "2"]);
    let state = std::fs::read_to_string(dir.join("state")).unwrap_or_default();
    let pids: Vec<String> = state_value(&state, "ALL_PIDS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let stop_guard = scopeguard(|| {
        run(&["stop"]);
    });
    assert!(
        out.status.success(),
        "start failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pids.len(), 4, "redis, 2 nodes, haproxy: {state}");
    let lb_port: u16 = state_value(&state, "HAPROXY_PORT")
        .and_then(|p| p.parse().ok())
        .expect("balancer port in the state file");
    let lb = std::net::SocketAddr::from(([127, 0, 0, 1], lb_port));

    let mut ws = Ws::connect(lb).await;
    assert_eq!(ws.subscribe("stack.demo").await["op"], "ack");
    let (status, body) = http(lb, "POST", "/v1/publish/stack.demo", r#"{"hello":"stack"}"#).await;
    assert_eq!(status, 200, "{body}");
    let m = ws
        .next_message(Duration::from_secs(5))
        .await
        .expect("message");
    assert_eq!(m["data"], json!({"hello":"stack"}));
    ws.close().await;

    // `status`: one line per process, name, address, PID and state; nothing of the raw state file.
    assert_eq!(
        state.matches("ALL_PIDS=").count(),
        1,
        "ALL_PIDS once in the state file: {state}"
    );
    let out = run(&["status"]);
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{status}");
    let port = |k: &str| state_value(&state, k).expect(k);
    let mut want = vec![format!(
        "{:<9} {:<22} {:<8} {}",
        "name", "address", "pid", "state"
    )];
    for (name, p, pid, st) in [
        ("balancer", "HAPROXY_PORT", "HAPROXY_PID", "running"),
        ("node1", "NODE1_PORT", "NODE1_PID", "ready"),
        ("node2", "NODE2_PORT", "NODE2_PID", "ready"),
        ("redis", "REDIS_PORT", "REDIS_PID", "running"),
    ] {
        want.push(format!(
            "{:<9} {:<22} {:<8} {}",
            name,
            format!("127.0.0.1:{}", port(p)),
            port(pid),
            st
        ));
    }
    assert_eq!(status.lines().collect::<Vec<_>>(), want, "{status}");

    drop(stop_guard);
    for pid in &pids {
        assert!(
            eventually(Duration::from_secs(10), async || !pid_alive(pid)).await,
            "PID {pid} still running after stop"
        );
    }
    assert!(!dir.join("state").exists(), "stop removes the state file");
}

/// Runs `f` when dropped (so the stack is stopped even if an assertion fails).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
