//! The headline test of zero-loss rolling restarts: three nodes on one Redis (with history) behind a
//! real HAProxy that health-checks `/readyz`; 60 clients over 4 topics that reconnect through the
//! balancer and resume with `since` whenever their connection closes; a publisher at a steady rate
//! over HTTP through the balancer. Every node is restarted in turn (SIGTERM, paced drain, started
//! again on the same port), then one is killed with SIGKILL and started again. At the end every
//! client has every published message exactly once, in order.
//!
//! What "published" means is taken from Redis's history, read back through `GET /v1/history`: a
//! publish that failed (503, a reset connection, a 502 from the balancer when its node died) is
//! retried, and one that failed *after* Redis ran it is in history twice under two offsets, which
//! is what subscribers must get. Every publish the publisher saw acknowledged must be in history
//! at its offset.
//!
//! Needs `redis-server` and `haproxy` on PATH. Run alone with
//! `cargo test -p gateway --test rolling_restart -- --nocapture` to see the figures.

mod common;
mod redis_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_support::{Frame, Haproxy, Node, Redis, Ws, free_port, http};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(20);
const CLIENTS: usize = 60;
const TOPICS: usize = 4;
/// Publishes per second.
const RATE: u64 = 200;

fn topic_name(i: usize) -> String {
    format!("roll.t{i}")
}

/// The topics client `c` subscribes to: two neighbours out of [`TOPICS`].
fn topics_of(c: usize) -> Vec<String> {
    vec![topic_name(c % TOPICS), topic_name((c + 1) % TOPICS)]
}

/// One acknowledged publish.
#[derive(Clone, Debug)]
struct Sent {
    topic: String,
    offset: u64,
    data: String,
    /// When the request was sent and when its answer came.
    sent: Instant,
    answered: Instant,
}

#[derive(Default)]
struct PublisherLog {
    sent: Vec<Sent>,
    /// Attempts that failed (non-200 or no answer) and were retried.
    failed_attempts: u64,
}

/// Publishes `RATE` messages a second, round-robin over the topics, through the balancer, each
/// retried until it is acknowledged; stops when `stop` is set.
async fn publisher(lb: SocketAddr, stop: Arc<AtomicBool>, log: Arc<Mutex<PublisherLog>>) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let topic = topic_name(seq as usize % TOPICS);
        let mut attempt = 0;
        loop {
            let data = json!({"s": seq, "a": attempt}).to_string();
            let sent = Instant::now();
            let (status, body) = http(lb, "POST", &format!("/v1/publish/{topic}"), &data).await;
            let answered = Instant::now();
            if status == 200 {
                let v: Value = serde_json::from_str(&body).expect("publish reply");
                let offset = v["offset"].as_u64().expect("offset");
                log.lock().unwrap().sent.push(Sent {
                    topic: topic.clone(),
                    offset,
                    data,
                    sent,
                    answered,
                });
                break;
            }
            log.lock().unwrap().failed_attempts += 1;
            attempt += 1;
            assert!(attempt < 200, "publish {seq} kept failing: {status} {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seq += 1;
    }
}

/// What one client saw of one topic.
#[derive(Default, Clone)]
struct TopicSeen {
    epoch: Option<String>,
    /// The offset the first subscribe was acknowledged at.
    start: u64,
    last: u64,
    got: Vec<(u64, String)>,
    /// Offsets that did not continue `last` by one, as (expected, got).
    violations: Vec<(u64, u64)>,
}

/// A connection that ended without a close frame (its node was killed), and when this client
/// resumed each topic afterwards, from which offset.
#[derive(Clone, Debug)]
struct Abrupt {
    at: Instant,
    resumed: Vec<(String, u64, Instant)>,
}

#[derive(Default)]
struct ClientLog {
    topics: BTreeMap<String, TopicSeen>,
    connections: u64,
    failed_connects: u64,
    graceful_closes: u64,
    abrupt: Vec<Abrupt>,
    recovered: u64,
    not_recovered: Vec<String>,
    errors: Vec<String>,
}

/// Delay before reconnect attempt `n` (0-based): jittered, growing from 50–150 ms to 0.5–1.5 s.
fn backoff(n: u32) -> Duration {
    let base = 100u64 << n.min(4);
    let base = base.min(1000);
    Duration::from_millis(base / 2 + rand::random::<u64>() % (base + 1))
}

/// A client: connects through the balancer, subscribes (resuming with `since` once it has seen a
/// topic), reads until the connection closes, and starts over, until `done` and every topic
/// reached its target offset.
async fn client(
    lb: SocketAddr,
    topics: Vec<String>,
    log: Arc<Mutex<ClientLog>>,
    targets: Arc<Mutex<Option<HashMap<String, u64>>>>,
) {
    let finished = |log: &ClientLog| {
        targets.lock().unwrap().as_ref().is_some_and(|t| {
            log.topics
                .iter()
                .all(|(topic, seen)| seen.last >= t[topic.as_str()])
        })
    };
    let mut failures = 0u32;
    let mut abrupt: Option<Abrupt> = None;
    'connect: loop {
        if finished(&log.lock().unwrap()) {
            return;
        }
        let mut ws = match Ws::try_connect(lb).await {
            Ok(ws) => ws,
            Err(_) => {
                log.lock().unwrap().failed_connects += 1;
                tokio::time::sleep(backoff(failures)).await;
                failures += 1;
                continue;
            }
        };
        log.lock().unwrap().connections += 1;
        // Subscribe (or resume) every topic; messages of topics already subscribed on this
        // connection may arrive in between.
        for (id, topic) in topics.iter().enumerate() {
            let since = log.lock().unwrap().topics.get(topic).and_then(|s| {
                let epoch = s.epoch.clone()?;
                Some(json!({"epoch": epoch, "offset": s.last}))
            });
            let mut req = json!({"op":"subscribe","topic":topic,"id":id});
            if let Some(since) = &since {
                req["since"] = since.clone();
            }
            ws.send(req).await;
            let sent_at = Instant::now();
            loop {
                match ws.next_frame(Duration::from_secs(10)).await {
                    Frame::Json(v) if v["op"] == "message" => on_message(&log, &v),
                    Frame::Json(v) if v["op"] == "ack" && v["id"] == json!(id) => {
                        let mut l = log.lock().unwrap();
                        let seen = l.topics.entry(topic.clone()).or_default();
                        let offset = v["offset"].as_u64().unwrap_or(0);
                        match &since {
                            None => {
                                seen.epoch = v["epoch"].as_str().map(str::to_string);
                                seen.start = offset;
                                seen.last = offset;
                            }
                            Some(s)
                                if v["recovered"] == json!(true) && s["offset"] == v["offset"] =>
                            {
                                l.recovered += 1;
                                if let Some(a) = &mut abrupt {
                                    a.resumed.push((topic.clone(), offset, sent_at));
                                }
                            }
                            Some(s) => {
                                // Not expected: history holds everything. Follow the server's
                                // position so the rest of the run is still checked.
                                seen.epoch = v["epoch"].as_str().map(str::to_string);
                                seen.last = offset;
                                l.not_recovered.push(format!("{topic} since {s}: {v}"));
                            }
                        }
                        break;
                    }
                    Frame::Json(v) => {
                        // An error (e.g. the broker path of a node that just started): retry.
                        log.lock().unwrap().errors.push(v.to_string());
                        tokio::time::sleep(backoff(failures)).await;
                        failures += 1;
                        continue 'connect;
                    }
                    Frame::Closed(_) | Frame::Timeout => {
                        tokio::time::sleep(backoff(failures)).await;
                        failures += 1;
                        continue 'connect;
                    }
                }
            }
        }
        failures = 0;
        if let Some(a) = abrupt.take() {
            log.lock().unwrap().abrupt.push(a);
        }
        loop {
            match ws.next_frame(Duration::from_millis(500)).await {
                Frame::Json(v) if v["op"] == "message" => on_message(&log, &v),
                Frame::Json(v) => log.lock().unwrap().errors.push(v.to_string()),
                Frame::Timeout => {
                    if finished(&log.lock().unwrap()) {
                        ws.close().await;
                        return;
                    }
                }
                Frame::Closed(code) => {
                    // A drained node asks for a prompt reconnect; after a connection that just
                    // broke, back off longer (as real clients do). That also leaves the publisher
                    // time to publish while the client is away, so its resume must replay from
                    // history, which the test asserts.
                    let wait = if code == Some(1001) {
                        log.lock().unwrap().graceful_closes += 1;
                        backoff(0)
                    } else {
                        abrupt = Some(Abrupt {
                            at: Instant::now(),
                            resumed: Vec::new(),
                        });
                        backoff(3)
                    };
                    tokio::time::sleep(wait).await;
                    continue 'connect;
                }
            }
        }
    }
}

fn on_message(log: &Mutex<ClientLog>, m: &Value) {
    let topic = m["topic"].as_str().expect("topic");
    let offset = m["offset"].as_u64().expect("offset");
    let data = m["data"].to_string();
    let mut l = log.lock().unwrap();
    let seen = l.topics.get_mut(topic).expect("a subscribed topic");
    // The first message of an epoch names it (the ack of a topic that did not exist yet has the
    // empty epoch "0"): a client resumes with the epoch it learnt last.
    if let Some(epoch) = m["epoch"].as_str() {
        seen.epoch = Some(epoch.to_string());
    }
    if offset != seen.last + 1 {
        seen.violations.push((seen.last + 1, offset));
    }
    seen.last = seen.last.max(offset);
    seen.got.push((offset, data));
}

/// Reads a topic's whole history through `GET /v1/history`, page by page: offset → data.
async fn read_history(node: SocketAddr, topic: &str) -> (String, u64, BTreeMap<u64, String>) {
    let mut all = BTreeMap::new();
    let mut since = 0;
    loop {
        let path = format!("/v1/history/{topic}?since={since}&limit=1000");
        let (status, body) = http(node, "GET", &path, "").await;
        assert_eq!(status, 200, "{path}: {body}");
        let page: Value = serde_json::from_str(&body).expect("history page");
        assert_eq!(
            page["complete"],
            json!(true),
            "history holds everything: {path}"
        );
        let latest = page["offset"].as_u64().expect("offset");
        for m in page["messages"].as_array().expect("messages") {
            let offset = m["offset"].as_u64().expect("offset");
            all.insert(offset, m["data"].to_string());
            since = offset;
        }
        if since >= latest {
            let epoch = page["epoch"].as_str().expect("epoch").to_string();
            return (epoch, latest, all);
        }
    }
}

fn node_env(redis: &Redis) -> Vec<(&'static str, String)> {
    vec![
        ("PUBGATE__BROKER__KIND", "redis".into()),
        ("PUBGATE__BROKER__URL", redis.url()),
        ("PUBGATE__HISTORY__SIZE", "100000".into()),
        ("PUBGATE__HISTORY__TTL", "10m".into()),
        ("PUBGATE__DRAIN__DELAY", "1s".into()),
        ("PUBGATE__DRAIN__GRACE", "4s".into()),
    ]
}

async fn restart_in_place(node: &mut Node, how: &str) {
    node.restart().await;
    node.wait_ready(READY).await;
    // The balancer marks it up after two good checks, 500 ms apart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!("  {how}: node {} is back and ready", node.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_and_a_killed_node_lose_and_duplicate_nothing() {
    let started = Instant::now();
    let redis = Redis::start();
    let env = node_env(&redis);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let listen = format!("127.0.0.1:{}", free_port());
        nodes.push(Node::start_with(&["--listen", &listen], &env).await);
    }
    for node in &nodes {
        node.wait_ready(READY).await;
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let haproxy = Haproxy::start(&addrs);
    let lb = haproxy.addr();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Clients first, so every one of them starts at offset 0 of its topics.
    let targets: Arc<Mutex<Option<HashMap<String, u64>>>> = Arc::default();
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(c, log)| tokio::spawn(client(lb, topics_of(c), log.clone(), targets.clone())))
        .collect();
    let subscribed = Instant::now() + Duration::from_secs(30);
    while logs.iter().any(|l| l.lock().unwrap().topics.len() < 2) {
        assert!(Instant::now() < subscribed, "clients did not all subscribe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut per_node = Vec::new();
    for node in &nodes {
        per_node.push(node.metric("pubgate_connections").await.unwrap_or(0.0));
    }
    println!("clients per node before the restarts: {per_node:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let pub_log: Arc<Mutex<PublisherLog>> = Arc::default();
    let publishing = tokio::spawn(publisher(lb, stop.clone(), pub_log.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Rolling restart: SIGTERM (not ready for drain.delay, then closes paced over the grace),
    // wait for the exit, start again on the same port.
    for node in nodes.iter_mut() {
        let t0 = Instant::now();
        node.terminate();
        let status = node
            .wait_exit(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("node {} did not exit after SIGTERM", node.addr));
        assert!(status.success(), "drained node exits cleanly: {status:?}");
        println!(
            "  SIGTERM: node {} drained and exited in {:?}",
            node.addr,
            t0.elapsed()
        );
        restart_in_place(node, "restarted").await;
    }

    // A crash: SIGKILL, no drain. Its clients lose their connection (and whatever was in flight
    // to them) and must get it back from history when they resume elsewhere.
    // The victim is the node holding the most clients now.
    let mut victim = 0;
    let mut on_victim = 0.0;
    for (i, node) in nodes.iter().enumerate() {
        let n = node.metric("pubgate_connections").await.unwrap_or(0.0);
        if n > on_victim {
            (victim, on_victim) = (i, n);
        }
    }
    assert!(on_victim > 0.0, "the victim holds clients");
    let killed_at = Instant::now();
    nodes[victim].stop();
    println!(
        "  SIGKILL: node {} killed with {on_victim} clients",
        nodes[victim].addr
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    restart_in_place(&mut nodes[victim], "restarted after SIGKILL").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::Relaxed);
    publishing.await.expect("publisher");

    // The truth: each topic's history, complete from offset 1.
    let mut truth = HashMap::new();
    let mut target_map = HashMap::new();
    for t in 0..TOPICS {
        let topic = topic_name(t);
        let (epoch, latest, all) = read_history(nodes[0].addr, &topic).await;
        assert_eq!(
            all.len() as u64,
            latest,
            "{topic}: offsets 1..={latest} all in history"
        );
        target_map.insert(topic.clone(), latest);
        truth.insert(topic, (epoch, all));
    }
    *targets.lock().unwrap() = Some(target_map.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, task)
            .await
            .expect("every client catches up with the last offset")
            .expect("client task");
    }

    // The publisher's acknowledged publishes are in history at their offsets, each sequence
    // number once (a retried publish may also be there under an earlier offset).
    let pub_log = std::mem::take(&mut *pub_log.lock().unwrap());
    let mut acked_seqs = HashSet::new();
    for s in &pub_log.sent {
        assert_eq!(
            truth[&s.topic].1.get(&s.offset),
            Some(&s.data),
            "acknowledged publish at {} {}",
            s.topic,
            s.offset
        );
        let v: Value = serde_json::from_str(&s.data).expect("data");
        assert!(acked_seqs.insert(v["s"].as_u64().expect("seq")));
    }
    let published: u64 = truth.values().map(|(_, all)| all.len() as u64).sum();
    let unacked_in_history = published - pub_log.sent.len() as u64;

    // Every client: exactly the topic's history, in order, from its first ack on.
    let (mut lost, mut duplicated, mut out_of_order, mut delivered) = (0u64, 0u64, 0u64, 0u64);
    let (mut reconnects, mut graceful, mut abrupt, mut recovered) = (0u64, 0u64, 0u64, 0u64);
    let (mut not_recovered, mut failed_connects, mut errors) = (Vec::new(), 0u64, Vec::new());
    let mut replayed_after_kill = 0u64;
    let mut violations = Vec::new();
    for (c, log) in logs.iter().enumerate() {
        let l = log.lock().unwrap();
        reconnects += l.connections - 1;
        failed_connects += l.failed_connects;
        graceful += l.graceful_closes;
        abrupt += l.abrupt.len() as u64;
        recovered += l.recovered;
        not_recovered.extend(l.not_recovered.iter().cloned());
        errors.extend(l.errors.iter().cloned());
        for (topic, seen) in &l.topics {
            let (epoch, all) = &truth[topic];
            assert_eq!(
                seen.epoch.as_ref(),
                Some(epoch),
                "client {c} {topic}: one epoch"
            );
            assert_eq!(
                seen.start, 0,
                "client {c} {topic} subscribed before any publish"
            );
            let want: Vec<(u64, String)> = all
                .range(seen.start + 1..)
                .map(|(o, d)| (*o, d.clone()))
                .collect();
            let got_offsets: HashSet<u64> = seen.got.iter().map(|(o, _)| *o).collect();
            lost += want
                .iter()
                .filter(|(o, _)| !got_offsets.contains(o))
                .count() as u64;
            duplicated += (seen.got.len() - got_offsets.len()) as u64;
            out_of_order += seen.got.windows(2).filter(|w| w[1].0 <= w[0].0).count() as u64;
            delivered += seen.got.len() as u64;
            if !seen.violations.is_empty() {
                violations.push(format!(
                    "client {c} {topic}: {:?}",
                    &seen.violations[..seen.violations.len().min(5)]
                ));
            }
            if seen.got == want {
                continue;
            }
            let first_bad = seen.got.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "client {c} {topic}: got {} messages, want {} (first difference at index {first_bad:?})",
                seen.got.len(),
                want.len()
            );
        }
        // Messages published while this client had no connection, after its node was killed:
        // they can only have come from history.
        for a in l.abrupt.iter().filter(|a| a.at >= killed_at) {
            for (topic, since, resumed_at) in &a.resumed {
                replayed_after_kill += pub_log
                    .sent
                    .iter()
                    .filter(|s| {
                        &s.topic == topic
                            && s.offset > *since
                            && s.sent >= a.at
                            && s.answered <= *resumed_at
                    })
                    .count() as u64;
            }
        }
    }
    let subscriptions = (CLIENTS * 2) as u64;
    println!("rolling restart + SIGKILL through HAProxy, 3 nodes, Redis history:");
    println!(
        "  messages published:        {published} over {TOPICS} topics ({} acknowledged, {unacked_in_history} published by a retried attempt whose answer was lost, {} failed attempts retried)",
        pub_log.sent.len(),
        pub_log.failed_attempts
    );
    println!("  clients:                   {CLIENTS} ({subscriptions} subscriptions)");
    println!("  messages delivered:        {delivered}");
    println!(
        "  reconnects:                {reconnects} ({graceful} closes with 1001 from draining nodes, {abrupt} connections cut by SIGKILL, {failed_connects} connect attempts refused meanwhile)"
    );
    println!(
        "  resumes with since:        {recovered} recovered:true, {} recovered:false",
        not_recovered.len()
    );
    println!(
        "  replayed after the SIGKILL: {replayed_after_kill} messages published while their client was cut off"
    );
    println!("  lost:                      {lost}");
    println!("  duplicated:                {duplicated}");
    println!("  duration:                  {:?}", started.elapsed());
    assert!(violations.is_empty(), "offset violations: {violations:?}");
    assert!(
        errors.iter().all(|e| e.contains("unavailable")),
        "only refusals of a node that is going away or not ready yet: {errors:?}"
    );
    assert_eq!((lost, duplicated, out_of_order), (0, 0, 0));
    assert!(
        not_recovered.is_empty(),
        "recovered:false: {not_recovered:?}"
    );
    assert!(
        graceful >= CLIENTS as u64,
        "the rolling restart moved every client at least once"
    );
    assert!(abrupt > 0, "SIGKILL cut some clients off");
    // The cut-off clients back off at least 400 ms while the publisher goes on (HAProxy sends its
    // requests to the surviving nodes at once: see `Haproxy`), so their resumes must have replayed
    // from history. (This came out 0 while HAProxy still retried the dead node after a one-second
    // turn-around: the publisher stalled for as long as the clients were away.)
    assert!(
        replayed_after_kill > 0,
        "the resumes after the SIGKILL replayed nothing"
    );
}
