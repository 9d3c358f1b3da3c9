//! Wildcard subscriptions on a 3-master Redis Cluster started by the test: exactly the matching
//! topics across nodes and masters, a node receiving only the topics below its prefixes (counted
//! on its Redis connection), each message once per subscription while a covering wildcard comes
//! and goes, and watches that Redis lost (deleted, or a master restarted without data) rewritten
//! with the hole filled or reported.
//!
//! Needs `redis-server` (7.0 or newer) on PATH.

mod common;
mod redis_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis_support::{Cluster, Node, Redis, Ws, eventually};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(20);
const RECEIVED: &str = "pubgate_broker_messages_received_total";

/// A node on the cluster whose broker subscriptions end as soon as their last subscriber leaves,
/// plus extra env.
async fn node(cluster: &Cluster, extra: &[(&str, String)]) -> Node {
    let mut env = vec![("PUBGATE__BROKER__UNSUBSCRIBE_DELAY", "0s".to_string())];
    env.extend(extra.iter().cloned());
    let node = Node::redis("redis-cluster", &cluster.url(), &env).await;
    node.wait_ready(READY).await;
    node
}

/// Subscribes a wildcard and checks the ack.
async fn subscribe(ws: &mut Ws, pattern: &str) {
    let ack = ws.subscribe(pattern).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["topic"], pattern, "{ack}");
}

/// Publishes through `node` and returns the offset.
async fn publish(node: &Node, topic: &str, data: &Value) -> u64 {
    let (status, body) = node.publish(topic, &data.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("json reply");
    reply["offset"].as_u64().expect("offset")
}

/// Every frame but acks a client gets until `quiet` passes with nothing new; the `epoch` a
/// topic's first message names is left out (compared where it matters).
async fn drain(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(v) = ws.recv(quiet).await {
        if v["op"] != "ack" {
            got.push(without_epoch(v));
        }
    }
    got
}

/// A message frame without its `epoch` (which only an epoch's first message has).
fn without_epoch(mut v: Value) -> Value {
    if v["op"] == "message"
        && let Some(map) = v.as_object_mut()
    {
        map.remove("epoch");
    }
    v
}

/// Pattern subscriptions over these masters (`PUBSUB NUMPAT`).
fn numpat(nodes: &[Redis]) -> u64 {
    nodes
        .iter()
        .map(|n| {
            n.cli(&["PUBSUB", "NUMPAT"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

/// A CRC16 (XMODEM), the hash of Redis Cluster's key slots.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// `(offset, data)` per topic, in arrival order; panics on any frame that is not a message.
fn by_topic(frames: &[Value]) -> BTreeMap<String, Vec<(Value, Value)>> {
    let mut map: BTreeMap<String, Vec<(Value, Value)>> = BTreeMap::new();
    for f in frames {
        assert_eq!(f["op"], "message", "{f}");
        let topic = f["topic"].as_str().expect("topic").to_string();
        map.entry(topic)
            .or_default()
            .push((f["offset"].clone(), f["data"].clone()));
    }
    map
}

/// The master serving `key`'s slot.
fn master_of<'a>(cluster: &'a Cluster, key: &str) -> &'a Redis {
    let slot: u16 = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", key])
        .trim()
        .parse()
        .expect("slot");
    let nodes = cluster.nodes[0].cli(&["CLUSTER", "NODES"]);
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(port) = fields
            .get(1)
            .and_then(|a| a.split('@').next())
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
        else {
            continue;
        };
        let owns = fields.iter().skip(8).any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
        });
        if owns {
            return cluster
                .nodes
                .iter()
                .find(|n| n.port == port)
                .expect("a master of ours");
        }
    }
    panic!("no master serves slot {slot}:\n{nodes}");
}

/// The watch key of the slot of `topic`'s channel: the same slot as the topic's keys.
fn watch_key_of(cluster: &Cluster, topic: &str) -> String {
    let slot: u16 = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", &format!("pubgate:{{{topic}}}")])
        .trim()
        .parse()
        .expect("slot");
    assert_eq!(
        crc16(topic.as_bytes()) % 16384,
        slot,
        "CRC16 as Redis has it"
    );
    // The gateway tags slot s with the first base-36 number whose CRC16 slot is s.
    let tag = (0..1_000_000u32)
        .map(radix36)
        .find(|t| crc16(t.as_bytes()) % 16384 == slot)
        .expect("a tag");
    format!("pubgate:~watch:{{{tag}}}")
}

/// `n` in base 36, least significant digit first (how the gateway names its slot tags).
fn radix36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = String::new();
    loop {
        s.push(DIGITS[(n % 36) as usize] as char);
        n /= 36;
        if n == 0 {
            return s;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_get_exactly_their_topics_across_masters_and_nothing_else_reaches_the_node() {
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let serving = node(&cluster, &[]).await;
    let mut one_level = serving.ws().await;
    subscribe(&mut one_level, "a.*").await;
    let mut all = serving.ws().await;
    subscribe(&mut all, "a.>").await;
    // The watch is in Redis before the ack: in the slot of every topic, `a` has a live lease.
    let mut topics = Vec::new();
    for k in 0..8 {
        for topic in [
            format!("a.t{k}"),
            format!("a.t{k}.z"),
            format!("b.t{k}"),
            format!("ab.t{k}"),
            format!("b.a.t{k}"),
        ] {
            topics.push(topic);
        }
    }
    topics.push("a".to_string());
    let masters: BTreeSet<u16> = topics
        .iter()
        .map(|t| master_of(&cluster, &format!("pubgate:{{{t}}}")).port)
        .collect();
    assert_eq!(masters.len(), 3, "the topics spread over every master");
    let lease = cluster.cli(&["ZSCORE", &watch_key_of(&cluster, "a.t0"), "a"]);
    assert!(lease.trim().parse::<u64>().is_ok(), "no watch: {lease:?}");

    let before = serving.metric(RECEIVED).await.unwrap_or(0.0);
    let mut want_one: BTreeMap<String, Vec<(Value, Value)>> = BTreeMap::new();
    let mut want_all: BTreeMap<String, Vec<(Value, Value)>> = BTreeMap::new();
    for round in 0..3u64 {
        for topic in &topics {
            let data = json!({"topic": topic, "round": round});
            let offset = publish(&publisher, topic, &data).await;
            assert_eq!(offset, round + 1);
            let entry = (json!(offset), data);
            if let Some(rest) = topic.strip_prefix("a.") {
                want_all
                    .entry(topic.clone())
                    .or_default()
                    .push(entry.clone());
                if !rest.contains('.') {
                    want_one.entry(topic.clone()).or_default().push(entry);
                }
            }
        }
    }
    let got_one = drain(&mut one_level, Duration::from_secs(2)).await;
    let got_all = drain(&mut all, Duration::from_secs(1)).await;
    assert_eq!(by_topic(&got_one), want_one, "a.* got the wrong messages");
    assert_eq!(by_topic(&got_all), want_all, "a.> got the wrong messages");
    let below_a: usize = want_all.values().map(Vec::len).sum();
    assert_eq!(below_a, 48);
    let arrived = serving.metric(RECEIVED).await.unwrap_or(0.0) - before;
    assert_eq!(
        arrived, below_a as f64,
        "only the messages below `a` may reach the serving node's Redis connections"
    );

    // Raw SPUBLISHes do not pass the publish script: they reach no wildcard subscriber, unless
    // the node subscribes that topic by name anyway (then its subscribers of every kind get it).
    // A raw or forged message on a watch channel is refused.
    cluster.cli(&["SPUBLISH", "pubgate:{a.t0}", r#"{"raw":1}"#]);
    cluster.cli(&["PUBLISH", "pubgate:~w:a.t0", r#"{"raw":2}"#]);
    let forged = "pg1 0000 99 0123456789abcdef\n{\"forged\":1}";
    cluster.cli(&["PUBLISH", "pubgate:~w:a.t1", forged]);
    assert_eq!(
        drain(&mut all, Duration::from_secs(1)).await,
        Vec::<Value>::new()
    );
    assert_eq!(
        drain(&mut one_level, Duration::from_millis(200)).await,
        Vec::<Value>::new()
    );
    let mut exact = serving.ws().await;
    assert_eq!(exact.subscribe("a.t0").await["op"], "ack");
    cluster.cli(&["SPUBLISH", "pubgate:{a.t0}", r#"{"raw":3}"#]);
    let raw = [json!({"op":"message","topic":"a.t0","data":{"raw":3}})];
    assert_eq!(drain(&mut exact, Duration::from_secs(1)).await, raw);
    assert_eq!(drain(&mut all, Duration::from_millis(200)).await, raw);
    assert_eq!(drain(&mut one_level, Duration::from_millis(200)).await, raw);
    assert!(
        serving
            .metric(r#"pubgate_broker_rejected_total{reason="header"}"#)
            .await
            >= Some(1.0),
        "the raw watch-channel message is counted as refused"
    );

    // The last wildcard of the prefix gone, its pattern subscription is gone too.
    assert_eq!(all.unsubscribe("a.>").await["op"], "ack");
    assert_eq!(one_level.unsubscribe("a.*").await["op"], "ack");
    let numpat = || numpat(&cluster.nodes);
    assert!(
        eventually(Duration::from_secs(5), async || numpat() == 0).await,
        "PUBSUB NUMPAT stayed {}",
        numpat()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_subscribed_by_name_and_by_a_coming_and_going_wildcard_arrives_once_per_subscription()
 {
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let serving = node(&cluster, &[]).await;
    let topic = "c.x.y";
    let mut exact = serving.ws().await;
    assert_eq!(exact.subscribe(topic).await["op"], "ack");
    let mut wild = serving.ws().await;
    let mut want_exact = Vec::new();
    let mut n = 0u64;
    for round in 0..6 {
        subscribe(&mut wild, if round % 2 == 0 { "c.>" } else { "c.x.*" }).await;
        let mut want_wild = Vec::new();
        for _ in 0..5 {
            n += 1;
            let data = json!({"n": n});
            let offset = publish(&publisher, topic, &data).await;
            assert_eq!(offset, n);
            want_exact.push(json!({"op":"message","topic":topic,"offset":n,"data":data}));
            want_wild.push(want_exact[want_exact.len() - 1].clone());
        }
        let mut got = Vec::new();
        while got.last() != want_wild.last() {
            match wild.recv(Duration::from_secs(5)).await {
                Some(v) => got.push(without_epoch(v)),
                None => break,
            }
        }
        // A message published just before the ack may come too (docs/protocol.md): only right
        // before the wanted ones, in order.
        let first = want_wild[0]["offset"].as_u64().unwrap();
        let early = got
            .iter()
            .take_while(|v| v["offset"].as_u64().is_some_and(|o| o < first))
            .count();
        let early_offsets: Vec<u64> = got[..early]
            .iter()
            .map(|v| v["offset"].as_u64().unwrap())
            .collect();
        assert!(
            early_offsets
                .iter()
                .rev()
                .zip((1..first).rev())
                .all(|(a, b)| *a == b),
            "round {round}: early messages run up to the first wanted: {early_offsets:?}"
        );
        assert_eq!(
            got[early..],
            want_wild[..],
            "round {round}: the wildcard subscriber"
        );
        let pattern = if round % 2 == 0 { "c.>" } else { "c.x.*" };
        assert_eq!(wild.unsubscribe(pattern).await["op"], "ack");
        // Published while no wildcard covers the topic: the name subscription alone carries it.
        for _ in 0..3 {
            n += 1;
            let data = json!({"n": n});
            assert_eq!(publish(&publisher, topic, &data).await, n);
            want_exact.push(json!({"op":"message","topic":topic,"offset":n,"data":data}));
        }
    }
    let got = drain(&mut exact, Duration::from_secs(2)).await;
    assert_eq!(
        got, want_exact,
        "the name subscriber: every offset once, in order"
    );
    assert_eq!(
        drain(&mut wild, Duration::from_millis(300)).await,
        Vec::<Value>::new(),
        "nothing after the last unsubscribe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_watch_is_rewritten_and_what_it_missed_is_filled_from_history() {
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let refresh = [
        ("PUBGATE__BROKER__WATCH_REFRESH", "1s".to_string()),
        ("PUBGATE__BROKER__WATCH_LEASE", "10s".to_string()),
    ];
    let serving = node(&cluster, &refresh).await;
    let mut ws = serving.ws().await;
    subscribe(&mut ws, "d.>").await;
    let topic = "d.t0";
    let first = publish(&publisher, topic, &json!({"n": 1})).await;
    let m = ws.next_message(Duration::from_secs(5)).await.expect("live");
    assert_eq!(
        (m["offset"].as_u64(), &m["data"]),
        (Some(first), &json!({"n": 1}))
    );

    let key = watch_key_of(&cluster, topic);
    assert_eq!(
        cluster.cli(&["DEL", &key]).trim(),
        "1",
        "the watch key existed"
    );
    // Not watched in that slot now: these are not broadcast, and the node cannot see them.
    for n in 2..=4 {
        assert_eq!(publish(&publisher, topic, &json!({"n": n})).await, n);
    }
    // The next renewal finds `d` missing there, writes it back and fills the topic from history.
    let got: Vec<(Value, Value)> = {
        let mut got = Vec::new();
        while got.len() < 3 {
            let Some(m) = ws.next_message(Duration::from_secs(5)).await else {
                break;
            };
            got.push((m["offset"].clone(), m["data"].clone()));
        }
        got
    };
    assert_eq!(
        got,
        (2..=4)
            .map(|n| (json!(n), json!({"n": n})))
            .collect::<Vec<_>>(),
        "the missed messages, once, in order:\n{}",
        serving.log()
    );
    assert!(
        cluster
            .cli(&["ZSCORE", &key, "d"])
            .trim()
            .parse::<u64>()
            .is_ok(),
        "the watch is back"
    );
    assert_eq!(publish(&publisher, topic, &json!({"n": 5})).await, 5);
    let m = ws
        .next_message(Duration::from_secs(5))
        .await
        .expect("live again");
    assert_eq!(m["offset"], json!(5));
    assert_eq!(
        drain(&mut ws, Duration::from_millis(500)).await,
        Vec::<Value>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_without_data_gets_its_watches_back_and_the_loss_is_reported() {
    let mut cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    // No renewal within the test: the lost watch must be found by the node's probe.
    let renewal = [
        ("PUBGATE__BROKER__WATCH_REFRESH", "120s".to_string()),
        ("PUBGATE__BROKER__WATCH_LEASE", "300s".to_string()),
    ];
    let serving = node(&cluster, &renewal).await;
    let mut ws = serving.ws().await;
    subscribe(&mut ws, "r.>").await;
    let topic = "r.t0";
    for n in 1..=2 {
        assert_eq!(publish(&publisher, topic, &json!({"n": n})).await, n);
    }
    let got = drain(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(
        by_topic(&got)[topic],
        [(json!(1), json!({"n": 1})), (json!(2), json!({"n": 2}))]
    );

    // kill -9 and start again without data (no persistence); nodes.conf brings its slots back.
    let port = master_of(&cluster, &format!("pubgate:{{{topic}}}")).port;
    let master = cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == port)
        .expect("master");
    master.restart();
    let key = watch_key_of(&cluster, topic);
    assert!(
        eventually(Duration::from_secs(30), async || {
            cluster.nodes[0]
                .cli(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
                && cluster
                    .cli(&["ZSCORE", &key, "r"])
                    .trim()
                    .parse::<u64>()
                    .is_ok()
        })
        .await,
        "the node did not write its watch back:\n{}",
        serving.log()
    );
    // The topic's offsets are gone with the data: a new epoch, and the subscriber is told.
    let mut after = None;
    for _ in 0..50 {
        let (status, body) = publisher.publish(topic, r#"{"n":"after"}"#).await;
        if status == 200 {
            after = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after: Value =
        serde_json::from_str(&after.expect("publish after the restart")).expect("json");
    assert_eq!(
        after["offset"],
        json!(1),
        "a new epoch starts at 1: {after}"
    );
    let frames = drain(&mut ws, Duration::from_secs(3)).await;
    let messages: Vec<&Value> = frames.iter().filter(|f| f["op"] == "message").collect();
    assert_eq!(
        messages
            .iter()
            .map(|m| (m["offset"].clone(), m["data"].clone()))
            .collect::<Vec<_>>(),
        [(json!(1), json!({"n":"after"}))],
        "{frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| f["op"] == "gap" && f["topic"] == topic),
        "the lost epoch is reported as a gap: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_wildcards_cannot_make_a_node_write_unbounded_prefixes() {
    let cluster = Cluster::start(3);
    let env = [
        ("PUBGATE__LIMITS__MAX_WILDCARD_PATTERNS", "2".to_string()),
        ("PUBGATE__BROKER__WATCH_REFRESH", "1s".to_string()),
        ("PUBGATE__BROKER__WATCH_LEASE", "3s".to_string()),
    ];
    let serving = node(&cluster, &env).await;
    let mut ws = serving.ws().await;
    for pattern in ["p1.*", "p1.>", "p2.*"] {
        subscribe(&mut ws, pattern).await;
        assert_eq!(ws.unsubscribe(pattern).await["op"], "ack");
    }
    // `p1` and `p2` still hold a lease from this node: a third prefix would be a third write
    // into every slot, past limits.max_wildcard_patterns.
    let refused = ws.subscribe("p3.*").await;
    assert_eq!(refused["code"], "broker_unavailable", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("try again later")),
        "{refused}"
    );
    // Coming back to a leased prefix costs no new lease.
    subscribe(&mut ws, "p1.*").await;
    assert_eq!(ws.unsubscribe("p1.*").await["op"], "ack");
    // Once the leases end, a new prefix is welcome, and it works.
    let mut accepted = false;
    for _ in 0..40 {
        let reply = ws.subscribe("p3.*").await;
        if reply["op"] == "ack" {
            accepted = true;
            break;
        }
        assert_eq!(reply["code"], "broker_unavailable", "{reply}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(accepted, "p3.* still refused after the leases ended");
    let publisher = node(&cluster, &[]).await;
    assert_eq!(publish(&publisher, "p3.x", &json!({"ok": true})).await, 1);
    let m = ws.next_message(Duration::from_secs(5)).await.expect("p3.x");
    assert_eq!(
        (m["topic"].clone(), m["data"].clone()),
        (json!("p3.x"), json!({"ok": true}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_that_arrive_together_share_a_write_and_the_node_cap_holds() {
    // Each new prefix is a write into all 16,384 slots. Prefixes asked for while one is written
    // go together in the next pass, so a crowd of new wildcards does not queue pass after pass;
    // and `broker.watch_prefixes` bounds what one node makes the cluster hold.
    const PREFIXES: usize = 12;
    let cluster = Cluster::start(3);
    let env = [("PUBGATE__BROKER__WATCH_PREFIXES", PREFIXES.to_string())];
    let serving = node(&cluster, &env).await;
    let mut clients = Vec::new();
    for i in 0..PREFIXES {
        let mut ws = serving.ws().await;
        ws.send(json!({"op": "subscribe", "topic": format!("g{i}.*"), "id": 1}))
            .await;
        clients.push(ws);
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let ack = ws.recv(Duration::from_secs(30)).await.expect("a reply");
        assert_eq!(ack["op"], "ack", "g{i}.*: {ack}");
    }
    let passes = serving
        .log()
        .matches("wildcard watches written into every slot")
        .count();
    assert!(
        (1..PREFIXES).contains(&passes),
        "{PREFIXES} new prefixes took {passes} passes over the slots"
    );
    for i in [0, PREFIXES - 1] {
        assert!(
            cluster
                .cli(&[
                    "ZSCORE",
                    &watch_key_of(&cluster, &format!("g{i}.x")),
                    &format!("g{i}")
                ])
                .trim()
                .parse::<u64>()
                .is_ok(),
            "g{i} is watched"
        );
    }
    let refused = clients[0].subscribe("over.*").await;
    assert_eq!(refused["code"], "broker_unavailable", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_without_a_literal_prefix_watches_the_root_and_matches_in_the_node() {
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let serving = node(&cluster, &[]).await;
    let mut ws = serving.ws().await;
    subscribe(&mut ws, "*.x").await;
    assert!(
        cluster
            .cli(&["ZSCORE", &watch_key_of(&cluster, "q.x"), ""])
            .trim()
            .parse::<u64>()
            .is_ok(),
        "the root prefix is watched"
    );
    let mut want: BTreeMap<String, Vec<(Value, Value)>> = BTreeMap::new();
    for topic in ["q.x", "r.x", "r.y", "q.r.x", "x", "xx.x"] {
        let data = json!({ "t": topic });
        let offset = publish(&publisher, topic, &data).await;
        if topic.ends_with(".x") && topic.matches('.').count() == 1 {
            want.entry(topic.to_string())
                .or_default()
                .push((json!(offset), data));
        }
    }
    let got = drain(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(by_topic(&got), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_wildcard_gets_what_follows_its_ack_not_what_came_before() {
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let serving = node(&cluster, &[]).await;
    publish(&publisher, "q.old", &json!({"n": 1})).await;
    let mut ws = serving.ws().await;
    subscribe(&mut ws, "q.*").await;
    let live = publish(&publisher, "q.old", &json!({"n": 2})).await;
    let got = drain(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(
        got,
        vec![json!({"op": "message", "topic": "q.old", "offset": live, "data": {"n": 2}})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_resume_on_a_cluster_says_not_recovered_and_goes_on_live() {
    // A cluster keeps no topic directory (its sets would span every slot): a resume cannot know
    // which topics changed while the client was away, so it must say so rather than replay a part.
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let serving = node(&cluster, &[]).await;
    let mut ws = serving.ws().await;
    let ack = ws.subscribe("r.*").await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let time = ack["time"].as_u64().expect("a wildcard ack has a time");
    let first = publish(&publisher, "r.seen", &json!({"n": 1})).await;
    let got = drain(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    ws.close().await;
    // Away for good: the node no longer serves the pattern (else a message published now could
    // still reach the new connection live, as one published just before an ack may).
    assert!(
        eventually(Duration::from_secs(10), async || {
            serving.metric("pubgate_wildcards").await == Some(0.0)
        })
        .await,
        "the node dropped the pattern"
    );
    let numpat = || numpat(&cluster.nodes);
    assert!(
        eventually(Duration::from_secs(5), async || numpat() == 0).await,
        "PUBSUB NUMPAT stayed {}",
        numpat()
    );

    publish(&publisher, "r.seen", &json!({"n": 2})).await;
    publish(&publisher, "r.unseen", &json!({"n": 1})).await;
    let mut ws = serving.ws().await;
    ws.send(
        json!({"op": "subscribe", "topic": "r.*", "id": 7, "since": {
        "time": time, "topics": {"r.seen": {"epoch": "0", "offset": first}}}}),
    )
    .await;
    let ack = ws.recv(Duration::from_secs(10)).await.expect("an ack");
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["id"], 7, "{ack}");
    assert_eq!(ack["recovered"], false, "{ack}");
    assert!(ack["time"].as_u64().is_some_and(|t| t >= time), "{ack}");
    let live = publish(&publisher, "r.unseen", &json!({"n": 2})).await;
    let got = drain(&mut ws, Duration::from_secs(2)).await;
    // Nothing is replayed; messages published just before the ack may still arrive live (a watch
    // copy crosses the cluster bus), each once and in order, and the live one follows.
    let topics = by_topic(&got);
    for (topic, messages) in &topics {
        let offsets: Vec<u64> = messages.iter().map(|(o, _)| o.as_u64().unwrap()).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{topic}: {offsets:?}"
        );
    }
    assert_eq!(
        topics["r.unseen"].last(),
        Some(&(json!(live), json!({"n": 2}))),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_whose_watch_cannot_be_written_is_refused_and_leaves_nothing_subscribed() {
    let mut cluster = Cluster::start(3);
    let serving = node(&cluster, &[]).await;
    // A master gone for good: its slots cannot take the watch.
    cluster.nodes[2].stop();
    assert!(
        eventually(Duration::from_secs(15), async || cluster.nodes[0]
            .cli(&["CLUSTER", "INFO"])
            .contains("cluster_state:fail"))
        .await,
        "the cluster did not notice the dead master"
    );
    let mut ws = serving.ws().await;
    let refused = ws.subscribe("z.*").await;
    assert_eq!(refused["code"], "broker_unavailable", "{refused}");
    // Only the masters still up can be asked.
    let numpat = || numpat(&cluster.nodes[..2]);
    assert!(
        eventually(Duration::from_secs(5), async || numpat() == 0).await,
        "a refused wildcard left {} pattern subscriptions",
        numpat()
    );
    // The connection is still usable.
    assert_eq!(ws.unsubscribe("z.*").await["code"], "not_subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_set_redis_cannot_read_fails_the_publish_without_side_effects() {
    // The watch is checked before the offset is taken: a publish that fails on it leaves nothing
    // behind, so the publisher's retry does not publish the message twice.
    let cluster = Cluster::start(3);
    let publisher = node(&cluster, &[]).await;
    let key = watch_key_of(&cluster, "wt.a");
    let master = master_of(&cluster, &key);
    master.cli(&["DEL", &key]);
    master.cli(&["SET", &key, "not a sorted set"]);
    let (status, body) = publisher.publish("wt.a", r#"{"n":1}"#).await;
    assert_ne!(status, 200, "{body}");
    let offset_key = "pubgate:{wt.a}:offset";
    let offset = master_of(&cluster, offset_key).cli(&["GET", offset_key]);
    assert!(
        matches!(offset.trim(), "" | "0"),
        "no offset taken: {offset:?}"
    );
    master.cli(&["DEL", &key]);
    assert_eq!(publish(&publisher, "wt.a", &json!({"n": 1})).await, 1);
}
