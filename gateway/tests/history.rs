//! Per-topic history: the sizes and ages set by topic pattern, trimming by age, and
//! `GET /v1/history` (pages, completeness, raw data, errors, the API key), on the Redis broker and
//! on the memory broker.
//!
//! Needs `redis-server` on PATH. Resume with `since` is in `recovery.rs`.

mod common;
mod redis_support;

use std::time::Duration;

use redis_support::history::*;
use redis_support::{Frame, Node, Redis, TempDir, http, http_with};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Per-topic history rules
// ---------------------------------------------------------------------------------------------

const RULES: &str = r#"
[history]
size = 50
ttl = "5m"

[[history.rules]]
pattern = "nohist.>"
size = 0

[[history.rules]]
pattern = "chat.>"
size = 3
ttl = "1m"
"#;

async fn rules_are_honoured(node: &Node) {
    for topic in ["chat.r1", "nohist.r1", "plain.r1"] {
        for i in 1..=5 {
            publish(node, topic, &json!({"n": i}).to_string()).await;
        }
    }
    let (_, chat, _) = get_history(node, "chat.r1", "?since=0").await;
    assert_eq!(page_offsets(&chat), vec![3, 4, 5], "{chat}");
    assert_eq!(chat["complete"], json!(false));
    let (_, none, _) = get_history(node, "nohist.r1", "?since=0").await;
    assert_eq!(page_offsets(&none), Vec::<u64>::new(), "{none}");
    assert_eq!(
        (&none["complete"], &none["offset"]),
        (&json!(false), &json!(5))
    );
    let (_, plain, _) = get_history(node, "plain.r1", "?since=0").await;
    assert_eq!(page_offsets(&plain), vec![1, 2, 3, 4, 5], "{plain}");
    assert_eq!(plain["complete"], json!(true));

    let epoch = |page: &Value| page["epoch"].as_str().expect("epoch").to_string();
    let cases = [
        ("chat.r1", epoch(&chat), 2, true, 3),
        ("chat.r1", epoch(&chat), 1, false, 0),
        ("nohist.r1", epoch(&none), 4, false, 0),
        ("nohist.r1", epoch(&none), 5, true, 0),
        ("plain.r1", epoch(&plain), 0, true, 5),
    ];
    for (topic, epoch, since, recovered, replayed) in cases {
        let mut ws = node.ws().await;
        let ack = resume(&mut ws, topic, &epoch, since).await;
        assert_eq!(
            ack["recovered"],
            json!(recovered),
            "{topic} since {since}: {ack}"
        );
        for i in since + 1..=since + replayed {
            let m = ws.next_message(WAIT).await.expect("replayed");
            assert_eq!(m["offset"], json!(i), "{topic}: {m}");
        }
        expect_silence(&mut ws, topic).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_topic_history_rules_are_honoured_on_redis() {
    let redis = Redis::start();
    let dir = TempDir::new("rules");
    let path = dir.join("pubgate.toml");
    std::fs::write(&path, RULES).expect("write config");
    let node = Node::start_with(
        &["--config", path.to_str().expect("utf-8 path")],
        &[
            ("PUBGATE__BROKER__KIND", "redis".to_string()),
            ("PUBGATE__BROKER__URL", redis.url()),
        ],
    )
    .await;
    node.wait_ready(READY).await;
    rules_are_honoured(&node).await;
    let xlen = |topic: &str| redis.cli(&["XLEN", &format!("pubgate:{topic}:history")]);
    assert_eq!(xlen("chat.r1").trim(), "3");
    assert_eq!(xlen("nohist.r1").trim(), "0");
    assert_eq!(xlen("plain.r1").trim(), "5");
    let pttl: i64 = redis
        .cli(&["PTTL", "pubgate:chat.r1:history"])
        .trim()
        .parse()
        .expect("pttl");
    assert!(
        pttl > 0 && pttl <= 60_000,
        "chat.> keeps history for 1m: {pttl}"
    );
    let pttl: i64 = redis
        .cli(&["PTTL", "pubgate:plain.r1:history"])
        .trim()
        .parse()
        .expect("pttl");
    assert!(pttl > 60_000, "other topics keep the default 5m: {pttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_topic_history_rules_are_honoured_on_memory() {
    let dir = TempDir::new("rules");
    let path = dir.join("pubgate.toml");
    std::fs::write(&path, RULES).expect("write config");
    let node = Node::start_with(&["--config", path.to_str().expect("utf-8 path")], &[]).await;
    rules_are_honoured(&node).await;
}

// ---------------------------------------------------------------------------------------------
// GET /v1/history
// ---------------------------------------------------------------------------------------------

/// History of 5: pages, limits, completeness, raw data, errors, and a first page load followed by
/// a seamless subscribe.
async fn history_api_cases(node: &Node) {
    let topic = "hist.api";
    for i in 1..=10 {
        // Odd spacing and key order: data must come back byte for byte.
        publish(
            node,
            topic,
            &format!("{{\"n\": {i},  \"z\":[1, 2], \"a\":\"x y\"}}"),
        )
        .await;
    }
    let (status, all, raw) = get_history(node, topic, "?since=5").await;
    assert_eq!(status, 200, "{raw}");
    let epoch = all["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(all["topic"], json!(topic));
    assert_eq!(all["offset"], json!(10));
    assert_eq!(all["complete"], json!(true), "{all}");
    assert_eq!(page_offsets(&all), vec![6, 7, 8, 9, 10]);
    assert!(
        raw.contains(r#"{"offset":6,"data":{"n": 6,  "z":[1, 2], "a":"x y"}}"#),
        "data is not re-serialized: {raw}"
    );

    let q = |s: &str| format!("?epoch={epoch}&{s}");
    let cases: [(String, Vec<u64>, bool); 8] = [
        (q("since=5"), vec![6, 7, 8, 9, 10], true),
        (q("since=7&limit=2"), vec![8, 9], true),
        (q("since=2"), vec![6, 7, 8, 9, 10], false),
        (q("since=10"), vec![], true),
        (q("since=11"), vec![], false),
        (
            "?epoch=deadbeef&since=7".into(),
            vec![6, 7, 8, 9, 10],
            false,
        ),
        ("?limit=3".into(), vec![8, 9, 10], true),
        ("".into(), vec![6, 7, 8, 9, 10], false),
    ];
    for (query, offsets, complete) in cases {
        let (status, page, raw) = get_history(node, topic, &query).await;
        assert_eq!(status, 200, "{query}: {raw}");
        assert_eq!(page_offsets(&page), offsets, "{query}: {raw}");
        assert_eq!(page["complete"], json!(complete), "{query}: {raw}");
        assert_eq!(
            (&page["epoch"], &page["offset"]),
            (&json!(epoch), &json!(10))
        );
    }
    for bad in [
        "?limit=0",
        "?limit=1001",
        "?since=x",
        "?since=-1",
        "?epoch=a%20b",
    ] {
        let (status, page, raw) = get_history(node, topic, bad).await;
        assert_eq!(status, 400, "{bad}: {raw}");
        assert_eq!(page["code"], json!("bad_request"), "{bad}");
    }
    let (status, page, _) = get_history(node, "bad..topic", "").await;
    assert_eq!((status, &page["code"]), (400, &json!("invalid_topic")));
    let (status, _) = http(node.addr, "POST", &format!("/v1/history/{topic}"), "{}").await;
    assert_eq!(status, 405);

    // A first page load: the newest messages, then a subscribe that continues exactly after them.
    let (_, page, _) = get_history(node, topic, "?limit=2").await;
    assert_eq!(page_offsets(&page), vec![9, 10]);
    let mut ws = node.ws().await;
    let ack = resume(
        &mut ws,
        topic,
        &epoch,
        page["offset"].as_u64().expect("offset"),
    )
    .await;
    assert_eq!(ack["recovered"], json!(true), "{ack}");
    expect_silence(&mut ws, "nothing missed since the page").await;
    assert_eq!(publish(node, topic, "11").await, 11);
    let m = ws.next_message(WAIT).await.expect("live");
    assert_eq!(
        (m["offset"].clone(), m["data"].clone()),
        (json!(11), json!(11))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api_pages_report_completeness_on_redis() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[("PUBGATE__HISTORY__SIZE", "5".to_string())]).await;
    history_api_cases(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api_pages_report_completeness_on_memory() {
    let node = memory_node(&[("PUBGATE__HISTORY__SIZE", "5".to_string())]).await;
    history_api_cases(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api_needs_the_publish_api_key() {
    let node = memory_node(&[("PUBGATE__AUTH__API_KEYS", "k1".to_string())]).await;
    let path = "/v1/history/secret.topic";
    let (status, body) = http(node.addr, "GET", path, "").await;
    assert_eq!(status, 401, "{body}");
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(http_with(node.addr, "GET", path, &wrong, "").await.0, 401);
    let right = [("Authorization", "Bearer k1")];
    let (status, body) = http_with(node.addr, "GET", path, &right, "").await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (&page["offset"], &page["complete"]),
        (&json!(0), &json!(true)),
        "{page}"
    );
}

/// `GET /v1/history` answers who may subscribe: with no API key configured, anonymous readers get
/// the topics of `auth.anonymous_subscribe` and a 403 for the others, like an anonymous WebSocket
/// subscribe; with a key configured, the key reads every topic, and anonymous readers (where
/// `auth.anonymous` lets them in) the same topics as without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_follow_the_subscribe_rules() {
    let open = memory_node(&[("PUBGATE__AUTH__ANONYMOUS_SUBSCRIBE", "public.>".to_string())]).await;
    publish(&open, "private.x", r#"{"secret":1}"#).await;
    publish(&open, "public.news", r#"{"news":1}"#).await;
    let (status, page, raw) = get_history(&open, "private.x", "").await;
    assert_eq!(status, 403, "{raw}");
    assert_eq!(
        page,
        json!({"code":"forbidden","message":"not allowed to read private.x"})
    );
    let (status, page, raw) = get_history(&open, "public.news", "").await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(page_offsets(&page), vec![1], "{raw}");
    assert_eq!(page["messages"][0]["data"], json!({"news":1}));
    // The same rule on the WebSocket side.
    let mut ws = open.ws().await;
    for (id, topic, op) in [(1, "private.x", "error"), (2, "public.news", "ack")] {
        ws.send(json!({"op":"subscribe","topic":topic,"id":id}))
            .await;
        match ws.next_frame(WAIT).await {
            Frame::Json(v) => assert_eq!((&v["op"], &v["id"]), (&json!(op), &json!(id)), "{v}"),
            other => panic!("subscribe {topic}: {other:?}"),
        }
    }

    let keyed = memory_node(&[
        ("PUBGATE__AUTH__API_KEYS", "k1".to_string()),
        ("PUBGATE__AUTH__ANONYMOUS", "true".to_string()),
        ("PUBGATE__AUTH__ANONYMOUS_SUBSCRIBE", "public.>".to_string()),
    ])
    .await;
    let cases: [(&str, Option<&str>, u16); 6] = [
        ("private.x", Some("Bearer k1"), 200),
        ("public.news", Some("Bearer k1"), 200),
        ("public.news", None, 200),
        // Anonymous, outside the anonymous patterns, on a node that takes keys: authenticate.
        ("private.x", None, 401),
        ("private.x", Some("Bearer nope"), 401),
        ("public.news", Some("Bearer nope"), 401),
    ];
    for (topic, auth, status) in cases {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let (got, body) = http_with(
            keyed.addr,
            "GET",
            &format!("/v1/history/{topic}"),
            &headers,
            "",
        )
        .await;
        assert_eq!(got, status, "{topic} with {auth:?}: {body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        if status == 200 {
            assert_eq!(
                (&v["topic"], &v["offset"]),
                (&json!(topic), &json!(0)),
                "{v}"
            );
        } else {
            assert_eq!(v["code"], json!("forbidden"), "{topic} with {auth:?}: {v}");
        }
    }
}

/// Entries older than the history TTL are trimmed from the stream by later publishes, and are no
/// longer served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_the_ttl_is_trimmed_on_redis() {
    let redis = Redis::start();
    let node = redis_node(
        &redis,
        &[
            ("PUBGATE__HISTORY__SIZE", "100".to_string()),
            ("PUBGATE__HISTORY__TTL", "1s".to_string()),
        ],
    )
    .await;
    let xlen = || redis.cli(&["XLEN", "pubgate:ttl.t1:history"]);
    for i in 0..5 {
        publish(&node, "ttl.t1", &i.to_string()).await;
    }
    assert_eq!(xlen().trim(), "5", "fresh entries are kept");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let newest = publish(&node, "ttl.t1", "5").await;
    assert_eq!(xlen().trim(), "1", "the five expired entries are trimmed");
    let (status, page, body) = get_history(&node, "ttl.t1", "?limit=10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(page_offsets(&page), vec![newest], "{body}");
}

/// With history off (`size = 0`, as for high-rate topics), a subscriber of a topic that does not
/// exist yet gets every message from the first: the node holds the new epoch's messages back while
/// it reads the epoch's salt, and a read that (history off) returns none must not count the held
/// ones as lost (hostile review: messages 1 and 2 became gap frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_history_off_a_live_subscriber_gets_a_new_topics_first_messages() {
    let redis = Redis::start();
    let node = redis_node(&redis, &[("PUBGATE__HISTORY__SIZE", "0".to_string())]).await;
    for round in 0..3 {
        let topic = format!("nohist.fresh{round}");
        let mut ws = node.ws().await;
        let ack = ws.subscribe(&topic).await;
        assert_eq!(ack["op"], json!("ack"), "{ack}");
        for i in 1..=5 {
            assert_eq!(
                publish(&node, &topic, &json!({ "n": i }).to_string()).await,
                i
            );
        }
        for i in 1..=5u64 {
            // The next frame is the message: no gap frame either, as nothing came before the
            // topic's first epoch (protocol.md, "Gap frames").
            let m = ws.recv(WAIT).await.expect("every message arrives");
            assert_eq!(m["op"], json!("message"), "{m}");
            assert_eq!(
                (m["offset"].clone(), m["data"]["n"].clone()),
                (json!(i), json!(i)),
                "{m}"
            );
        }
        expect_silence(&mut ws, &topic).await;
        ws.close().await;
    }
}
