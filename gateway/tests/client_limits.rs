//! Limits that keep one client from hurting the others: the per-connection message rate.

mod common;

use std::time::Duration;

use common::{HttpClient, Server};
use serde_json::json;

#[tokio::test]
async fn a_flooding_client_gets_rate_limited_then_closed_and_others_are_unaffected() {
    let server = Server::builder()
        .env("PUBGATE__LIMITS__MESSAGE_RATE", "10")
        .env("PUBGATE__LIMITS__MESSAGE_BURST", "20")
        .start()
        .await;
    let mut calm = server.ws().await;
    calm.subscribe("calm.t", 1).await;

    let mut flood = server.ws().await;
    for i in 0..100u64 {
        flood.send_json(&json!({"op":"ping","id":i})).await;
    }
    // Replies come in order: pongs for the burst, then rate_limited errors, then the close.
    let (mut pongs, mut limited) = (0, 0);
    let close = loop {
        match flood.next_event(Duration::from_secs(10)).await {
            common::Event::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                match v["op"].as_str() {
                    Some("pong") => {
                        assert_eq!(limited, 0, "a pong after a rate_limited error: {v}");
                        pongs += 1;
                    }
                    Some("error") => {
                        assert_eq!(v["code"], "rate_limited", "{v}");
                        limited += 1;
                    }
                    _ => panic!("unexpected frame {v}"),
                }
            }
            common::Event::Close(c) => break c,
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert_eq!(close.map(|(code, _)| code), Some(1008), "close frame");
    assert!(pongs >= 20, "the burst is answered: {pongs} pongs");
    assert!(limited >= 1, "errors before the close: {limited}");
    assert_eq!(
        server.metric("pubgate_rate_limit_disconnects_total").await,
        1.0
    );

    // The other client was not touched.
    calm.ping_pong(2).await;
    let mut http = HttpClient::connect(server.addr).await;
    http.publish("calm.t", "7").await;
    let m = calm.recv().await;
    assert_eq!(
        (m["topic"].clone(), m["data"].clone()),
        (json!("calm.t"), json!(7)),
        "{m}"
    );
}
