//! Gap frames: what a subscriber is told when messages it should have had are gone for good.
//!
//! - Redis loses a topic (`FLUSHALL`) under a live subscriber: the next message starts a new
//!   epoch, and the subscriber gets `{"op":"gap",…}` for that epoch right before it.
//! - Redis is flushed again and again, its subscription connections killed around it, with history
//!   off: a wildcard subscriber gets the same frames of each topic as the topic's own subscriber,
//!   gap frames included.
//! - Redis is flushed during a wildcard resume's replay: per topic, the resumed client never gets
//!   a message of an epoch it was moved past, nor one message twice.
//! - History is trimmed under a resume's replay (the client reads slowly while the topic moves
//!   on): the client gets the replay as far as history held it, then a gap frame, then live
//!   messages, on the memory broker and on Redis.
//!
//! Needs `redis-server` on PATH.

mod common;
mod redis_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{RawWs, op};
use redis_support::faults::*;
use redis_support::history::{WAIT, expect_silence, memory_node, publish, redis_node};
use redis_support::{Node, Redis, Ws};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscriber_is_told_of_a_new_epoch_with_a_gap_frame() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "gap.flush";
    let mut ws = node.ws().await;
    let ack = ws.subscribe(topic).await;
    assert_eq!(ack["offset"], json!(0));
    for i in 1..=5 {
        assert_eq!(publish(&node, topic, &json!({"n": i}).to_string()).await, i);
    }
    for i in 1..=5u64 {
        let m = ws.next_message(WAIT).await.expect("message");
        assert_eq!(m["offset"], json!(i));
    }
    // Redis loses everything: the topic's next message starts a new epoch at offset 1.
    redis.cli(&["FLUSHALL"]);
    let (status, body) = node.publish(topic, r#"{"after":"flush"}"#).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("publish reply");
    assert_eq!(reply["offset"], json!(1));
    assert_ne!(reply["epoch"], ack["epoch"], "a new epoch");
    let gap = ws.recv(WAIT).await.expect("gap frame");
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":reply["epoch"],"offset":0}),
        "offsets 1.. of the new epoch follow; whatever came before may be lost"
    );
    let m = ws
        .next_message(WAIT)
        .await
        .expect("message of the new epoch");
    assert_eq!(
        (&m["offset"], &m["data"]),
        (&json!(1), &json!({"after":"flush"}))
    );
    expect_silence(&mut ws, "after the new epoch's first message").await;
    assert_eq!(metric(&node, "pubgate_gaps_signalled_total").await, 1.0);
}

/// Frames of `topic` (messages and gaps) a client receives until the message `{"end":true}` of
/// each of `topics`, with message data and the epoch they name.
async fn frames_until_the_end(ws: &mut Ws, topics: &[&str]) -> Vec<Value> {
    let mut got = Vec::new();
    let mut ended = 0;
    while ended < topics.len() {
        let f = ws.recv(WAIT).await.unwrap_or_else(|| {
            panic!(
                "the end markers of {topics:?} did not arrive; got {} frames, the last {:?}",
                got.len(),
                &got[got.len().saturating_sub(6)..]
            )
        });
        if f["op"] == "message" && f["data"] == json!({"end": true}) {
            ended += 1;
        }
        if f["op"] == "message" || f["op"] == "gap" {
            got.push(f);
        }
    }
    got
}

/// What the broker path does under repeated `FLUSHALL`s (each a new epoch per topic) and killed
/// subscription connections, with history off (nothing fills a hole): the node's wildcard
/// subscriber must learn each epoch change from a gap frame exactly where the topic's own
/// subscriber does, since its messages name their epoch only at offset 1. (Before the fix, a
/// message of the old epoch that arrived after the broker's "topic is empty" signal reached
/// wildcard subscribers without the gap frame in front of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_flushes_a_wildcard_subscriber_gets_the_same_frames_as_the_topics_own() {
    let redis = Redis::start();
    let env = [
        ("PUBGATE__HISTORY__SIZE", "0".to_string()),
        ("PUBGATE__LIMITS__SEND_QUEUE_FRAMES", "65536".to_string()),
    ];
    let node = redis_node(&redis, &env).await;
    let topics = ["wf.a", "wf.b"];
    let mut own = Vec::new();
    for t in topics {
        let mut ws = node.ws().await;
        assert_eq!(ws.subscribe(t).await["op"], "ack");
        own.push(ws);
    }
    let mut wild = node.ws().await;
    assert_eq!(wild.subscribe("wf.*").await["op"], "ack");

    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for k in 0..4u64 {
        let (addr, stop) = (node.addr, stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 3000 {
                let topic = topics[(sent % 2) as usize];
                let body = json!({"k": k, "i": sent}).to_string();
                let (status, reply) =
                    redis_support::http(addr, "POST", &format!("/v1/publish/{topic}"), &body).await;
                assert_eq!(status, 200, "publish {k}/{sent}: {reply}");
                sent += 1;
            }
            sent
        }));
    }
    // Flushes, half of them with the subscription connections killed just before or after.
    for round in 0..16 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if round % 4 == 1 {
            redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
        redis.cli(&["FLUSHALL"]);
        if round % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(round * 3)).await;
            redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut published = 0;
    for p in publishers {
        published += p.await.expect("publisher");
    }
    assert!(published > 100, "only {published} publishes");
    // The end markers go out once the node subscribes again (published while its subscription
    // connection is down, with history off, they would be lost, and signalled with gap frames).
    let back = redis_support::eventually(Duration::from_secs(10), async || {
        topics
            .iter()
            .all(|t| numsub(&redis, &format!("pubgate:{t}")) == 1)
            && redis.cli(&["PUBSUB", "NUMPAT"]).trim() == "1"
    })
    .await;
    assert!(back, "the node did not subscribe again");
    for t in topics {
        publish(&node, t, r#"{"end":true}"#).await;
    }
    let wild_frames = frames_until_the_end(&mut wild, &topics).await;
    let mut gaps = 0;
    for (t, ws) in topics.iter().zip(own.iter_mut()) {
        let own_frames = frames_until_the_end(ws, &[t]).await;
        let wild_of_t: Vec<&Value> = wild_frames.iter().filter(|f| f["topic"] == *t).collect();
        let own_of_t: Vec<&Value> = own_frames.iter().collect();
        if own_of_t != wild_of_t {
            let first = own_of_t.iter().zip(&wild_of_t).position(|(a, b)| a != b);
            let at = first.unwrap_or(own_of_t.len().min(wild_of_t.len()));
            panic!(
                "{t}: the wildcard subscriber's frames differ from the topic subscriber's at \
                 {at} ({} against {}):\n  own:  {:?}\n  wild: {:?}",
                own_of_t.len(),
                wild_of_t.len(),
                &own_of_t[at.saturating_sub(3)..(at + 3).min(own_of_t.len())],
                &wild_of_t[at.saturating_sub(3)..(at + 3).min(wild_of_t.len())],
            );
        }
        gaps += own_of_t.iter().filter(|f| f["op"] == "gap").count();
    }
    assert!(gaps >= 2, "the flushes never showed as a gap frame: {gaps}");
}

/// Redis restarts empty, and a client resumes before the node has seen its subscription connection
/// come back: the ack says `recovered:false` at the empty topic, and when the node then finds the
/// topic's sequence gone (and tells the subscriber that was there before), the resumed client gets
/// no gap frame: it was told already, and lost nothing since its ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_across_a_redis_restart_gets_no_gap_frame_after_its_ack() {
    let mut redis = Redis::start();
    let node = redis_node(&redis, &[]).await;
    let topic = "gap.restart";
    let mut before = node.ws().await;
    assert_eq!(before.subscribe(topic).await["op"], "ack");
    for i in 1..=5 {
        assert_eq!(publish(&node, topic, &json!({"n": i}).to_string()).await, i);
    }
    let first = before.next_message(WAIT).await.expect("message 1");
    let epoch = first["epoch"]
        .as_str()
        .expect("message 1 names its epoch")
        .to_string();
    for _ in 2..=5 {
        before.next_message(WAIT).await.expect("messages 2..=5");
    }
    redis.restart();
    let mut resumed = node.ws().await;
    // Its command connection may be coming back too: a refused resume is tried again.
    let mut ack = Value::Null;
    for _ in 0..100 {
        resumed
            .send(
                json!({"op":"subscribe","topic":topic,"id":"r","since":{"epoch":epoch,"offset":5}}),
            )
            .await;
        ack = resumed.recv(WAIT).await.expect("a reply to the resume");
        if ack["code"] != "broker_unavailable" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(
        (&ack["recovered"], &ack["epoch"], &ack["offset"]),
        (&json!(false), &json!("0"), &json!(0)),
        "{ack}"
    );
    // The subscriber that was there before is told once the node sees the topic lost.
    let gap = before
        .recv(WAIT)
        .await
        .expect("a gap frame for the old subscriber");
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":"0","offset":0})
    );
    // The node's command connection may still be coming back ("no connection to Redis").
    let published = redis_support::eventually(WAIT, async || {
        node.publish(topic, r#"{"after":"restart"}"#).await.0 == 200
    })
    .await;
    assert!(published, "no publish went through after the restart");
    let next = resumed
        .recv(WAIT)
        .await
        .expect("the new epoch's first message");
    assert_eq!(
        (&next["op"], &next["offset"], &next["data"]),
        (&json!("message"), &json!(1), &json!({"after":"restart"})),
        "nothing before it: {next}"
    );
}

/// Walks one topic's frames as a client does (its place: epoch and offset), against what the
/// publishes answered (`truth`: data id → epoch and offset). Returns what breaks the protocol: a
/// message of an epoch the client was moved past, one received twice, one whose offset is not
/// the one published, one of another epoch with no gap frame or epoch in front.
fn walk(frames: &[Value], truth: &HashMap<u64, (String, u64)>, from: (&str, u64)) -> Vec<String> {
    let mut problems = Vec::new();
    let (mut epoch, mut offset) = (from.0.to_string(), from.1);
    let mut left = HashSet::new();
    let mut ids = HashSet::new();
    for f in frames {
        let (e, o) = if f["op"] == "gap" {
            let e = f["epoch"].as_str().expect("gap epoch").to_string();
            (e, f["offset"].as_u64().expect("gap offset"))
        } else {
            let Some(id) = f["data"]["id"].as_u64() else {
                continue;
            };
            if !ids.insert(id) {
                problems.push(format!("twice: {f}"));
                continue;
            }
            let (e, o) = truth.get(&id).cloned().expect("a published message");
            if f["offset"] != json!(o) {
                problems.push(format!("published at {e}:{o}, arrived as {f}"));
            }
            let named = f["epoch"].as_str().is_some_and(|n| n == e) && o == 1;
            if e != epoch && !named {
                problems.push(format!("{e}:{o} with no gap frame after {epoch}:{offset}"));
            } else if e == epoch && o != offset + 1 {
                problems.push(format!("{e}:{o} after {epoch}:{offset}"));
            }
            (e, o)
        };
        if e != epoch {
            if left.contains(&e) {
                problems.push(format!("back to {e}:{o} after {epoch}:{offset}"));
            }
            left.insert(std::mem::replace(&mut epoch, e));
        }
        offset = o;
    }
    problems
}

/// A wildcard resume with a long replay (600 topics), and Redis flushed while it runs, as three
/// topics are published to all along: on each of them the resumed client gets no message of the
/// epoch before the flush after being told of the new one, and nothing twice. (Before the fix it
/// got the old epoch's last messages after the new epoch's gap frame, then the new epoch's first
/// messages a second time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_during_a_wildcard_resume_never_takes_a_topic_back_or_repeats_it() {
    let redis = Redis::start();
    let env = [
        ("PUBGATE__LIMITS__SEND_QUEUE_FRAMES", "100000".to_string()),
        ("PUBGATE__LIMITS__SEND_QUEUE_BYTES", "104857600".to_string()),
    ];
    let node = redis_node(&redis, &env).await;
    let hot = ["q.h0", "q.h1", "q.h2"];
    let truth = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publish_hot = {
        let (truth, next_id, addr) = (truth.clone(), next_id.clone(), node.addr);
        move |topic: &'static str| {
            let (truth, next_id) = (truth.clone(), next_id.clone());
            async move {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let body = json!({"id": id}).to_string();
                let path = format!("/v1/publish/{topic}");
                let (status, reply) = redis_support::http(addr, "POST", &path, &body).await;
                assert_eq!(status, 200, "{reply}");
                let reply: Value = serde_json::from_str(&reply).expect("publish reply");
                let at = (
                    reply["epoch"].as_str().expect("epoch").to_string(),
                    reply["offset"].as_u64().expect("offset"),
                );
                truth.lock().expect("lock").insert(id, at);
            }
        }
    };
    let mut first = node.ws().await;
    let ack = first.subscribe("q.>").await;
    let time = ack["time"].as_u64().expect("time");
    for t in hot {
        for _ in 0..3 {
            publish_hot(t).await;
        }
    }
    let fill: Vec<Value> = (0..600)
        .flat_map(|i| (0..2).map(move |k| json!({"topic": format!("q.f{i}"), "data": {"k": k}})))
        .collect();
    for chunk in fill.chunks(400) {
        let body = json!({ "messages": chunk }).to_string();
        let (status, reply) = redis_support::http(node.addr, "POST", "/v1/publish", &body).await;
        assert_eq!(status, 200, "{reply}");
    }
    let before = truth.lock().expect("lock").clone();
    first.close().await;
    let mut listed = serde_json::Map::new();
    let mut places = HashMap::new();
    for (i, t) in hot.iter().enumerate() {
        // Ids 3i..3i+2 went to hot[i], in order: its epoch, at offset 3.
        let (e, o) = before.get(&(3 * i as u64 + 2)).cloned().expect("published");
        assert_eq!(o, 3);
        listed.insert(t.to_string(), json!({"epoch": e, "offset": 3}));
        places.insert(*t, e);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, publish_hot) = (stop.clone(), publish_hot.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                publish_hot(hot[(n % 3) as usize]).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
                n += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut resumed = node.ws().await;
    resumed
        .send(
            json!({"op":"subscribe","topic":"q.>","id":7,"since":{"time": time, "topics": listed}}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    redis.cli(&["FLUSHALL"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    publisher.await.expect("publisher");
    let mut frames = Vec::new();
    while let Some(f) = resumed.recv(Duration::from_millis(1000)).await {
        frames.push(f);
    }
    let ack = frames
        .iter()
        .find(|f| f["id"] == 7)
        .expect("the resume's ack");
    assert_eq!(ack["op"], "ack", "{ack}");
    let truth = truth.lock().expect("lock").clone();
    let mut problems = Vec::new();
    for t in hot {
        let of_t: Vec<Value> = frames
            .iter()
            .filter(|f| f["topic"] == t && f["op"] != "ack")
            .cloned()
            .collect();
        assert!(
            of_t.iter().any(|f| f["op"] == "gap"),
            "{t}: the flush was never told: {of_t:?}"
        );
        for p in walk(&of_t, &truth, (&places[t], 3)) {
            problems.push(format!("{t}: {p}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// 500 × 20 KB in history: more than the reader's send queue (1 MiB) and the kernel's socket
/// buffers (4 MiB) take, so the replay waits for it mid-way.
const KEPT: u64 = 500;
const SIZE: usize = 20_000;

/// A client resumes from 0 and does not read; meanwhile 600 more messages push everything it has
/// not been sent out of history (500 kept). When it reads, it gets a contiguous run from 1, then a
/// gap frame at the topic's latest offset, then live messages.
async fn trimmed_under_a_replay(node: &Node, topic: &str) {
    let mut ws = node.ws().await;
    let epoch = ws.subscribe(topic).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    ws.close().await;
    publish_range(node, topic, 1..=KEPT, SIZE).await;
    let mut client = stuck_resumer(node.addr, topic, &epoch, 0).await;
    let replayed = wait_steady(node, "pubgate_messages_replayed_total").await;
    assert!(
        (1.0..KEPT as f64).contains(&replayed),
        "the replay waits mid-way: {replayed}"
    );
    let latest = KEPT + 600;
    publish_range(node, topic, KEPT + 1..=latest, SIZE).await;

    let mut last = 0;
    // The ack of the empty topic named the empty epoch ("0"), message 1 names the real one.
    let mut real_epoch = epoch.clone();
    let gap = loop {
        let v = next_json(&mut client).await;
        match v["op"].as_str() {
            Some("message") => {
                let offset = v["offset"].as_u64().expect("offset");
                if let Some(e) = v["epoch"].as_str() {
                    real_epoch = e.to_string();
                }
                assert_eq!(offset, last + 1, "contiguous until the gap");
                let want: Value = serde_json::from_str(&payload(offset, SIZE)).expect("JSON");
                assert_eq!(v["data"], want, "data of offset {offset}");
                last = offset;
            }
            Some("gap") => break v,
            _ => panic!("unexpected frame {v}"),
        }
    };
    assert!(
        last >= replayed as u64 && last < KEPT,
        "the replay went on as far as history held it: {last}"
    );
    assert_eq!(
        gap,
        json!({"op":"gap","topic":topic,"epoch":real_epoch,"offset":latest})
    );
    assert_eq!(publish(node, topic, r#"{"live":true}"#).await, latest + 1);
    let live = next_json(&mut client).await;
    assert_eq!(
        (&live["op"], &live["offset"], &live["data"]),
        (&json!("message"), &json!(latest + 1), &json!({"live":true}))
    );
    assert_eq!(metric(node, "pubgate_gaps_signalled_total").await, 1.0);
    println!("{topic}: replayed 1..={last}, then a gap frame at {latest}, then live");
}

/// The next text frame of a raw client, as JSON (pings skipped).
async fn next_json(ws: &mut RawWs) -> Value {
    loop {
        let f = ws
            .read_frame(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("no frame: {e:?}"));
        match f.opcode {
            op::TEXT => return serde_json::from_slice(&f.payload).expect("JSON"),
            op::PING | op::PONG => continue,
            other => panic!("unexpected opcode {other}"),
        }
    }
}

fn trim_env() -> Vec<(&'static str, String)> {
    vec![
        ("PUBGATE__HISTORY__SIZE", KEPT.to_string()),
        (
            "PUBGATE__LIMITS__SEND_QUEUE_BYTES",
            (1u32 << 20).to_string(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_under_a_replay_ends_it_with_a_gap_frame_on_memory() {
    let node = memory_node(&trim_env()).await;
    trimmed_under_a_replay(&node, "gap.trim.mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_under_a_replay_ends_it_with_a_gap_frame_on_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis, &trim_env()).await;
    trimmed_under_a_replay(&node, "gap.trim.redis").await;
}
