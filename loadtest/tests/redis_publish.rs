//! `fanout --redis-url`: publishers send raw `PUBLISH pubgate:<topic>` into a real `redis-server`,
//! and a real `pubgate` on the Redis broker delivers them (as `data` without an offset). Loss,
//! duplicates and order are then checked by the payload's sequence number `s`.

mod support;

use support::{Redis, Server, run_tool, run_tool_status, tmp};

fn node_on(redis: &Redis) -> Server {
    let url = redis.url();
    let server = Server::start_with(&[
        ("PUBGATE__BROKER__KIND", "redis"),
        ("PUBGATE__BROKER__URL", &url),
    ]);
    server.wait_ready();
    server
}

fn fanout_args<'a>(url: &'a str, pid: &'a str, redis_url: &'a str) -> Vec<&'a str> {
    // 30 subscribers over 3 topics (10 each), 300 raw publishes: 3,000 deliveries.
    vec![
        "fanout",
        "--url",
        url,
        "--server-pid",
        pid,
        "--redis-url",
        redis_url,
        "--subscribers",
        "30",
        "--topics",
        "3",
        "--rate",
        "150",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--payload",
        "200",
        "--publishers",
        "4",
        "--drain",
        "5",
    ]
}

/// Starts Redis and a node on it, runs a small `fanout --redis-url` (plus `extra` flags) against
/// them, and returns the tool's JSON.
fn fanout_through_redis(name: &str, extra: &[&str]) -> serde_json::Value {
    let redis = Redis::start();
    let server = node_on(&redis);
    let (url, pid, redis_url) = (
        format!("ws://{}/ws", server.addr),
        server.pid(),
        redis.url(),
    );
    let json = tmp(name);
    let mut args = fanout_args(&url, &pid, &redis_url);
    args.extend(extra);
    let r = run_tool(&args, &json);
    let _ = std::fs::remove_file(&json);
    r
}

#[test]
fn raw_redis_publishes_are_all_delivered_in_order() {
    let r = fanout_through_redis("redis-fanout", &[]);
    assert_eq!(r["params"]["publish_path"], "redis", "{:#}", r["params"]);
    let res = &r["result"];
    assert_eq!(res["subscribers_established"], 30, "{res:#}");
    let p = &res["phase"];
    assert_eq!(p["publish"]["path"], "redis", "{p:#}");
    assert_eq!(p["publish"]["ok"], 300, "{p:#}");
    assert_eq!(p["publish"]["zero_receivers"], 0, "{p:#}");
    assert_eq!(p["expected"], 3000, "{p:#}");
    assert_eq!(p["delivered"], 3000, "{p:#}");
    assert_eq!(p["received"], 3000, "{p:#}");
    assert_eq!(p["lost"], 0, "{p:#}");
    let c = &p["counters"];
    assert_eq!(c["duplicates"], 0, "{p:#}");
    assert_eq!(c["late"], 0, "{p:#}");
    assert_eq!(c["gaps"], 0, "{p:#}");
    assert_eq!(c["bad_frames"], 0, "{p:#}");
    assert_eq!(p["latency"]["count"], 3000, "{p:#}");
}

#[test]
fn raw_publishes_nobody_hears_are_counted_lost() {
    // The node listens on `pubgate:`; publishing under another prefix reaches no one, and the
    // report must say so: every expected delivery lost, every publish heard by no Redis subscriber.
    let r = fanout_through_redis("redis-fanout-lost", &["--broker-prefix", "elsewhere:"]);
    let p = &r["result"]["phase"];
    assert_eq!(p["publish"]["ok"], 300, "{p:#}");
    assert_eq!(p["publish"]["zero_receivers"], 300, "{p:#}");
    assert_eq!(p["expected"], 3000, "{p:#}");
    assert_eq!(p["delivered"], 0, "{p:#}");
    assert_eq!(p["lost"], 3000, "{p:#}");
    assert_eq!(p["loss_pct"], 100.0, "{p:#}");
}

#[test]
fn refuses_a_non_loopback_redis_and_churn_with_redis() {
    let (ok, err) = run_tool_status(
        &[
            "fanout",
            "--url",
            "ws://127.0.0.1:9/ws",
            "--redis-url",
            "redis://192.0.2.1:6379",
        ],
        None,
    );
    assert!(!ok && err.contains("loopback"), "{err}");
    let (ok, err) = run_tool_status(
        &[
            "churn",
            "--url",
            "ws://127.0.0.1:9/ws",
            "--redis-url",
            "redis://127.0.0.1:6379",
        ],
        None,
    );
    assert!(!ok && err.contains("--redis-url is not supported"), "{err}");
}
