//! Redis misbehaving under a live node, and what a client is told: a restart from an older snapshot
//! (rollback), a restart without data, an outage that leaves the node's command connections stale,
//! a node that falls behind Redis, forged gateway headers from a raw publisher, reads of made-up
//! topics, and a client churning its subscriptions. Each test asserts exactly which messages
//! arrived (offsets and data), what the client was told instead, or exact metric values.
//!
//! Needs `redis-server` on PATH.

mod common;
mod redis_support;

use std::time::Duration;

use redis_support::history::{READY, WAIT, expect_silence, publish, redis_node, resume};
use redis_support::{Frame, Node, Redis, Ws, eventually};
use serde_json::{Value, json};

/// The next frame, which must be JSON.
async fn next_json(ws: &mut Ws, what: &str) -> Value {
    match ws.next_frame(WAIT).await {
        Frame::Json(v) => v,
        other => panic!("{what}: {other:?}"),
    }
}

/// Reads `n` message frames and returns `(offset, data)` of each (any other frame fails).
async fn messages(ws: &mut Ws, n: usize, what: &str) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = next_json(ws, what).await;
        assert_eq!(m["op"], "message", "{what}: {m}");
        got.push((m["offset"].as_u64().expect("offset"), m["data"].clone()));
    }
    got
}

fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Value)> {
    range.map(|i| (i, json!({ "n": i }))).collect()
}

/// Subscribes a fresh client and publishes `1..=n` through `via`; the client gets them all.
/// Returns the client and the topic's epoch (named by message 1).
async fn live_client(node: &Node, via: &Node, topic: &str, n: u64) -> (Ws, String) {
    let mut ws = node.ws().await;
    assert_eq!(ws.subscribe(topic).await["op"], "ack");
    for i in 1..=n {
        assert_eq!(publish(via, topic, &json!({ "n": i }).to_string()).await, i);
    }
    let first = next_json(&mut ws, "message 1").await;
    let epoch = first["epoch"].as_str().expect("message 1 names the epoch");
    assert_eq!(
        messages(&mut ws, n as usize - 1, "live").await,
        numbered(2..=n)
    );
    (ws, epoch.to_string())
}

/// Redis restarts from a snapshot older than what clients saw. Before, offsets 6..8 were handed
/// out again in the same epoch: the live client dropped them as duplicates and a resume from 5
/// answered `recovered:true` with the wrong messages. Now the rollback starts a new epoch: the live
/// client is told of the gap and gets the new stream, and resumes answer `recovered:false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_an_older_snapshot_starts_a_new_epoch_and_says_so() {
    let mut redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "rollback.rdb";
    let (mut ws, epoch) = live_client(&node, &node, topic, 5).await;
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");
    for i in 6..=8 {
        assert_eq!(
            publish(&node, topic, &json!({ "n": i }).to_string()).await,
            i
        );
    }
    assert_eq!(
        messages(&mut ws, 3, "after the snapshot").await,
        numbered(6..=8)
    );

    // Killed (what SHUTDOWN NOSAVE leaves): it comes back from the snapshot, at offset 5.
    redis.restart();
    assert!(
        redis
            .cli(&["GET", &format!("pubgate:{topic}:epoch")])
            .starts_with(&epoch)
    );
    assert_eq!(
        redis
            .cli(&["GET", &format!("pubgate:{topic}:offset")])
            .trim(),
        "5"
    );
    node.wait_ready(READY).await;

    let gap = next_json(&mut ws, "gap after the rollback").await;
    assert_eq!(gap["op"], "gap", "{gap}");
    assert_eq!(gap["topic"], topic, "{gap}");
    let new_epoch = gap["epoch"].as_str().expect("gap epoch").to_string();
    assert_ne!(new_epoch, epoch, "{gap}");
    assert_eq!(gap["offset"], json!(0), "{gap}");

    let (status, body) = node.publish(topic, r#"{"n":9}"#).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("reply");
    assert_eq!(
        (&reply["epoch"], &reply["offset"]),
        (&json!(new_epoch), &json!(1))
    );
    let m = next_json(&mut ws, "the new stream").await;
    assert_eq!(
        (&m["op"], &m["epoch"], &m["offset"], &m["data"]),
        (
            &json!("message"),
            &json!(new_epoch),
            &json!(1),
            &json!({"n": 9})
        )
    );

    // Whoever saw 6..8 (or only 5) cannot resume silently.
    for since in [8, 5] {
        let mut late = node.ws().await;
        let ack = resume(&mut late, topic, &epoch, since).await;
        assert_eq!(
            (&ack["recovered"], &ack["epoch"], &ack["offset"]),
            (&json!(false), &json!(new_epoch), &json!(1)),
            "since {since}: {ack}"
        );
        expect_silence(&mut late, "nothing replayed").await;
    }
    assert_eq!(node.metric("pubgate_broker_gaps_total").await, Some(1.0));
}

/// Redis restarts empty (no persistence, or `SHUTDOWN NOSAVE` without a snapshot): the live client
/// is told of the gap, then gets the new epoch from offset 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_data_is_a_gap_then_a_fresh_stream() {
    let mut redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "rollback.empty";
    let (mut ws, epoch) = live_client(&node, &node, topic, 3).await;
    redis.restart();
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0");
    node.wait_ready(READY).await;
    let gap = next_json(&mut ws, "gap after the restart").await;
    assert_eq!(
        (&gap["op"], &gap["topic"], &gap["offset"]),
        (&json!("gap"), &json!(topic), &json!(0)),
        "{gap}"
    );
    assert_ne!(gap["epoch"], json!(epoch), "{gap}");
    assert_eq!(publish(&node, topic, r#"{"n":"new"}"#).await, 1);
    let m = next_json(&mut ws, "new stream").await;
    assert_eq!(
        (&m["offset"], &m["data"]),
        (&json!(1), &json!({"n": "new"})),
        "{m}"
    );
    assert_ne!(m["epoch"], json!(epoch), "{m}");
    assert_eq!(node.metric("pubgate_broker_gaps_total").await, Some(1.0));
}

/// A node on Redis as its own ACL user `nodea`, ready, so a test can cut it off alone.
async fn node_as_own_user(redis: &Redis) -> Node {
    redis.cli(&["ACL", "SETUSER", "nodea", "on", ">pa", "~*", "&*", "+@all"]);
    let url = format!("redis://nodea:pa@127.0.0.1:{}", redis.port);
    let node = Node::redis("redis", &url, &[]).await;
    node.wait_ready(READY).await;
    node
}

/// Cuts `node` (see [`node_as_own_user`]) off from Redis: its user may not log in, its connections
/// are killed; returns once the node noticed. `ACL SETUSER nodea on` lets it back.
async fn cut_off(redis: &Redis, node: &Node) {
    redis.cli(&["ACL", "SETUSER", "nodea", "off"]);
    redis.cli(&["CLIENT", "KILL", "USER", "nodea"]);
    assert!(
        eventually(Duration::from_secs(10), async || !node.is_ready().await).await,
        "the node notices the outage"
    );
}

/// Node A is cut off from Redis (its ACL user disabled and its connections killed) while node B
/// keeps publishing. When A may connect again, its first commands run into connections that died
/// during the outage; the gap fill retries until history answers, and A's client gets exactly
/// the messages it missed, with no gap reported. Before, the first failed read counted a gap and
/// the messages were never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_fill_retries_until_history_answers() {
    let redis = Redis::start();
    let a = node_as_own_user(&redis).await;
    let b = redis_node(&redis, &[]).await;
    let topic = "outage.fill";
    let (mut ws, _) = live_client(&a, &b, topic, 3).await;

    cut_off(&redis, &a).await;
    for i in 4..=40 {
        assert_eq!(publish(&b, topic, &json!({ "n": i }).to_string()).await, i);
    }
    redis.cli(&["ACL", "SETUSER", "nodea", "on"]);
    a.wait_ready(READY).await;
    assert_eq!(
        messages(&mut ws, 37, "filled from history").await,
        numbered(4..=40),
        "log:\n{}",
        a.log()
    );
    assert_eq!(publish(&b, topic, r#"{"n":41}"#).await, 41);
    assert_eq!(messages(&mut ws, 1, "live again").await, numbered(41..=41));
    assert_eq!(a.metric("pubgate_broker_gaps_total").await, Some(0.0));
}

/// Node A stops (SIGSTOP) while node B publishes 400 messages; when A goes on, Redis's pushes
/// arrive in a burst far larger than A's backlog (8 messages). A drops what does not fit, refills
/// the topic from history (400 fit in half a send queue), and its client gets exactly 1..400 in
/// order; the backlog is empty afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_falls_behind_refills_from_history_instead_of_growing() {
    let redis = Redis::start();
    let a = redis_node(&redis, &[("PUBGATE__BROKER__BACKLOG_MESSAGES", "8".into())]).await;
    let b = redis_node(&redis, &[]).await;
    let topic = "burst";
    let mut ws = a.ws().await;
    assert_eq!(ws.subscribe(topic).await["op"], "ack");
    let pid = a.pid().expect("pid") as i32;
    // SAFETY: signalling our own child process by its PID.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let batch: Vec<Value> = (1..=400u64)
        .map(|i| json!({"topic": topic, "data": {"n": i}}))
        .collect();
    let (status, body) = redis_support::http(
        b.addr,
        "POST",
        "/v1/publish",
        &json!({ "messages": batch }).to_string(),
    )
    .await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(status, 200, "{body}");
    let got = messages(&mut ws, 400, "after the burst").await;
    assert_eq!(got, numbered(1..=400), "log:\n{}", a.log());
    let overflows = a
        .metric("pubgate_broker_backlog_overflows_total")
        .await
        .expect("metric");
    assert!(
        overflows >= 1.0,
        "the burst overflowed the backlog: {overflows}"
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            a.metric("pubgate_broker_backlog").await == Some(0.0)
        })
        .await
    );
    assert_eq!(a.metric("pubgate_broker_gaps_total").await, Some(0.0));
}

/// A raw publisher imitates the gateway's header: a wrong tag, a tag-less header, data that is not
/// JSON. None of it is delivered, none of it moves the topic's position (the real next message
/// still arrives), and each is counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gateway_headers_are_dropped_and_move_nothing() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "forged";
    let (mut ws, epoch) = live_client(&node, &node, topic, 2).await;
    let channel = format!("pubgate:{topic}");
    for payload in [
        format!("pg1 {epoch} 3 0123456789abcdef\n{{\"forged\":3}}"),
        format!("pg1 {epoch} 999999 0123456789abcdef\n{{\"forged\":999999}}"),
        format!("pg1 {epoch} 3\n{{\"old\":\"no tag\"}}"),
        format!("pg1 {epoch} 3 0123456789abcdef\nnot json"),
        format!("pg1 {epoch} 3 0123456789abcdef\n\"\u{fffd}"),
    ] {
        assert_eq!(redis.cli(&["PUBLISH", &channel, &payload]).trim(), "1");
    }
    // A raw message that is not JSON is still delivered, as a JSON string.
    redis.cli(&["PUBLISH", &channel, "plain text"]);
    let m = next_json(&mut ws, "raw text").await;
    assert_eq!(
        (&m["data"], m.get("offset")),
        (&json!("plain text"), None),
        "{m}"
    );
    assert_eq!(publish(&node, topic, r#"{"n":3}"#).await, 3);
    assert_eq!(messages(&mut ws, 1, "the real 3").await, numbered(3..=3));
    for (reason, n) in [("forged", 2.0), ("header", 1.0), ("data", 2.0)] {
        assert_eq!(
            node.metric(&format!(
                "pubgate_broker_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await,
            Some(n),
            "{reason}"
        );
    }
}

/// Subscribing to, unsubscribing from and reading the history of made-up topics leaves no key in
/// Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_made_up_topics_create_no_keys() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    assert_eq!(publish(&node, "real", "1").await, 1);
    let before = redis.cli(&["DBSIZE"]);
    assert_eq!(
        before.trim(),
        "5",
        "epoch, offset and history of the real topic, and the topic directory's two sets"
    );
    let mut ws = node.ws().await;
    for i in 0..50 {
        let topic = format!("scan.{i}");
        let ack = ws.subscribe(&topic).await;
        assert_eq!(
            (&ack["epoch"], &ack["offset"]),
            (&json!("0"), &json!(0)),
            "{ack}"
        );
        let (status, body) =
            redis_support::http(node.addr, "GET", &format!("/v1/history/made.up.{i}"), "").await;
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).expect("page");
        assert_eq!(
            (&page["epoch"], &page["offset"]),
            (&json!("0"), &json!(0)),
            "{page}"
        );
        let mut resumer = node.ws().await;
        let ack = resume(&mut resumer, &format!("resume.{i}"), "deadbeef", 7).await;
        assert_eq!(ack["recovered"], json!(false), "{ack}");
        resumer.close().await;
    }
    ws.close().await;
    assert_eq!(redis.cli(&["DBSIZE"]), before);
    // A subscriber acknowledged before the first message resumes from the topic's start.
    let mut early = node.ws().await;
    assert_eq!(early.subscribe("later").await["epoch"], json!("0"));
    early.close().await;
    for i in 1..=3 {
        publish(&node, "later", &json!({ "n": i }).to_string()).await;
    }
    let mut back = node.ws().await;
    let ack = resume(&mut back, "later", "0", 0).await;
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    assert_eq!(
        messages(&mut back, 3, "from the start").await,
        numbered(1..=3)
    );
}

/// A client pipelines unsubscribe + subscribe of one topic thousands of times on node A while a
/// victim on A reads another topic. Redis's unsubscribe confirmations race the new subscribes; the
/// node must not take them for dropped subscriptions: its subscription connection is never
/// rebuilt, and the victim gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_churn_of_one_client_never_rebuilds_the_node_link() {
    let redis = Redis::start();
    let a = redis_node(&redis, &[]).await;
    let mut victim = a.ws().await;
    assert_eq!(victim.subscribe("victim").await["op"], "ack");
    let mut churner = a.ws().await;
    let publisher = {
        let addr = a.addr;
        tokio::spawn(async move {
            for i in 1..=300u64 {
                let (status, body) = redis_support::http(
                    addr,
                    "POST",
                    "/v1/publish/victim",
                    &json!({ "n": i }).to_string(),
                )
                .await;
                assert_eq!(status, 200, "{body}");
            }
        })
    };
    for round in 0..1500u64 {
        churner
            .send(json!({"op":"subscribe","topic":"churn","id":round * 2}))
            .await;
        churner
            .send(json!({"op":"unsubscribe","topic":"churn","id":round * 2 + 1}))
            .await;
    }
    publisher.await.expect("publisher");
    assert_eq!(
        messages(&mut victim, 300, "victim").await,
        numbered(1..=300),
        "log:\n{}",
        a.log()
    );
    assert_eq!(a.metric("pubgate_broker_reconnects_total").await, Some(0.0));
    assert!(a.is_ready().await);
}

/// Stops node A (SIGSTOP) while `burst` runs against Redis, then lets it go on.
async fn while_stopped(node: &Node, burst: impl AsyncFnOnce()) {
    let pid = node.pid().expect("pid") as i32;
    // SAFETY: signalling our own child process by its PID.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    burst().await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

/// Raw messages have no offsets and are never in history: when a node that fell behind drops some,
/// its subscribers are told with a gap frame at their current position (before, the frame was
/// suppressed because that position had not moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_messages_dropped_from_a_full_backlog_are_signalled_as_a_gap() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[("PUBGATE__BROKER__BACKLOG_MESSAGES", "8".into())]).await;
    let topic = "raw.loss";
    let (mut ws, epoch) = live_client(&node, &node, topic, 1).await;
    while_stopped(&node, async || {
        let script =
            "for i = 1, 400 do redis.call('PUBLISH', KEYS[1], '{\"raw\":' .. i .. '}') end";
        redis.cli(&["EVAL", script, "1", &format!("pubgate:{topic}")]);
    })
    .await;
    let mut raw = 0;
    let gap = loop {
        let v = next_json(&mut ws, "raw burst").await;
        match v["op"].as_str() {
            Some("message") => raw += 1,
            Some("gap") => break v,
            _ => panic!("unexpected {v}"),
        }
    };
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":epoch,"offset":1})
    );
    assert!(raw < 400, "some were dropped: {raw}");
    assert_eq!(node.metric("pubgate_broker_gaps_total").await, Some(1.0));
}

/// A raw publish nested deeper than `limits.max_json_depth` never reaches clients (their parsers
/// would fail on it); one at the limit does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_publish_nested_too_deep_is_dropped() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "raw.deep";
    let mut ws = node.ws().await;
    assert_eq!(ws.subscribe(topic).await["op"], "ack");
    let channel = format!("pubgate:{topic}");
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // 126: the frame adds a level, and this test's own parser (serde_json) stops at 128.
    for n in [129, 30_000, 126] {
        redis.cli(&["PUBLISH", &channel, &nested(n)]);
    }
    let m = next_json(&mut ws, "one within the limit").await;
    assert_eq!(m["data"].to_string(), nested(126));
    expect_silence(&mut ws, "nothing else").await;
    assert_eq!(
        node.metric("pubgate_broker_messages_dropped_total{reason=\"too_deep\"}")
            .await,
        Some(2.0)
    );
}

/// A node cut off from Redis misses more than half a send queue (600 messages > 512): pushing the
/// whole fill at once closed every subscriber as a slow consumer. Now they get a gap frame, and a
/// resume from history gives them exactly what they missed, paced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_larger_than_half_a_send_queue_is_resumed_by_the_clients() {
    let redis = Redis::start();
    let a = node_as_own_user(&redis).await;
    let b = redis_node(&redis, &[]).await;
    let topic = "outage.big";
    let (mut ws, epoch) = live_client(&a, &b, topic, 3).await;
    cut_off(&redis, &a).await;
    let batch: Vec<Value> = (4..=603u64)
        .map(|i| json!({"topic": topic, "data": {"n": i}}))
        .collect();
    let (status, body) = redis_support::http(
        b.addr,
        "POST",
        "/v1/publish",
        &json!({ "messages": batch }).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    redis.cli(&["ACL", "SETUSER", "nodea", "on"]);
    a.wait_ready(READY).await;
    let gap = next_json(&mut ws, "gap instead of a flood").await;
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":epoch,"offset":603})
    );
    ws.send(json!({"op":"unsubscribe","topic":topic,"id":"u"}))
        .await;
    assert_eq!(next_json(&mut ws, "unsubscribe ack").await["op"], "ack");
    let ack = resume(&mut ws, topic, &epoch, 3).await;
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    assert_eq!(messages(&mut ws, 600, "resumed").await, numbered(4..=603));
    assert_eq!(
        a.metric("pubgate_slow_consumer_disconnects_total").await,
        Some(0.0)
    );
    assert_eq!(
        a.metric("pubgate_broker_gaps_total").await,
        Some(0.0),
        "nothing was lost"
    );
}

/// After Redis restarts, the node's reads connection is dead until something uses it; the first
/// `GET /v1/history` once the node is ready again must not be the one that finds out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_history_read_after_a_redis_restart_works() {
    let mut redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    assert_eq!(publish(&node, "after.restart", "1").await, 1);
    let (status, _) = redis_support::http(node.addr, "GET", "/v1/history/after.restart", "").await;
    assert_eq!(status, 200);
    redis.restart();
    node.wait_ready(READY).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) =
        redis_support::http(node.addr, "GET", "/v1/history/after.restart", "").await;
    assert_eq!(status, 200, "{body}");
}

/// A master that was partitioned away and is failed back to (it resyncs from the interim master,
/// then is promoted again) keeps its `run_id` but has an older dataset. Its offsets must not be
/// reused in the old epoch: `master_replid` changed, so the topic starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_to_an_older_dataset_starts_a_new_epoch() {
    failback_starts_a_new_epoch(None).await;
}

/// The same failback while a replica of A announces itself as `master_replid:0`: A's `INFO
/// replication` lists its replicas (`slave0:ip=…`) before its own `master_replid:` line, so a
/// lookup that takes the first `master_replid:` anywhere in the text reads the replica's made-up
/// value, which never changes, and the failback reuses offsets silently (hostile review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_announcing_a_made_up_field_cannot_hide_a_failback() {
    failback_starts_a_new_epoch(Some("master_replid:0")).await;
}

/// The same with a line break in the announced address, so the made-up field starts a line of its
/// own (any client allowed `REPLCONF` can announce that much; hostile review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_announcing_a_made_up_line_cannot_hide_a_failback() {
    failback_starts_a_new_epoch(Some("127.0.0.1\r\nmaster_replid:0")).await;
}

async fn failback_starts_a_new_epoch(rigged_announce_ip: Option<&str>) {
    let a = Redis::start();
    let b = Redis::start();
    let _rigged = rigged_announce_ip.map(|ip| {
        let port = a.port.to_string();
        let rigged = Redis::start_with(None, &["--replicaof", "127.0.0.1", &port]);
        rigged.cli(&["CONFIG", "SET", "replica-announce-ip", ip]);
        // It reconnects, announcing itself anew.
        a.cli(&["CLIENT", "KILL", "TYPE", "replica"]);
        rigged
    });
    // Whether A lists the rigged replica (there is none to wait for without one).
    let rigged_listed = async |wait: u64| match rigged_announce_ip {
        Some(ip) => {
            eventually(Duration::from_secs(wait), async || {
                a.cli(&["INFO", "replication"])
                    .contains(&format!("ip={ip},"))
            })
            .await
        }
        None => true,
    };
    assert!(rigged_listed(10).await, "the rigged replica is listed");
    let node = redis_node(&a, &[]).await;
    let topic = "failback";
    let offset_key = format!("pubgate:{topic}:offset");
    // B replicates A from the start, as in any replicated setup.
    b.cli(&["REPLICAOF", "127.0.0.1", &a.port.to_string()]);
    assert!(
        eventually(Duration::from_secs(10), async || b
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up"))
        .await
    );
    for i in 1..=8 {
        publish(&node, topic, &json!({ "n": i }).to_string()).await;
    }
    assert!(
        eventually(Duration::from_secs(10), async || b
            .cli(&["GET", &offset_key])
            .trim()
            == "8")
        .await
    );
    // A partition: B is promoted while A goes on taking writes.
    b.cli(&["REPLICAOF", "NO", "ONE"]);
    let before = publish(&node, topic, r#"{"n":9}"#).await;
    assert_eq!(before, 9);
    let (_, body) = node.publish(topic, r#"{"n":10}"#).await;
    let old_epoch = serde_json::from_str::<Value>(&body).expect("reply")["epoch"].clone();
    // A follows B (full resync: back to offset 8), then is promoted again.
    a.cli(&["REPLICAOF", "127.0.0.1", &b.port.to_string()]);
    assert!(
        eventually(Duration::from_secs(10), async || a
            .cli(&["GET", &offset_key])
            .trim()
            == "8")
        .await
    );
    a.cli(&["REPLICAOF", "NO", "ONE"]);
    // The rigged replica, dropped by A's resync, is back and listed before A's own field.
    assert!(
        rigged_listed(20).await,
        "the rigged replica is listed again"
    );
    node.wait_ready(READY).await;
    let mut reply = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), async || {
            let (status, body) = node.publish(topic, r#"{"n":"new"}"#).await;
            reply = serde_json::from_str(&body).unwrap_or(Value::Null);
            status == 200
        })
        .await,
        "publishing works after the failback"
    );
    assert_eq!(reply["offset"], json!(1), "{reply}");
    assert_ne!(reply["epoch"], old_epoch, "{reply}");
}
