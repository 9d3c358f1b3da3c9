//! Wildcard subscriptions (`scores.*`, `scores.>`): exactly the matching topics, across nodes, with
//! their own topics and offsets; authorized by covering patterns; and cheap on Redis (a node gets
//! only the topics below the prefix it serves).
//!
//! Needs `redis-server` on PATH (Debian: `apt-get install redis-server`).

mod common;
mod jwt_support;
mod redis_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Server, WsClient};
use jwt_support::{SECRET, claims, hs256};
use redis_support::{Node, Redis, Ws, eventually};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(15);

/// Messages grouped by topic, each topic's in arrival order: what the protocol orders (there is
/// no order across topics; the first message of a topic a node had not seen yet below a prefix
/// waits for a history read).
fn by_topic(messages: Vec<(String, Value, Value)>) -> BTreeMap<String, Vec<(Value, Value)>> {
    let mut map: BTreeMap<String, Vec<(Value, Value)>> = BTreeMap::new();
    for (topic, offset, data) in messages {
        map.entry(topic).or_default().push((offset, data));
    }
    map
}

/// Every `message` frame a client gets until `quiet` passes with nothing new, as
/// `(topic, offset, data)`.
async fn drain(ws: &mut Ws, quiet: Duration) -> Vec<(String, Value, Value)> {
    let mut got = Vec::new();
    while let Some(m) = ws.next_message(quiet).await {
        got.push((
            m["topic"].as_str().unwrap_or_default().to_string(),
            m["offset"].clone(),
            m["data"].clone(),
        ));
    }
    got
}

/// The topics to publish to, and which of them each pattern must see.
const TOPICS: [&str; 7] = [
    "scores.nba",
    "scores.nhl",
    "scores.nba.live",
    "scores",
    "scoresheet.nba",
    "news.nba",
    "prices.eur",
];

fn matches(pattern: &str, topic: &str) -> bool {
    match pattern {
        "scores.*" => topic.starts_with("scores.") && topic.matches('.').count() == 1,
        "scores.>" => topic.starts_with("scores."),
        "*.nba" => topic.ends_with(".nba") && topic.matches('.').count() == 1,
        _ => unreachable!("{pattern}"),
    }
}

/// Publishes 3 rounds over [`TOPICS`] through `publisher` and checks that each wildcard subscriber
/// got exactly the messages of its matching topics, in publish order, with their offsets.
async fn publish_and_check(publisher: &Node, subscribers: Vec<(&str, Ws)>) {
    let mut expected: BTreeMap<&str, Vec<(String, Value, Value)>> = BTreeMap::new();
    for round in 0..3u64 {
        for topic in TOPICS {
            let data = json!({"topic": topic, "round": round});
            let (status, body) = publisher.publish(topic, &data.to_string()).await;
            assert_eq!(status, 200, "{body}");
            let reply: Value = serde_json::from_str(&body).expect("json reply");
            assert_eq!(reply["offset"], json!(round + 1), "{body}");
            for (pattern, _) in &subscribers {
                if matches(pattern, topic) {
                    expected.entry(pattern).or_default().push((
                        topic.to_string(),
                        json!(round + 1),
                        data.clone(),
                    ));
                }
            }
        }
    }
    for (pattern, mut ws) in subscribers {
        let got = drain(&mut ws, Duration::from_secs(2)).await;
        let want = expected.remove(pattern).unwrap_or_default();
        assert_eq!(
            by_topic(got),
            by_topic(want),
            "{pattern} got the wrong messages"
        );
    }
}

/// Subscribes to a wildcard and checks the ack: it names the pattern and has no position.
async fn subscribe_wildcard(ws: &mut Ws, pattern: &str) {
    let ack = ws.subscribe(pattern).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["topic"], pattern, "{ack}");
    assert!(
        ack.get("epoch").is_none() && ack.get("offset").is_none(),
        "a wildcard ack has no position: {ack}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscribers_get_exactly_the_matching_topics_on_one_node() {
    let node = Node::start(&[]).await;
    let mut subscribers = Vec::new();
    for pattern in ["scores.*", "scores.>", "*.nba"] {
        let mut ws = node.ws().await;
        subscribe_wildcard(&mut ws, pattern).await;
        subscribers.push((pattern, ws));
    }
    publish_and_check(&node, subscribers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscribers_get_exactly_the_matching_topics_across_nodes() {
    let redis = Redis::start();
    let publisher = Node::redis("redis", &redis.url(), &[]).await;
    let serving = Node::redis("redis", &redis.url(), &[]).await;
    publisher.wait_ready(READY).await;
    serving.wait_ready(READY).await;
    let mut subscribers = Vec::new();
    for pattern in ["scores.*", "scores.>", "*.nba"] {
        let mut ws = serving.ws().await;
        subscribe_wildcard(&mut ws, pattern).await;
        subscribers.push((pattern, ws));
    }
    // An exact subscriber of a topic the wildcards cover too: each subscription gets it once.
    let mut exact = serving.ws().await;
    assert_eq!(exact.subscribe("scores.nba").await["op"], "ack");
    publish_and_check(&publisher, subscribers).await;
    let got = drain(&mut exact, Duration::from_secs(1)).await;
    let offsets: Vec<Value> = got.iter().map(|m| m.1.clone()).collect();
    assert_eq!(offsets, [json!(1), json!(2), json!(3)], "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_publishes_reach_wildcard_subscribers_once_and_other_prefixes_never_reach_the_node() {
    let redis = Redis::start();
    let publisher = Node::redis("redis", &redis.url(), &[]).await;
    let serving = Node::redis(
        "redis",
        &redis.url(),
        &[("PUBGATE__BROKER__UNSUBSCRIBE_DELAY", "0s".to_string())],
    )
    .await;
    publisher.wait_ready(READY).await;
    serving.wait_ready(READY).await;
    let received = "pubgate_broker_messages_received_total";
    let mut ws = serving.ws().await;
    subscribe_wildcard(&mut ws, "a.>").await;
    let before = serving.metric(received).await.unwrap_or(0.0);

    // 200 messages below `b` and 12 below `a` (some raw, straight into Redis).
    for i in 0..200 {
        let topic = format!("b.t{}", i % 20);
        let (status, body) = publisher
            .publish(&topic, &json!({"i": i}).to_string())
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut want = Vec::new();
    for i in 0..12u64 {
        let topic = format!("a.t{}.x", i % 3);
        let data = json!({"i": i});
        if i % 4 == 3 {
            redis.cli(&["PUBLISH", &format!("pubgate:{topic}"), &data.to_string()]);
            want.push((topic, Value::Null, data));
        } else {
            let (status, body) = publisher.publish(&topic, &data.to_string()).await;
            assert_eq!(status, 200, "{body}");
            let reply: Value = serde_json::from_str(&body).expect("json reply");
            want.push((topic, reply["offset"].clone(), data));
        }
    }
    let got = drain(&mut ws, Duration::from_secs(2)).await;
    assert_eq!(by_topic(got), by_topic(want));
    let arrived = serving.metric(received).await.unwrap_or(0.0) - before;
    assert_eq!(
        arrived, 12.0,
        "only the 12 messages below `a` may reach the serving node's Redis connection"
    );

    // Unsubscribing drops the pattern subscription in Redis.
    assert_eq!(ws.unsubscribe("a.>").await["op"], "ack");
    let numpat = || redis.cli(&["PUBSUB", "NUMPAT"]).trim().to_string();
    assert!(
        eventually(Duration::from_secs(5), async || numpat() == "0").await,
        "PUBSUB NUMPAT stayed {}",
        numpat()
    );
    let (status, _) = publisher.publish("a.t0.x", "{}").await;
    assert_eq!(status, 200);
    assert_eq!(ws.next_message(Duration::from_millis(500)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_is_allowed_only_where_one_granted_pattern_covers_it() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .start()
        .await;
    let token = hs256(SECRET, None, &claims(&["scores.>", "*.nba"], &["scores.>"]));
    let url = format!("{}?access_token={token}", server.ws_url());
    let mut ws = WsClient::try_connect(&url).await.expect("connect");
    let mut id = 0;
    let mut ask = async |topic: &str| {
        id += 1;
        ws.request(&json!({"op": "subscribe", "topic": topic, "id": id}))
            .await
    };
    for allowed in [
        "scores.*",
        "scores.>",
        "scores.nba.*",
        "*.nba",
        "scores.nba",
    ] {
        let reply = ask(allowed).await;
        assert_eq!(reply["op"], "ack", "{allowed}: {reply}");
    }
    for refused in [">", "*.*", "*.nhl", "news.>", "*.nba.*", "scores.>.x"] {
        let reply = ask(refused).await;
        assert_eq!(reply["op"], "error", "{refused}: {reply}");
        let code = if refused == "scores.>.x" {
            "invalid_topic"
        } else {
            "forbidden"
        };
        assert_eq!(reply["code"], code, "{refused}: {reply}");
    }
    // A wildcard cannot be resumed with `since`, and cannot be published to.
    let reply = ws
        .request(&json!({"op": "subscribe", "topic": "news.*", "id": 100,
            "since": {"epoch": "x", "offset": 1}}))
        .await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    let reply = ws
        .request(&json!({"op": "publish", "topic": "scores.*", "data": 1, "id": 101}))
        .await;
    assert_eq!(reply["code"], "invalid_topic", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_no_longer_covers_a_wildcard_ends_it() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .env("PUBGATE__AUTH__API_KEYS", "backend-key")
        .start()
        .await;
    let token = |subscribe: &[&str]| hs256(SECRET, None, &claims(subscribe, &[]));
    let url = format!("{}?access_token={}", server.ws_url(), token(&[">"]));
    let mut ws = WsClient::try_connect(&url).await.expect("connect");
    for (id, topic) in [(1, "scores.*"), (2, "news.>")] {
        let ack = ws
            .request(&json!({"op": "subscribe", "topic": topic, "id": id}))
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    // `scores.>` still covers `scores.*`; nothing covers `news.>` any more.
    ws.send_json(&json!({"op":"refresh","token":token(&["scores.>"]),"id":3}))
        .await;
    let ended = ws.recv().await;
    assert_eq!(
        ended,
        json!({"op":"unsubscribed","topic":"news.>","reason":"forbidden"})
    );
    assert_eq!(ws.recv().await["id"], 3);
    let mut http = common::HttpClient::connect(server.addr).await;
    for topic in ["news.a", "scores.nba"] {
        let r = http
            .request(
                "POST",
                &format!("/v1/publish/{topic}"),
                &[("authorization", "Bearer backend-key")],
                "1",
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let m = ws.recv().await;
    assert_eq!(
        (m["op"].as_str(), m["topic"].as_str()),
        (Some("message"), Some("scores.nba")),
        "{m}"
    );
    ws.expect_silence(Duration::from_millis(300)).await;
}

/// The `sub` and `psub` counts of the nodes' subscription connections, from `CLIENT LIST`.
fn subscription_counts(redis: &Redis) -> (u64, u64) {
    let list = redis.cli(&["CLIENT", "LIST"]);
    let field = |line: &str, name: &str| {
        line.split(' ')
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    list.lines()
        .filter(|l| l.contains("name=pubgate-sub-"))
        .fold((0, 0), |(s, p), l| {
            (s + field(l, "sub"), p + field(l, "psub"))
        })
}

/// Raw publishes of `(topic, i)` for `i` in `range`, straight into Redis.
fn raw_publish(redis: &Redis, topic: &str, range: std::ops::Range<u64>) {
    for i in range {
        redis.cli(&[
            "PUBLISH",
            &format!("pubgate:{topic}"),
            &json!({"i": i}).to_string(),
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_prefixes_and_name_subscriptions_deliver_each_raw_message_once() {
    let redis = Redis::start();
    let node = Node::redis(
        "redis",
        &redis.url(),
        &[("PUBGATE__BROKER__UNSUBSCRIBE_DELAY", "0s".to_string())],
    )
    .await;
    node.wait_ready(READY).await;
    // Three nested prefixes on one node: Redis sends each raw message once per pattern.
    let mut subscribers = Vec::new();
    for pattern in [">", "scores.>", "scores.nba.*"] {
        let mut ws = node.ws().await;
        subscribe_wildcard(&mut ws, pattern).await;
        subscribers.push(ws);
    }
    // A client that keeps subscribing and unsubscribing the topic by name meanwhile.
    let churner = {
        let mut ws = node.ws().await;
        tokio::spawn(async move {
            for _ in 0..20 {
                assert_eq!(ws.subscribe("scores.nba.g1").await["op"], "ack");
                assert_eq!(ws.unsubscribe("scores.nba.g1").await["op"], "ack");
            }
        })
    };
    raw_publish(&redis, "scores.nba.g1", 0..200);
    churner.await.expect("churner");
    for mut ws in subscribers {
        let got: Vec<Value> = drain(&mut ws, Duration::from_secs(1))
            .await
            .into_iter()
            .map(|m| m.2["i"].clone())
            .collect();
        let want: Vec<Value> = (0..200u64).map(|i| json!(i)).collect();
        assert_eq!(got, want, "each raw message exactly once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_redis_connection_subscribes_topics_by_name_only_and_bad_raw_names_are_refused() {
    let redis = Redis::start();
    let node = Node::redis("redis", &redis.url(), &[]).await;
    node.wait_ready(READY).await;
    let mut ws = node.ws().await;
    subscribe_wildcard(&mut ws, "many.>").await;
    for t in 0..50 {
        raw_publish(&redis, &format!("many.t{t}"), 0..1);
    }
    // Channels a raw publisher made up that are no topic names: refused, counted, never delivered.
    for bad in ["many.a b", "many..x", "many.x\"y"] {
        redis.cli(&["PUBLISH", &format!("pubgate:{bad}"), "{}"]);
    }
    let got = drain(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 50, "{got:?}");
    let rejected = "pubgate_broker_rejected_total{reason=\"topic\"}";
    assert_eq!(node.metric(rejected).await, Some(3.0));

    // A new subscription connection subscribes the pattern, not the 50 topics it brought.
    assert_eq!(
        subscription_counts(&redis),
        (1, 1),
        "canary channel + pattern"
    );
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let reconnects = "pubgate_broker_reconnects_total";
    assert!(
        eventually(Duration::from_secs(10), async || {
            node.metric(reconnects).await.unwrap_or(0.0) >= 1.0 && node.is_ready().await
        })
        .await
    );
    assert_eq!(subscription_counts(&redis), (1, 1), "after the reconnect");
    raw_publish(&redis, "many.t7", 1..2);
    let got = drain(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "once, not once per source: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_are_bounded_per_connection_and_per_node() {
    let node = Node::start(&[
        ("PUBGATE__LIMITS__MAX_WILDCARDS", "3".to_string()),
        ("PUBGATE__LIMITS__MAX_WILDCARD_PATTERNS", "4".to_string()),
    ])
    .await;
    let mut a = node.ws().await;
    for p in ["a.*", "b.*", "c.*"] {
        subscribe_wildcard(&mut a, p).await;
    }
    let r = a.subscribe("d.*").await;
    assert_eq!(r["code"], "too_many_subscriptions", "{r}");
    // Topics by name still work.
    assert_eq!(a.subscribe("d.x").await["op"], "ack");
    let mut b = node.ws().await;
    subscribe_wildcard(&mut b, "d.*").await;
    // The node serves 4 patterns: a fifth is refused, one it serves already is not.
    let r = b.subscribe("e.*").await;
    assert_eq!(r["code"], "too_many_subscriptions", "{r}");
    subscribe_wildcard(&mut b, "a.*").await;
}

/// `count` raw `PUBLISH`es of `{"i":n}` to `topic`, pipelined on one plain RESP connection, paced
/// over about `over`.
async fn raw_publish_paced(redis: &Redis, topic: &str, count: u64, over: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = redis
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to redis");
    let channel = format!("pubgate:{topic}");
    let batches = 50;
    for batch in 0..batches {
        let mut out = Vec::new();
        for i in (batch * count / batches)..((batch + 1) * count / batches) {
            let data = json!({"i": i}).to_string();
            out.extend_from_slice(
                format!(
                    "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n${}\r\n{data}\r\n",
                    channel.len(),
                    data.len()
                )
                .as_bytes(),
            );
        }
        conn.write_all(&out).await.expect("write");
        tokio::time::sleep(over / batches as u32).await;
    }
    // Wait for every reply (`:N\r\n` each).
    let mut replies = 0;
    let mut buf = [0u8; 4096];
    while replies < count {
        let n = conn.read(&mut buf).await.expect("read");
        assert!(n > 0, "redis closed");
        replies += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_messages_are_neither_lost_nor_doubled_while_a_covering_pattern_comes_and_goes() {
    const COUNT: u64 = 4000;
    let redis = Redis::start();
    let node = Node::redis(
        "redis",
        &redis.url(),
        &[("PUBGATE__BROKER__UNSUBSCRIBE_DELAY", "0s".to_string())],
    )
    .await;
    node.wait_ready(READY).await;
    // By name, and by a pattern that stays; while another client adds and drops covering ones.
    let mut exact = node.ws().await;
    assert_eq!(exact.subscribe("sc.nba.g1").await["op"], "ack");
    let mut wild = node.ws().await;
    subscribe_wildcard(&mut wild, "sc.nba.*").await;
    let churner = {
        let mut ws = node.ws().await;
        tokio::spawn(async move {
            for i in 0..30 {
                let pattern = if i % 2 == 0 { "sc.>" } else { "sc.*.g1" };
                let r = ws.subscribe(pattern).await;
                assert_eq!(r["op"], "ack", "{r}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert_eq!(ws.unsubscribe(pattern).await["op"], "ack");
            }
        })
    };
    raw_publish_paced(&redis, "sc.nba.g1", COUNT, Duration::from_secs(2)).await;
    churner.await.expect("churner");
    let want: Vec<Value> = (0..COUNT).map(|i| json!(i)).collect();
    for (who, ws) in [("by name", &mut exact), ("sc.nba.*", &mut wild)] {
        let got: Vec<Value> = drain(ws, Duration::from_secs(1))
            .await
            .into_iter()
            .map(|m| m.2["i"].clone())
            .collect();
        assert_eq!(got.len(), want.len(), "{who}: every raw message once");
        assert_eq!(got, want, "{who}: in order");
    }
}
