//! A well-behaved WebSocket client (tokio-tungstenite) with JSON helpers: [`WsClient`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::RECV_TIMEOUT;

/// What a [`WsClient`] read next.
#[derive(Debug)]
pub enum Event {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A server ping (tungstenite answers it by itself).
    Ping,
    /// A pong.
    Pong,
    /// A close frame: code and reason (`None`: a close frame without a code).
    Close(Option<(u16, String)>),
    /// The stream ended or failed without a close frame.
    Ended(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// A WebSocket client for the pub/sub protocol.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Server pings seen so far.
    pub pings: usize,
}

impl WsClient {
    /// Connects to `ws://addr/ws`; panics on failure.
    pub async fn connect(addr: SocketAddr) -> WsClient {
        let url = format!("ws://{addr}/ws");
        match tokio::time::timeout(RECV_TIMEOUT, WsClient::try_connect(&url)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("WebSocket connect to {url} failed: {e}"),
            Err(_) => panic!("WebSocket connect to {url} timed out"),
        }
    }

    /// Connects to a URL.
    pub async fn try_connect(url: &str) -> Result<WsClient, tungstenite::Error> {
        let (ws, _response) = tokio_tungstenite::connect_async(url).await?;
        Ok(WsClient { ws, pings: 0 })
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::binary(data.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("send binary: {e}"));
    }

    /// Sends a close frame with `code` (does not wait for the reply).
    pub async fn send_close(&mut self, code: u16) {
        let frame = tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: "".into(),
        };
        self.ws
            .send(Message::Close(Some(frame)))
            .await
            .unwrap_or_else(|e| panic!("send close: {e}"));
    }

    /// Reads the next event, waiting at most `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Event {
        match tokio::time::timeout(timeout, self.ws.next()).await {
            Err(_) => Event::Timeout,
            Ok(None) => Event::Ended("stream ended".into()),
            Ok(Some(Err(e))) => Event::Ended(e.to_string()),
            Ok(Some(Ok(m))) => match m {
                Message::Text(t) => Event::Text(t.as_str().to_owned()),
                Message::Binary(b) => Event::Binary(b.to_vec()),
                Message::Ping(_) => {
                    self.pings += 1;
                    Event::Ping
                }
                Message::Pong(_) => Event::Pong,
                Message::Close(c) => {
                    Event::Close(c.map(|c| (u16::from(c.code), c.reason.as_str().to_owned())))
                }
                Message::Frame(_) => Event::Ended("unexpected raw frame".into()),
            },
        }
    }

    /// Next text message within `timeout`, skipping pings and pongs; panics on anything else.
    pub async fn recv_text(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Text(t) => return t,
                Event::Ping | Event::Pong => continue,
                Event::Timeout => panic!("no text message within {timeout:?}"),
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Next text message parsed as JSON (see [`WsClient::recv_text`]).
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        let text = self.recv_text(timeout).await;
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"))
    }

    /// Next text message within [`RECV_TIMEOUT`], as JSON.
    pub async fn recv(&mut self) -> Value {
        self.recv_json(RECV_TIMEOUT).await
    }

    /// Sends `request` and returns the next message.
    pub async fn request(&mut self, request: &Value) -> Value {
        self.send_json(request).await;
        self.recv().await
    }

    /// Reads until a close frame arrives (skipping anything else) and asserts its code; returns the
    /// reason. Panics if the connection ends without one or nothing comes within `timeout`.
    pub async fn expect_close(&mut self, code: u16, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut skipped = 0usize;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Event::Close(Some((c, reason))) => {
                    assert_eq!(c, code, "close code (reason {reason:?})");
                    return reason;
                }
                Event::Close(None) => panic!("close frame without a code, expected {code}"),
                Event::Ended(e) => {
                    panic!("connection ended without a close frame (expected {code}): {e}")
                }
                Event::Timeout => panic!(
                    "no close frame within {timeout:?} (expected {code}; {skipped} other frames seen)"
                ),
                _ => skipped += 1,
            }
        }
    }

    /// Asserts that no text or binary message arrives for `window` (pings are fine).
    pub async fn expect_silence(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next_event(left).await {
                Event::Timeout => return,
                Event::Ping | Event::Pong => continue,
                other => panic!("expected silence for {window:?}, got {other:?}"),
            }
        }
    }

    /// Subscribes and asserts the ack (`op`, echoed `id`, `topic`, an `epoch` and an `offset`);
    /// returns it.
    pub async fn subscribe(&mut self, topic: &str, id: u64) -> Value {
        let ack = self
            .request(&serde_json::json!({"op": "subscribe", "topic": topic, "id": id}))
            .await;
        assert_eq!(ack["op"], "ack", "subscribe {topic}: {ack}");
        assert_eq!(ack["id"], id, "subscribe {topic}: {ack}");
        assert_eq!(ack["topic"], topic, "subscribe {topic}: {ack}");
        assert!(
            ack["epoch"].is_string(),
            "subscribe ack without epoch: {ack}"
        );
        assert!(
            ack["offset"].is_u64(),
            "subscribe ack without offset: {ack}"
        );
        ack
    }

    /// Unsubscribes and asserts the ack.
    pub async fn unsubscribe(&mut self, topic: &str, id: u64) -> Value {
        let ack = self
            .request(&serde_json::json!({"op": "unsubscribe", "topic": topic, "id": id}))
            .await;
        assert_eq!(ack["op"], "ack", "unsubscribe {topic}: {ack}");
        assert_eq!(ack["id"], id, "unsubscribe {topic}: {ack}");
        assert_eq!(ack["topic"], topic, "unsubscribe {topic}: {ack}");
        ack
    }

    /// Sends the `ping` op and asserts that the very next message is its `pong`.
    pub async fn ping_pong(&mut self, id: u64) {
        let pong = self
            .request(&serde_json::json!({"op": "ping", "id": id}))
            .await;
        assert_eq!(
            pong,
            serde_json::json!({"op": "pong", "id": id}),
            "ping {id}"
        );
    }
}

/// The top-level fields of a server message as raw JSON text, exactly as sent (for byte-identity
/// checks of `data` and `id`).
pub fn raw_fields(text: &str) -> BTreeMap<String, Box<RawValue>> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON object {text:?}: {e}"))
}
