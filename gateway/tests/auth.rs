//! Access control without JWTs: HTTP API keys (full and scoped), and what anonymous WebSocket
//! clients may do. JWTs are in jwt.rs.

mod common;

use common::{HttpClient, RawWs, Server, TempFile, WsClient, tcp_connect};
use serde_json::json;

/// Extra request headers of one case.
type Headers = &'static [(&'static str, &'static str)];

#[tokio::test]
async fn api_keys_guard_http_publish_and_turn_anonymous_websockets_off() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__API_KEYS", "key-one,key-two")
        .start()
        .await;
    let mut http = HttpClient::connect(server.addr).await;
    let cases: [(&str, Headers, u16); 5] = [
        ("no key", &[], 401),
        ("wrong key", &[("authorization", "Bearer nope")], 401),
        (
            "not bearer",
            &[("authorization", "Basic a2V5LW9uZQ==")],
            401,
        ),
        ("first key", &[("authorization", "Bearer key-one")], 200),
        ("second key", &[("authorization", "Bearer key-two")], 200),
    ];
    for (what, headers, status) in cases {
        let r = http
            .request("POST", "/v1/publish/secure.t", headers, "1")
            .await;
        assert_eq!(r.status, status, "publish with {what}: {}", r.body);
        if status != 200 {
            assert_eq!(
                r.json()["code"],
                "forbidden",
                "publish with {what}: {}",
                r.body
            );
        }
        let r = http
            .request(
                "POST",
                "/v1/publish",
                headers,
                r#"{"messages":[{"topic":"secure.t","data":1}]}"#,
            )
            .await;
        assert_eq!(r.status, status, "batch publish with {what}: {}", r.body);
    }

    // Once a key is configured, anonymous WebSocket clients are refused at the upgrade.
    match RawWs::handshake(tcp_connect(server.addr).await, server.addr, "/ws").await {
        Ok(_) => panic!("anonymous upgrade accepted although keys are configured"),
        Err(r) => {
            assert_eq!(r.status, 401, "anonymous upgrade: {r:?}");
            assert_eq!(r.json()["code"], "forbidden", "anonymous upgrade: {r:?}");
        }
    }
    assert!(WsClient::try_connect(&server.ws_url()).await.is_err());
}

#[tokio::test]
async fn anonymous_subscribe_patterns_limit_topics() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__API_KEYS", "key-one")
        .env("PUBGATE__AUTH__ANONYMOUS", "true")
        .env("PUBGATE__AUTH__ANONYMOUS_SUBSCRIBE", "public.>,scores.*")
        .start()
        .await;
    let mut c = server.ws().await;
    c.subscribe("public.news", 1).await;
    c.subscribe("public.a.b.c", 2).await;
    c.subscribe("scores.nba", 3).await;
    for (id, topic) in [(4, "scores.nba.live"), (5, "private.x"), (6, "public")] {
        let r = c
            .request(&json!({"op":"subscribe","topic":topic,"id":id}))
            .await;
        assert_eq!(r["op"], "error", "subscribe {topic}: {r}");
        assert_eq!(r["code"], "forbidden", "subscribe {topic}: {r}");
        assert_eq!(r["id"], id, "subscribe {topic}: {r}");
    }
    // With a key configured, anonymous clients may not publish over WebSocket by default.
    let r = c
        .request(&json!({"op":"publish","topic":"public.news","data":1,"id":7}))
        .await;
    assert_eq!(r["code"], "forbidden", "anonymous WebSocket publish: {r}");
    assert_eq!(r["id"], 7, "{r}");

    // Allowed subscriptions work end to end.
    let mut http = HttpClient::connect(server.addr).await;
    let r = http
        .request(
            "POST",
            "/v1/publish/public.news",
            &[("authorization", "Bearer key-one")],
            r#"{"h":1}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = c.recv().await;
    assert_eq!(m["topic"], "public.news", "{m}");
    assert_eq!(m["data"], json!({"h":1}), "{m}");
    c.ping_pong(8).await;
}

/// The status of an HTTP publish with `key` as its bearer token (none without).
async fn publish_status(server: &Server, key: Option<&str>) -> u16 {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let r = HttpClient::connect(server.addr)
        .await
        .request("POST", "/v1/publish/env.keys", &headers, "1")
        .await;
    r.status
}

#[tokio::test]
async fn api_keys_from_the_environment_are_split_trimmed_and_kept_as_strings() {
    // Written the way people write lists: both keys work, without the space.
    let server = Server::builder()
        .env("PUBGATE__AUTH__API_KEYS", "k1, k2")
        .start()
        .await;
    for (key, status) in [
        (Some("k1"), 200),
        (Some("k2"), 200),
        (Some("k3"), 401),
        (Some("k1,"), 401),
        (None, 401),
    ] {
        assert_eq!(publish_status(&server, key).await, status, "key {key:?}");
    }
    drop(server);

    // A key of digits only is a string like any other (it used to stop start-up).
    let server = Server::builder()
        .env("PUBGATE__AUTH__API_KEYS", "12345")
        .start()
        .await;
    for (key, status) in [(Some("12345"), 200), (Some("1234"), 401), (None, 401)] {
        assert_eq!(publish_status(&server, key).await, status, "key {key:?}");
    }
    drop(server);

    // An empty value is no key at all (it used to be one empty key, refused at start-up): the node
    // is open, for HTTP publishers and anonymous WebSockets alike.
    let server = Server::builder()
        .env("PUBGATE__AUTH__API_KEYS", "")
        .start()
        .await;
    assert_eq!(publish_status(&server, None).await, 200);
    server.ws().await.ping_pong(1).await;
}

#[tokio::test]
async fn scoped_api_keys_publish_and_read_only_their_topics() {
    let config = TempFile::new(
        "scoped.toml",
        r#"
[auth]
api_keys = ["full-key"]

[[auth.scoped_api_keys]]
key = "scores-key"
publish = ["scores.>"]
subscribe = ["scores.*"]
"#,
    );
    let server = Server::builder()
        .args(["--config", &config.arg()])
        .start()
        .await;
    let mut http = HttpClient::connect(server.addr).await;
    let scoped: Headers = &[("authorization", "Bearer scores-key")];
    let full: Headers = &[("authorization", "Bearer full-key")];
    let cases: [(&str, &str, Headers, u16); 6] = [
        ("POST", "/v1/publish/scores.nba.live", scoped, 200),
        ("POST", "/v1/publish/news.today", scoped, 403),
        ("POST", "/v1/publish/news.today", full, 200),
        ("GET", "/v1/history/scores.nba", scoped, 200),
        ("GET", "/v1/history/scores.nba.live", scoped, 403),
        ("GET", "/v1/history/news.today", full, 200),
    ];
    for (method, path, headers, status) in cases {
        let r = http.request(method, path, headers, "1").await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        if status == 403 {
            assert_eq!(r.json()["code"], "forbidden", "{method} {path}: {}", r.body);
        }
    }
    let batch = r#"{"messages":[{"topic":"scores.a","data":1},{"topic":"news.b","data":2}]}"#;
    let r = http.request("POST", "/v1/publish", scoped, batch).await;
    assert_eq!(
        r.status, 403,
        "a batch with a topic outside the key: {}",
        r.body
    );
}
