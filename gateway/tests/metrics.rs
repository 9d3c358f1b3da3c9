//! `/metrics` moves with what the node does: connections, subscriptions, published and delivered
//! messages; and the probes `/healthz` and `/readyz`.

mod common;

use std::time::Duration;

use common::{HttpClient, Server, http_get};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_track_connections_subscriptions_and_messages() {
    let server = Server::start().await;
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_connections"), 0.0, "no client yet");
    assert_eq!(m.value("pubgate_subscriptions"), 0.0, "no client yet");
    assert_eq!(m.value("pubgate_messages_delivered_total"), 0.0);
    assert_eq!(m.sum("pubgate_messages_published_total"), 0.0);
    assert_eq!(m.value("pubgate_ready"), 1.0, "a fresh node is ready");

    // Connections go up...
    let mut a = server.ws().await;
    let mut b = server.ws().await;
    server
        .wait_metric("pubgate_connections", WAIT, |v| v == 2.0)
        .await;
    assert_eq!(
        server.metrics().await.value("pubgate_connections_total"),
        2.0,
        "connections accepted"
    );

    // ...subscriptions follow subscribe (the ack means the subscription is in place)...
    a.subscribe("m.one", 1).await;
    b.subscribe("m.one", 1).await;
    b.subscribe("m.two", 2).await;
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_subscriptions"), 3.0, "three subscriptions");
    assert_eq!(
        m.value("pubgate_topics"),
        2.0,
        "two topics with subscribers"
    );

    // ...published and delivered count each message (fan-out is done when the publish answers).
    let mut http = HttpClient::connect(server.addr).await;
    for i in 0..10 {
        http.publish("m.one", format!("{i}")).await;
    }
    http.publish("m.two", "1").await;
    http.publish("m.nobody", "1").await;
    // Received first: a subscriber whose ack just arrived may still be turning live, and the
    // messages it held meanwhile are queued (and counted) a moment after the publish answered.
    for _ in 0..10 {
        assert_eq!(a.recv().await["op"], "message");
    }
    for _ in 0..11 {
        assert_eq!(b.recv().await["op"], "message");
    }
    let m = server.metrics().await;
    assert_eq!(
        m.value("pubgate_messages_published_total{transport=\"http\"}"),
        12.0,
        "HTTP publishes"
    );
    assert_eq!(
        m.value("pubgate_messages_delivered_total"),
        21.0,
        "10 messages x 2 subscribers + 1 x 1 (+ 0 for a topic nobody wants)"
    );
    b.send_json(&json!({"op":"publish","topic":"m.two","data":{"x":1},"id":9}))
        .await;
    // b is subscribed to m.two itself: its copy is queued before the publish's ack.
    assert_eq!(b.recv().await["op"], "message");
    let ack = b.recv().await;
    assert_eq!(ack["op"], "ack", "WebSocket publish: {ack}");
    assert_eq!(ack["id"], 9, "WebSocket publish: {ack}");
    let m = server.metrics().await;
    assert_eq!(
        m.value("pubgate_messages_published_total{transport=\"ws\"}"),
        1.0,
        "WebSocket publishes"
    );
    assert_eq!(
        m.sum("pubgate_messages_published_total"),
        13.0,
        "all publishes"
    );
    assert_eq!(m.value("pubgate_messages_delivered_total"), 22.0);

    // An error reply is counted by code.
    a.send_text("not json").await;
    assert_eq!(a.recv().await["code"], "bad_request");
    let m = server.metrics().await;
    assert!(
        m.value("pubgate_client_errors_total{code=\"bad_request\"}") >= 1.0,
        "client errors by code"
    );

    // Unsubscribe takes a subscription away at once.
    b.unsubscribe("m.two", 3).await;
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_subscriptions"), 2.0, "after unsubscribe");
    assert_eq!(
        m.value("pubgate_topics"),
        1.0,
        "m.two has no subscriber left"
    );

    // A client that leaves takes its connection and its subscriptions with it.
    drop(a);
    server
        .wait_metric("pubgate_connections", WAIT, |v| v == 1.0)
        .await;
    server
        .wait_metric("pubgate_subscriptions", WAIT, |v| v == 1.0)
        .await;
    b.send_close(1000).await;
    b.expect_close(1000, WAIT).await;
    server
        .wait_metric("pubgate_connections", WAIT, |v| v == 0.0)
        .await;
    server
        .wait_metric("pubgate_subscriptions", WAIT, |v| v == 0.0)
        .await;
    server
        .wait_metric("pubgate_topics", WAIT, |v| v == 0.0)
        .await;

    // Process metrics are there too, under the node's prefix like every other name.
    let m = server.metrics().await;
    assert!(
        m.value("pubgate_process_resident_memory_bytes") > 0.0,
        "process metrics missing"
    );
}

#[tokio::test]
async fn probes_answer_on_the_main_listener_and_metrics_move_to_the_metrics_listener() {
    let server = Server::start().await;
    let h = http_get(server.addr, "/healthz").await;
    assert_eq!(h.status, 200, "/healthz: {}", h.body);
    let r = http_get(server.addr, "/readyz").await;
    assert_eq!(r.status, 200, "/readyz: {}", r.body);
    assert_eq!(r.json()["ready"], true, "/readyz: {}", r.body);
    let m = http_get(server.addr, "/metrics").await;
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "metrics content type: {:?}",
        m.header("content-type")
    );

    // With a separate metrics listener, /metrics is served there and no longer on the public port.
    let server = Server::builder().metrics_listener().start().await;
    let private = server.metrics_addr.expect("metrics listener");
    assert_eq!(http_get(private, "/metrics").await.status, 200);
    assert_eq!(http_get(private, "/healthz").await.status, 200);
    assert_eq!(http_get(private, "/readyz").await.status, 200);
    assert_eq!(
        http_get(server.addr, "/metrics").await.status,
        404,
        "/metrics must not be public when a metrics listener is set"
    );
    assert_eq!(
        http_get(private, "/v1/publish/x").await.status,
        404,
        "the metrics listener serves no API"
    );
}
