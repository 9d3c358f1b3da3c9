//! permessage-deflate (RFC 7692) end to end, over real sockets against the real binary: negotiation
//! answers, a deflate subscriber and a plain one on the same topic, the compressed frame built once
//! per message (not per subscriber), and compressed client messages (inflated under
//! `limits.max_message_size`, 1009 past it; RSV1 without negotiation is 1002).
//!
//! The client side is written by hand ([`RawWs`] plus flate2), so every byte on the wire is the
//! test's to check: tokio-tungstenite does not speak permessage-deflate.

mod common;

use common::{HttpClient, RECV_TIMEOUT, RawWs, Server, masked_frame, op, tcp_connect};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// What the node answers to every acceptable offer without `server_max_window_bits`.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The default `compression.min_size`.
const MIN_SIZE: usize = 256;

/// A client that offered permessage-deflate, and what the server answered.
struct DeflateClient {
    ws: RawWs,
    /// The `Sec-WebSocket-Extensions` of the 101, if any.
    agreed: Option<String>,
}

impl DeflateClient {
    async fn connect(server: &Server, offer: &str) -> DeflateClient {
        let stream = tcp_connect(server.addr).await;
        let headers = [("Sec-WebSocket-Extensions", offer)];
        let (ws, response) = RawWs::handshake_full(stream, server.addr, "/ws", &headers)
            .await
            .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.body));
        let agreed = response
            .header("sec-websocket-extensions")
            .map(str::to_string);
        DeflateClient { ws, agreed }
    }

    /// The next data message as JSON, and whether it came compressed.
    async fn recv(&mut self) -> (Value, bool) {
        loop {
            let f = self
                .ws
                .read_frame(RECV_TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("expected a message: {e:?}"));
            if matches!(f.opcode, op::PING | op::PONG) {
                assert!(!f.rsv1, "RSV1 on a control frame");
                continue;
            }
            assert_eq!(f.opcode, op::TEXT, "unexpected frame {f:?}");
            assert!(f.fin, "the server sends whole messages");
            let payload = if f.rsv1 {
                inflate(&f.payload)
            } else {
                f.payload
            };
            let v = serde_json::from_slice(&payload).unwrap_or_else(|e| {
                panic!("invalid JSON {:?}: {e}", String::from_utf8_lossy(&payload))
            });
            return (v, f.rsv1);
        }
    }

    /// Sends `text` as one compressed message, split into frames of `chunk` compressed bytes.
    async fn send_compressed(&mut self, text: &str, chunk: usize) {
        let z = deflate(text.as_bytes());
        let parts: Vec<&[u8]> = z.chunks(chunk.max(1)).collect();
        let mut wire = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let opcode = if i == 0 { op::TEXT } else { op::CONTINUATION };
            let mut f = masked_frame(i + 1 == parts.len(), opcode, part);
            if i == 0 {
                f[0] |= 0x40;
            }
            wire.extend(f);
        }
        self.ws.stream.write_all(&wire).await.expect("write");
    }
}

/// Raw DEFLATE with a sync flush and the `00 00 ff ff` tail stripped (RFC 7692 §7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync)
        .expect("deflate");
    assert!(c.total_in() as usize == data.len() && out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Inflates one server message with a fresh window (the server takes no context over).
fn inflate(z: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = z.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(z.len() * 4 + 1024);
    loop {
        let at = d.total_in() as usize;
        d.decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
            .expect("server sent invalid DEFLATE data");
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// A `data` value of about `len` bytes that compresses well (like a dashboard payload).
fn data_of(i: usize, len: usize) -> Value {
    let pad = "price bid ask volume ".repeat(len / 21 + 1);
    json!({"i": i, "pad": &pad[..len]})
}

/// A plain subscriber through the same raw client, so a compressed frame to it fails the read.
async fn plain_subscriber(server: &Server, topic: &str) -> RawWs {
    let mut ws = RawWs::connect(server.addr).await;
    let ack = ws.subscribe(topic, 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    ws
}

async fn subscribe(c: &mut DeflateClient, topic: &str) {
    let ack = c.ws.subscribe(topic, 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");
}

#[tokio::test]
async fn deflate_and_plain_subscribers_both_get_every_message_intact() {
    let server = Server::start().await;
    let mut z = DeflateClient::connect(&server, "permessage-deflate; client_max_window_bits").await;
    assert_eq!(z.agreed.as_deref(), Some(ANSWER));
    subscribe(&mut z, "scores.nba").await;
    let mut plain = plain_subscriber(&server, "scores.nba").await;

    let mut http = HttpClient::connect(server.addr).await;
    // Small messages (under compression.min_size) go out plain to everyone.
    let sizes = [600, 20, 5000, 1, MIN_SIZE + 50, 40_000];
    let mut offsets = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let (_, offset) = http
            .publish("scores.nba", data_of(i, len).to_string())
            .await;
        offsets.push(offset);
    }
    for (i, &len) in sizes.iter().enumerate() {
        let (m, compressed) = z.recv().await;
        assert_eq!(m["op"], "message");
        assert_eq!(m["offset"], offsets[i]);
        assert_eq!(m["data"], data_of(i, len), "message {i} via deflate");
        assert_eq!(compressed, len >= MIN_SIZE, "message {i} of {len} bytes");
        let p = plain.recv_json(RECV_TIMEOUT).await;
        assert_eq!(p["offset"], offsets[i]);
        assert_eq!(p["data"], data_of(i, len), "message {i} plain");
    }
    let large = sizes.iter().filter(|&&n| n >= MIN_SIZE).count() as f64;
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_deflate_frames_total"), large);
    assert_eq!(m.value("pubgate_deflate_deliveries_total"), large);
    assert!(m.value("pubgate_deflate_bytes_saved_total") > 40_000.0 * 0.5);
}

#[tokio::test]
async fn the_compressed_frame_is_built_once_per_message_not_per_subscriber() {
    const SUBSCRIBERS: usize = 5;
    const MESSAGES: usize = 12;
    let server = Server::start().await;
    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut c = DeflateClient::connect(&server, "permessage-deflate").await;
        assert_eq!(c.agreed.as_deref(), Some(ANSWER));
        subscribe(&mut c, "fan.out").await;
        clients.push(c);
    }
    // A wildcard subscriber gets the same compressed frame as the exact ones.
    let mut wild = DeflateClient::connect(&server, "permessage-deflate").await;
    subscribe(&mut wild, "fan.*").await;
    clients.push(wild);
    let mut plain = plain_subscriber(&server, "fan.out").await;
    let mut http = HttpClient::connect(server.addr).await;
    for i in 0..MESSAGES {
        http.publish("fan.out", data_of(i, 1000).to_string()).await;
    }
    for c in &mut clients {
        for i in 0..MESSAGES {
            let (m, compressed) = c.recv().await;
            assert!(compressed);
            assert_eq!(m["topic"], "fan.out");
            assert_eq!(m["data"], data_of(i, 1000));
        }
    }
    for i in 0..MESSAGES {
        assert_eq!(
            plain.recv_json(RECV_TIMEOUT).await["data"],
            data_of(i, 1000)
        );
    }
    // Compressed deliveries count frames held back for a subscriber whose subscribe was still being
    // acknowledged too; pubgate_messages_delivered_total does not (so it is not compared here).
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_deflate_frames_total"), MESSAGES as f64);
    assert_eq!(
        m.value("pubgate_deflate_deliveries_total"),
        (MESSAGES * (SUBSCRIBERS + 1)) as f64
    );
}

#[tokio::test]
async fn negotiation_answers_follow_rfc_7692() {
    let server = Server::start().await;
    let cases: &[(&str, Option<&str>)] = &[
        // A browser's offer; the client may limit its own window: nothing to answer about it.
        ("permessage-deflate; client_max_window_bits", Some(ANSWER)),
        (
            "permessage-deflate; client_max_window_bits=10",
            Some(ANSWER),
        ),
        // A client that wants context takeover both ways gets told not to take it over.
        ("permessage-deflate", Some(ANSWER)),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            Some(ANSWER),
        ),
        // A limit on the server's window is echoed (§7.1.2.1).
        (
            "permessage-deflate; server_max_window_bits=10",
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10",
            ),
        ),
        // Invalid offers are declined; the connection goes on without compression.
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits", None),
        ("permessage-deflate; client_max_window_bits=7", None),
        ("permessage-deflate; mem_level=9", None),
        (
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            None,
        ),
        ("permessage-deflate;;", None),
        ("x-webkit-deflate-frame", None),
        // Several offers: the first acceptable one wins.
        (
            "permessage-deflate; foo, permessage-deflate; client_max_window_bits",
            Some(ANSWER),
        ),
    ];
    for (offer, want) in cases {
        let c = DeflateClient::connect(&server, offer).await;
        assert_eq!(c.agreed.as_deref(), *want, "offer {offer:?}");
    }

    // Compressed frames are built with a 32 KiB window: a client that limited the server's window
    // gets its messages uncompressed (always allowed), and still may compress its own.
    let mut narrow =
        DeflateClient::connect(&server, "permessage-deflate; server_max_window_bits=9").await;
    subscribe(&mut narrow, "narrow").await;
    HttpClient::connect(server.addr)
        .await
        .publish("narrow", data_of(0, 2000).to_string())
        .await;
    let (m, compressed) = narrow.recv().await;
    assert!(!compressed);
    assert_eq!(m["data"], data_of(0, 2000));
    narrow
        .send_compressed(
            &json!({"op":"ping","id":7,"pad":"a".repeat(500)}).to_string(),
            64,
        )
        .await;
    assert_eq!(narrow.recv().await.0, json!({"op":"pong","id":7}));
}

#[tokio::test]
async fn compression_off_negotiates_nothing() {
    let server = Server::builder()
        .env("PUBGATE__COMPRESSION__ENABLED", "false")
        .start()
        .await;
    let c = DeflateClient::connect(&server, "permessage-deflate; client_max_window_bits").await;
    assert_eq!(c.agreed, None);
}

#[tokio::test]
async fn compressed_client_messages_are_inflated_under_the_size_limit() {
    const LIMIT: usize = 1024;
    let server = Server::builder()
        .env("PUBGATE__LIMITS__MAX_MESSAGE_SIZE", LIMIT.to_string())
        .start()
        .await;
    let mut c = DeflateClient::connect(&server, "permessage-deflate").await;
    assert_eq!(c.agreed.as_deref(), Some(ANSWER));
    // Exactly at the limit once inflated, whole and fragmented: read.
    let base = r#"{"op":"ping","id":1,"pad":""}"#.len();
    let at_limit = json!({"op":"ping","id":1,"pad":"x".repeat(LIMIT - base)}).to_string();
    assert_eq!(at_limit.len(), LIMIT);
    c.send_compressed(&at_limit, 1 << 20).await;
    assert_eq!(c.recv().await.0, json!({"op":"pong","id":1}));
    c.send_compressed(&at_limit.replace("\"id\":1", "\"id\":2"), 3)
        .await;
    assert_eq!(c.recv().await.0, json!({"op":"pong","id":2}));
    // A few dozen compressed bytes that inflate past the limit: 1009.
    let over = json!({"op":"ping","id":3,"pad":"x".repeat(64 * LIMIT)}).to_string();
    assert!(deflate(over.as_bytes()).len() < LIMIT / 4);
    c.send_compressed(&over, 1 << 20).await;
    c.ws.expect_close(1009, RECV_TIMEOUT).await;
}

#[tokio::test]
async fn rsv1_without_negotiation_closes_with_1002() {
    let server = Server::start().await;
    let mut ws = RawWs::connect(server.addr).await;
    let mut f = masked_frame(true, op::TEXT, &deflate(br#"{"op":"ping","id":1}"#));
    f[0] |= 0x40;
    ws.stream.write_all(&f).await.expect("write");
    ws.expect_close(1002, RECV_TIMEOUT).await;

    // With deflate, RSV1 on a control frame is still a violation (RFC 7692 §6.1).
    let mut c = DeflateClient::connect(&server, "permessage-deflate").await;
    let mut ping = masked_frame(true, op::PING, b"");
    ping[0] |= 0x40;
    c.ws.stream.write_all(&ping).await.expect("write");
    c.ws.expect_close(1002, RECV_TIMEOUT).await;
}
