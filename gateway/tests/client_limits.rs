//! Limits that keep one client from hurting the others: the per-connection message rate and the
//! connections per client address (also behind a trusted proxy).

mod common;

use std::time::Duration;

use common::{HttpClient, RawWs, Server, tcp_connect, wait_until};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Upgrades with `X-Forwarded-For: xff` (when given); the open connection, or the refusal status.
async fn open(server: &Server, xff: Option<&str>) -> Result<RawWs, u16> {
    let headers: Vec<(&str, &str)> = xff.map(|v| ("X-Forwarded-For", v)).into_iter().collect();
    RawWs::handshake_with(tcp_connect(server.addr).await, server.addr, "/ws", &headers)
        .await
        .map_err(|r| {
            assert_eq!(r.json()["code"], "rate_limited", "{r:?}");
            r.status
        })
}

#[tokio::test]
async fn connections_per_address_are_limited_and_forwarded_for_is_trusted_only_from_proxies() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__MAX_CONNECTIONS_PER_IP", "2")
        .start()
        .await;
    let first = open(&server, None).await.expect("first");
    let _second = open(&server, None).await.expect("second");
    assert_eq!(
        open(&server, None).await.err(),
        Some(429),
        "third from 127.0.0.1"
    );
    // Without trusted proxies the header is the client's own word and changes nothing.
    assert_eq!(
        open(&server, Some("3.3.3.3")).await.err(),
        Some(429),
        "spoofed header"
    );
    drop(first);
    wait_until("a slot is given back", Duration::from_secs(5), || async {
        open(&server, None).await.is_ok()
    })
    .await;

    let proxied = Server::builder()
        .env("PUBGATE__SERVER__MAX_CONNECTIONS_PER_IP", "1")
        .env("PUBGATE__SERVER__TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/8")
        .start()
        .await;
    let _a = open(&proxied, Some("1.1.1.1")).await.expect("1.1.1.1");
    assert_eq!(
        open(&proxied, Some("1.1.1.1")).await.err(),
        Some(429),
        "1.1.1.1 again"
    );
    // The right-most address that is not a trusted proxy counts; what the client wrote further
    // left does not.
    assert_eq!(
        open(&proxied, Some("9.9.9.9, 1.1.1.1, 10.0.0.3"))
            .await
            .err(),
        Some(429),
        "1.1.1.1 behind two proxies"
    );
    let _b = open(&proxied, Some("2.2.2.2")).await.expect("2.2.2.2");
    let _c = open(&proxied, None).await.expect("the proxy itself, once");
    assert_eq!(
        open(&proxied, None).await.err(),
        Some(429),
        "the proxy itself, twice"
    );
}

#[tokio::test]
async fn request_heads_over_max_header_bytes_get_431() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__MAX_HEADER_BYTES", "8192")
        .start()
        .await;
    let small = "a".repeat(4000);
    assert!(
        open_with(&server, &[("X-Padding", &small)]).await.is_ok(),
        "4 KB header"
    );
    let big = "a".repeat(10_000);
    let refused = open_with(&server, &[("X-Padding", &big)]).await;
    assert_eq!(refused.err(), Some(431), "10 KB header");
}

async fn open_with(server: &Server, headers: &[(&str, &str)]) -> Result<RawWs, u16> {
    RawWs::handshake_with(tcp_connect(server.addr).await, server.addr, "/ws", headers)
        .await
        .map_err(|r| r.status)
}

/// A connection that starts with a PROXY protocol `header`, then upgrades.
async fn open_proxied(server: &Server, header: &[u8]) -> Result<RawWs, u16> {
    let mut tcp = tcp_connect(server.addr).await;
    tcp.write_all(header).await.expect("write PROXY header");
    RawWs::handshake_with(tcp, server.addr, "/ws", &[])
        .await
        .map_err(|r| r.status)
}

fn proxy_v2_tcp4(src: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(src);
    h.extend([127, 0, 0, 1, 0x30, 0x39, 0x1f, 0x90]);
    h
}

#[tokio::test]
async fn proxy_protocol_names_the_client_for_the_per_address_limit() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__PROXY_PROTOCOL", "true")
        .env("PUBGATE__SERVER__TRUSTED_PROXIES", "127.0.0.1")
        .env("PUBGATE__SERVER__MAX_CONNECTIONS_PER_IP", "1")
        .start()
        .await;
    let v1 = b"PROXY TCP4 1.1.1.1 127.0.0.1 40000 8080\r\n";
    let _a = open_proxied(&server, v1).await.expect("1.1.1.1 over v1");
    assert_eq!(
        open_proxied(&server, v1).await.err(),
        Some(429),
        "1.1.1.1 again"
    );
    let _b = open_proxied(&server, &proxy_v2_tcp4([2, 2, 2, 2]))
        .await
        .expect("2.2.2.2 over v2");
    assert_eq!(
        open_proxied(&server, &proxy_v2_tcp4([1, 1, 1, 1]))
            .await
            .err(),
        Some(429),
        "1.1.1.1 over v2"
    );

    // Without a header the connection is closed before anything is answered.
    let mut tcp = tcp_connect(server.addr).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    // Closed (EOF, or a reset since the request was never read), not timed out, and nothing said.
    assert!(read.is_ok(), "the connection is closed");
    assert!(
        answer.is_empty(),
        "no answer without a PROXY header: {answer:?}"
    );
}
