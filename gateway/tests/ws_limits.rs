//! WebSocket-level violations get the RFC 6455 close code that fits: 1009 for messages over
//! `limits.max_message_size` (whole or fragmented), 1007 for invalid UTF-8 in text.

mod common;

use std::time::Duration;

use common::{RECV_TIMEOUT, RawWs, Server, op};
use serde_json::json;

const LIMIT: usize = 1024;

async fn limited_server() -> Server {
    Server::builder()
        .env("PUBGATE__LIMITS__MAX_MESSAGE_SIZE", LIMIT.to_string())
        .start()
        .await
}

/// A valid `ping` request of exactly `len` bytes (padded with an extra field).
fn ping_of_len(id: u64, len: usize) -> String {
    let base = format!(r#"{{"op":"ping","id":{id},"pad":""}}"#);
    assert!(len >= base.len(), "{len} is shorter than the smallest ping");
    let s = format!(
        r#"{{"op":"ping","id":{id},"pad":"{}"}}"#,
        "x".repeat(len - base.len())
    );
    assert_eq!(s.len(), len);
    s
}

/// Reads the pong for `id` on a raw connection.
async fn expect_raw_pong(ws: &mut RawWs, id: u64) {
    let reply = ws.recv_json(RECV_TIMEOUT).await;
    assert_eq!(reply, json!({"op":"pong","id":id}), "expected pong {id}");
}

#[tokio::test]
async fn message_over_the_limit_closes_with_1009() {
    let server = limited_server().await;
    let mut c = server.ws().await;
    // Exactly at the limit is fine.
    c.send_text(&ping_of_len(1, LIMIT)).await;
    let reply = c.recv().await;
    assert_eq!(
        reply,
        json!({"op":"pong","id":1}),
        "a message of exactly the limit"
    );
    // One byte more closes the connection.
    c.send_text(&ping_of_len(2, LIMIT + 1)).await;
    let reason = c.expect_close(1009, RECV_TIMEOUT).await;
    assert!(!reason.is_empty(), "close 1009 without a reason");

    // Far over the limit, on a fresh connection.
    let mut c = server.ws().await;
    c.send_text(&ping_of_len(3, 16 * LIMIT)).await;
    c.expect_close(1009, RECV_TIMEOUT).await;

    // The server itself is fine.
    let mut c = server.ws().await;
    c.ping_pong(4).await;
}

#[tokio::test]
async fn fragmented_message_over_the_limit_closes_with_1009() {
    let server = limited_server().await;

    // Fragments adding up to exactly the limit are reassembled and handled.
    let mut ws = RawWs::connect(server.addr).await;
    let msg = ping_of_len(1, LIMIT);
    let (a, rest) = msg.as_bytes().split_at(300);
    let (b, c) = rest.split_at(400);
    ws.send_frames(&[
        (false, op::TEXT, a),
        (false, op::CONTINUATION, b),
        (true, op::CONTINUATION, c),
    ])
    .await;
    expect_raw_pong(&mut ws, 1).await;

    // Fragments each well under the limit but adding up to one byte over it close with 1009.
    let msg = ping_of_len(2, LIMIT + 1);
    let (a, rest) = msg.as_bytes().split_at(400);
    let (b, c) = rest.split_at(400);
    ws.send_frames(&[
        (false, op::TEXT, a),
        (false, op::CONTINUATION, b),
        (true, op::CONTINUATION, c),
    ])
    .await;
    let before = ws.expect_close(1009, RECV_TIMEOUT).await;
    assert!(
        before.iter().all(|f| f.opcode == op::PING),
        "nothing but pings may come before the close: {before:?}"
    );

    // Many small fragments that never end: the cap holds without a final fragment too.
    let mut ws = RawWs::connect(server.addr).await;
    ws.send_frame(false, op::BINARY, &[b'x'; 100]).await;
    for _ in 0..20 {
        ws.send_frame(false, op::CONTINUATION, &[b'x'; 100]).await;
    }
    ws.expect_close(1009, RECV_TIMEOUT).await;
}

#[tokio::test]
async fn invalid_utf8_in_text_closes_with_1007() {
    let server = limited_server().await;

    // In a single frame.
    let mut ws = RawWs::connect(server.addr).await;
    ws.send_frame(true, op::TEXT, b"{\"op\":\"ping\",\"id\":\"\xff\xfe\"}")
        .await;
    ws.expect_close(1007, RECV_TIMEOUT).await;

    // A multi-byte character split across fragments is valid...
    let mut ws = RawWs::connect(server.addr).await;
    let text = "{\"op\":\"ping\",\"id\":\"caf\u{e9}\"}";
    let split = text.find('\u{e9}').expect("é") + 1; // between the two bytes of é
    let (a, b) = text.as_bytes().split_at(split);
    ws.send_frames(&[(false, op::TEXT, a), (true, op::CONTINUATION, b)])
        .await;
    let reply = ws.recv_json(RECV_TIMEOUT).await;
    assert_eq!(
        reply,
        json!({"op":"pong","id":"caf\u{e9}"}),
        "split character"
    );

    // ...but an invalid sequence across fragments closes with 1007.
    ws.send_frames(&[
        (false, op::TEXT, b"{\"op\":\"ping\",\"id\":\"\xc3"),
        (true, op::CONTINUATION, b"(\"}"),
    ])
    .await;
    ws.expect_close(1007, RECV_TIMEOUT).await;

    // The connection is gone after the close: the server sends nothing more and closes TCP.
    let n = ws.expect_eof(Duration::from_secs(10), 1 << 20).await;
    assert!(n < 1024, "{n} bytes after the close frame");
}
