//! Malformed client frames get `error` replies with the documented codes and the echoed `id`, and the
//! connection keeps working afterwards; the `ping` op; `data` nested past `limits.max_json_depth`
//! (WebSocket and HTTP).

mod common;

use common::{HttpClient, RECV_TIMEOUT, Server, WsClient, raw_fields};
use serde_json::{Value, json};

/// Sends `frame`, expects an `error` with `code` (and `id` when given), then proves the connection
/// still works with a ping.
async fn expect_error(
    client: &mut common::WsClient,
    frame: &str,
    code: &str,
    id: Option<Value>,
    ping_id: u64,
) {
    client.send_text(frame).await;
    let reply = client.recv().await;
    assert_eq!(reply["op"], "error", "reply to {frame:?}: {reply}");
    assert_eq!(reply["code"], code, "reply to {frame:?}: {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message, reply to {frame:?}: {reply}"
    );
    match id {
        Some(id) => assert_eq!(
            reply["id"], id,
            "id not echoed, reply to {frame:?}: {reply}"
        ),
        None => assert!(
            reply.get("id").is_none(),
            "no id was sent, none may come back; reply to {frame:?}: {reply}"
        ),
    }
    client.ping_pong(ping_id).await;
}

#[tokio::test]
async fn malformed_frames_get_error_replies_and_the_connection_survives() {
    let server = Server::start().await;
    let mut c = server.ws().await;

    let cases: Vec<(&str, &str, Option<Value>)> = vec![
        ("this is not json", "bad_request", None),
        ("{\"op\":\"subscribe\",", "bad_request", None),
        ("[1,2,3]", "bad_request", None),
        ("\"just a string\"", "bad_request", None),
        (r#"{"op":"fly","id":7}"#, "unknown_op", Some(json!(7))),
        (
            r#"{"op":"SUBSCRIBE","topic":"a","id":"s"}"#,
            "unknown_op",
            Some(json!("s")),
        ),
        (r#"{"id":8}"#, "bad_request", Some(json!(8))),
        (
            r#"{"op":"subscribe","id":9}"#,
            "bad_request",
            Some(json!(9)),
        ),
        (
            r#"{"op":"unsubscribe","id":10}"#,
            "bad_request",
            Some(json!(10)),
        ),
        (
            r#"{"op":"publish","topic":"chat.r1","id":11}"#,
            "bad_request",
            Some(json!(11)),
        ),
        (
            r#"{"op":"publish","data":1,"id":12}"#,
            "bad_request",
            Some(json!(12)),
        ),
        (
            r#"{"op":"subscribe","topic":7,"id":13}"#,
            "bad_request",
            None,
        ),
        (
            r#"{"op":"subscribe","topic":"a b","id":14}"#,
            "invalid_topic",
            Some(json!(14)),
        ),
        (
            r#"{"op":"subscribe","topic":"","id":15}"#,
            "invalid_topic",
            Some(json!(15)),
        ),
        (
            r#"{"op":"subscribe","topic":"a..b","id":16}"#,
            "invalid_topic",
            Some(json!(16)),
        ),
        (
            r#"{"op":"publish","topic":"bad/topic","data":1,"id":17}"#,
            "invalid_topic",
            Some(json!(17)),
        ),
        (
            r#"{"op":"unsubscribe","topic":"never.subscribed","id":{"k":[1]}}"#,
            "not_subscribed",
            Some(json!({"k":[1]})),
        ),
    ];
    let long_topic = format!(
        r#"{{"op":"subscribe","topic":"{}","id":18}}"#,
        "a".repeat(201)
    );
    let mut ping = 1000;
    for (frame, code, id) in &cases {
        expect_error(&mut c, frame, code, id.clone(), ping).await;
        ping += 1;
    }
    expect_error(&mut c, &long_topic, "invalid_topic", Some(json!(18)), ping).await;
    // An id longer than 256 bytes of JSON is refused and not echoed back.
    let long_id = format!(r#"{{"op":"ping","id":"{}"}}"#, "i".repeat(300));
    expect_error(&mut c, &long_id, "bad_request", None, ping + 1).await;

    // A binary frame is not a protocol message.
    c.send_binary(br#"{"op":"ping","id":1}"#).await;
    let reply = c.recv().await;
    assert_eq!(reply["op"], "error", "reply to a binary frame: {reply}");
    assert_eq!(
        reply["code"], "bad_request",
        "reply to a binary frame: {reply}"
    );
    c.ping_pong(2000).await;

    // Subscribing twice to the same topic is refused, the first subscription stays.
    c.subscribe("dup.topic", 1).await;
    let reply = c
        .request(&json!({"op":"subscribe","topic":"dup.topic","id":2}))
        .await;
    assert_eq!(reply["op"], "error", "second subscribe: {reply}");
    assert_eq!(reply["id"], 2, "second subscribe: {reply}");
    c.unsubscribe("dup.topic", 3).await;

    // After all that the connection still does real work.
    c.subscribe("still.works", 4).await;
    common::http_post(server.addr, "/v1/publish/still.works", "1").await;
    let msg = c.recv().await;
    assert_eq!(msg["op"], "message", "{msg}");
    assert_eq!(msg["data"], 1, "{msg}");
}

#[tokio::test]
async fn too_many_subscriptions_is_refused_and_frees_up_after_unsubscribe() {
    let server = Server::builder()
        .env("PUBGATE__LIMITS__MAX_SUBSCRIPTIONS", "2")
        .start()
        .await;
    let mut c = server.ws().await;
    c.subscribe("lim.a", 1).await;
    c.subscribe("lim.b", 2).await;
    let reply = c
        .request(&json!({"op":"subscribe","topic":"lim.c","id":3}))
        .await;
    assert_eq!(reply["op"], "error", "third subscribe: {reply}");
    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");
    assert_eq!(reply["id"], 3, "{reply}");
    c.ping_pong(4).await;

    // The refused subscription did not take effect: nothing published to lim.c arrives.
    common::http_post(server.addr, "/v1/publish/lim.c", "1").await;
    c.ping_pong(5).await;

    // The limit is per connection and counts current subscriptions only.
    let mut other = server.ws().await;
    other.subscribe("lim.c", 1).await;
    c.unsubscribe("lim.a", 6).await;
    c.subscribe("lim.c", 7).await;
}

#[tokio::test]
async fn ping_op_gets_pong_with_the_id_echoed_verbatim() {
    let server = Server::start().await;
    let mut c = server.ws().await;
    c.ping_pong(5).await;

    // The id is echoed as raw JSON, byte for byte, whatever its type.
    for id in [
        r#""req-1""#,
        r#"{"b":2, "a" : [1, 2.0]}"#,
        "-3.50",
        "[ ]",
        "true",
    ] {
        c.send_text(&format!(r#"{{"op":"ping","id":{id}}}"#)).await;
        let text = c.recv_text(common::RECV_TIMEOUT).await;
        let fields = raw_fields(&text);
        assert_eq!(
            fields.get("op").map(|v| v.get()),
            Some(r#""pong""#),
            "{text}"
        );
        assert_eq!(
            fields.get("id").map(|v| v.get()),
            Some(id),
            "id not echoed verbatim: {text}"
        );
    }

    // Without an id the pong has none.
    let reply = c.request(&json!({"op":"ping"})).await;
    assert_eq!(reply, json!({"op":"pong"}), "pong without id");
}

/// `data` nested `levels` deep in objects: `{"a":{"a":1}}` for 2.
fn nested_objects(levels: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
}

/// `data` nested `levels` deep in arrays: `[[]]` for 2.
fn nested_arrays(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

/// Reads the next `message` and checks its offset and that `data` came byte for byte (compared as
/// raw text: a deep `data` inside the frame may be deeper than the test's own parser accepts).
async fn expect_raw_message(sub: &mut WsClient, offset: u64, data: &str) {
    let text = sub.recv_text(RECV_TIMEOUT).await;
    let fields = raw_fields(&text);
    let field = |k: &str| fields.get(k).map(|v| v.get().to_string());
    assert_eq!(field("op").as_deref(), Some("\"message\""), "{text:.200}");
    assert_eq!(field("offset"), Some(offset.to_string()), "{text:.200}");
    assert_eq!(field("data").as_deref(), Some(data), "{text:.200}");
}

#[tokio::test]
async fn data_nested_deeper_than_max_json_depth_is_refused_on_every_publish_path() {
    const TOPIC: &str = "deep.t";
    const TOO_DEEP: &str = "data is nested deeper than limits.max_json_depth (128 levels)";
    let server = Server::start().await;
    let mut sub = server.ws().await;
    let base = sub.subscribe(TOPIC, 1).await["offset"]
        .as_u64()
        .expect("offset");
    let too_deep = [nested_objects(129), nested_arrays(30_000)];

    // WebSocket publish: an error reply with the id, and the connection stays open.
    let mut c = server.ws().await;
    for (id, data) in too_deep.iter().enumerate() {
        c.send_text(&format!(
            r#"{{"op":"publish","topic":"{TOPIC}","data":{data},"id":{id}}}"#
        ))
        .await;
        assert_eq!(
            c.recv().await,
            json!({"op":"error","id":id,"code":"bad_request","message":TOO_DEEP})
        );
    }
    c.ping_pong(10).await;

    // HTTP publish, single and batch (where one item refuses the whole batch).
    let mut http = HttpClient::connect(server.addr).await;
    for data in &too_deep {
        let r = http
            .post(&format!("/v1/publish/{TOPIC}"), data.clone())
            .await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json(), json!({"code":"bad_request","message":TOO_DEEP}));
    }
    let batch = format!(
        r#"{{"messages":[{{"topic":"{TOPIC}","data":1}},{{"topic":"{TOPIC}","data":{}}}]}}"#,
        too_deep[0]
    );
    let r = http.post("/v1/publish", batch).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"code":"bad_request","message":format!("messages[1]: {TOO_DEEP}")})
    );
    assert_eq!(
        server
            .metric("pubgate_client_errors_total{code=\"bad_request\"}")
            .await,
        2.0
    );

    // At the limit, and with brackets and escaped quotes inside strings (which do not nest), data
    // passes on every path; nothing refused above took an offset.
    let at_limit = nested_objects(128);
    let in_strings = format!(r#"{{"s":"\"{}","t":["]]]"]}}"#, "[{".repeat(300));
    c.send_text(&format!(
        r#"{{"op":"publish","topic":"{TOPIC}","data":{at_limit},"id":"ok"}}"#
    ))
    .await;
    assert_eq!(c.recv().await["offset"], json!(base + 1));
    assert_eq!(http.publish(TOPIC, in_strings.clone()).await.1, base + 2);
    let r = http
        .post(
            "/v1/publish",
            format!(r#"{{"messages":[{{"topic":"{TOPIC}","data":{at_limit}}}]}}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    expect_raw_message(&mut sub, base + 1, &at_limit).await;
    expect_raw_message(&mut sub, base + 2, &in_strings).await;
    expect_raw_message(&mut sub, base + 3, &at_limit).await;
}

#[tokio::test]
async fn max_json_depth_is_configurable() {
    let server = Server::builder()
        .env("PUBGATE__LIMITS__MAX_JSON_DEPTH", "2")
        .start()
        .await;
    let mut http = HttpClient::connect(server.addr).await;
    let r = http.post("/v1/publish/deep.cfg", "[[1],{\"a\":2}]").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http.post("/v1/publish/deep.cfg", "[[1],{\"a\":[]}]").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"code":"bad_request","message":"data is nested deeper than limits.max_json_depth (2 levels)"})
    );
}
