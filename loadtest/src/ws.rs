//! The client side of one subscriber connection: the node it talks to, and (once
//! [`open`](crate::handshake::open) connected, upgraded and subscribed it) a receive loop that checks
//! every message and records its latency.
//!
//! The stream type is chosen once per connection ([`Ws`]); the receive loop is generic over it, so a
//! plain `ws://` connection runs exactly the code it ran before TLS existed.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fastwebsockets::{Frame, OpCode, WebSocket};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::deflate::DeflateWs;
use crate::scan::{Kind, scan, scan_raw};
use crate::stats::{Recorder, record};
use crate::tls::TlsClient;
use crate::track::{Seen, Tracker};

/// Nanoseconds since the Unix epoch: the clock publisher and subscribers share on one machine.
#[inline]
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One gateway node to talk to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Socket address (always loopback).
    pub addr: SocketAddr,
    /// WebSocket path.
    pub ws_path: String,
    /// TLS (`wss://`), with the name the certificate must carry.
    #[serde(skip)]
    pub tls: Option<TlsClient>,
    /// Offer permessage-deflate (`--deflate`); the upgrade fails unless the node accepts it.
    #[serde(default)]
    pub deflate: bool,
    /// Which server protocol the node speaks (`--protocol`).
    #[serde(default)]
    pub protocol: Protocol,
}

/// The pub/sub protocol of the servers under test.
///
/// The same payload (`{"t":…,"s":…,"pad":"…"}`, the same size) goes through either, so the two can be
/// compared message for message; only the envelope around it differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// pubgate: `GET /ws` then a `subscribe` frame and its ack; messages arrive in the JSON
    /// envelope with an offset; publishes are `POST /v1/publish/<topic>`.
    #[default]
    Pubgate,
    /// nginx + nchan: a WebSocket on `/sub/<topic>` (`nchan_subscriber websocket`) is subscribed by
    /// the upgrade itself, and each message arrives as a text frame holding exactly the published
    /// body (no offset: order and loss are checked by the payload's `s`); publishes are
    /// `POST /pub/<topic>` (`nchan_publisher`).
    Nchan,
}

impl Protocol {
    /// The path a subscriber of `topic` upgrades on (`ws_path` for pubgate).
    pub fn subscribe_path(self, ws_path: &str, topic: &str) -> String {
        match self {
            Protocol::Pubgate => ws_path.to_string(),
            Protocol::Nchan => format!("/sub/{topic}"),
        }
    }

    /// The path a message for `topic` is posted to.
    pub fn publish_path(self, topic: &str) -> String {
        match self {
            Protocol::Pubgate => format!("/v1/publish/{topic}"),
            Protocol::Nchan => format!("/pub/{topic}"),
        }
    }
}

impl Node {
    /// Parses `ws://127.0.0.1:8080/ws`, `http://localhost:8080` or `127.0.0.1:8080`. Only loopback
    /// addresses are accepted: this tool never sends load anywhere else.
    pub fn parse(url: &str) -> anyhow::Result<Node> {
        Node::parse_with(url, None)
    }

    /// Like [`Node::parse`], and `wss://` / `https://` URLs with TLS trusting the roots in the PEM
    /// file `tls_ca` (required for them).
    pub fn parse_with(url: &str, tls_ca: Option<&Path>) -> anyhow::Result<Node> {
        let mut nodes = Node::parse_all(&[url.to_string()], tls_ca)?;
        Ok(nodes.remove(0))
    }

    /// Parses several URLs, loading `tls_ca` once for all the TLS ones.
    pub fn parse_all(urls: &[String], tls_ca: Option<&Path>) -> anyhow::Result<Vec<Node>> {
        let mut config = None;
        let mut nodes = Vec::with_capacity(urls.len());
        for url in urls {
            let tls_rest = url
                .strip_prefix("wss://")
                .or_else(|| url.strip_prefix("https://"));
            let mut node = Node::parse_plain(tls_rest.unwrap_or(url), url)?;
            if let Some(rest) = tls_rest {
                let Some(ca) = tls_ca else {
                    bail!(
                        "{url}: a TLS URL needs --tls-ca FILE (the PEM root certificate that signed the server's certificate)"
                    );
                };
                if config.is_none() {
                    config = Some(crate::tls::client_config(ca)?);
                }
                let host = host_of(rest);
                let cfg = config.clone().context("TLS config")?;
                node.tls = Some(TlsClient::new(cfg, host).with_context(|| url.clone())?);
            }
            nodes.push(node);
        }
        Ok(nodes)
    }

    fn parse_plain(rest: &str, url: &str) -> anyhow::Result<Node> {
        let rest = rest
            .strip_prefix("ws://")
            .or_else(|| rest.strip_prefix("http://"))
            .unwrap_or(rest);
        if rest.contains("://") {
            bail!("{url}: only ws://, wss://, http:// and https:// (loopback) URLs are supported");
        }
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws"),
        };
        let path = if path == "/" { "/ws" } else { path };
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {hostport:?} (need host:port)"))?
            .find(|a| a.is_ipv4())
            .or_else(|| hostport.to_socket_addrs().ok()?.next())
            .with_context(|| format!("{url}: no address"))?;
        if !addr.ip().is_loopback() {
            bail!(
                "{url}: {} is not a loopback address; pubgate-loadtest only targets 127.0.0.0/8 or ::1",
                addr.ip()
            );
        }
        Ok(Node {
            addr,
            ws_path: path.to_string(),
            tls: None,
            deflate: false,
            protocol: Protocol::Pubgate,
        })
    }

    /// `host:port` for the Host header.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// The host of `host:port/path` (an IPv6 literal keeps its brackets).
fn host_of(rest: &str) -> &str {
    let hostport = rest.split('/').next().unwrap_or(rest);
    match hostport.rfind(':') {
        Some(i) if !hostport[i..].contains(']') => &hostport[..i],
        _ => hostport,
    }
}

/// Source addresses 127.0.0.2, 127.0.0.3, … (`count` of them) for spreading connections.
pub fn source_ips(count: usize) -> Vec<Ipv4Addr> {
    (0..count.clamp(1, 250))
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect()
}

pub use crate::handshake::{Conn, OpenError, OpenTiming, Ws, open};

/// How a receive loop ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    /// Told to stop (its task was aborted).
    Stopped,
    /// Its time was up (churn); closed cleanly or dropped.
    Left,
    /// The server closed with this code.
    ServerClosed(u16),
    /// The connection failed.
    Failed(String),
}

/// A subscriber's ordering records: gateway offsets (starting after the ack's offset) and, for
/// messages without an offset (raw publishes straight into the broker), the publisher's per-topic
/// sequence number `s` (starting at 0: the publisher's first message of a topic is `s = 1`).
#[derive(Debug, Clone)]
pub struct Order {
    /// Messages with an `offset`.
    pub offsets: Tracker,
    /// Messages without one, by `data.s`.
    pub seqs: Tracker,
}

impl Order {
    /// Records for a subscription acknowledged at `ack_offset`.
    pub fn new(ack_offset: u64) -> Self {
        Order {
            offsets: Tracker::new(ack_offset),
            seqs: Tracker::new(0),
        }
    }

    /// Records one message by its offset, or by `s` when it has none; `None` when it has neither.
    #[inline]
    pub fn observe(&mut self, offset: Option<u64>, seq: Option<u64>) -> Option<Seen> {
        match (offset, seq) {
            (Some(o), _) => Some(self.offsets.observe(o)),
            (None, Some(s)) => Some(self.seqs.observe(s)),
            (None, None) => None,
        }
    }
}

/// What a receive loop leaves behind.
pub struct Received {
    /// The ordering records.
    pub order: Order,
    /// How it ended.
    pub end: End,
}

/// How a connection leaves when its time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// Send a close frame first.
    Close,
    /// Just drop the socket.
    Drop,
}

/// Reads until the deadline (if any) or the server ends the connection, checking each message: the
/// topic, its offset (or `s` when there is none) against the subscriber's [`Order`], and its latency
/// (`t`) into the recorder. Without a deadline the loop is a plain read loop (no `select!`, no
/// timer) and is stopped by aborting its task.
pub async fn receive(
    conn: Conn,
    topic: Arc<str>,
    rec: Arc<Recorder>,
    until: Option<(tokio::time::Instant, Leave)>,
) -> Received {
    let order = Order::new(conn.ack_offset);
    let sub = Sub {
        topic: &topic,
        rec: &rec,
        raw: conn.raw,
    };
    match conn.ws {
        Ws::Plain(mut ws) => receive_on(&mut ws, order, sub, until).await,
        Ws::Tls(mut ws) => receive_on(&mut ws, order, sub, until).await,
        Ws::Deflate(mut ws) => receive_deflate(&mut ws, order, sub, until).await,
        Ws::DeflateTls(mut ws) => receive_deflate(&mut ws, order, sub, until).await,
    }
}

/// What a receive loop checks messages against.
#[derive(Clone, Copy)]
struct Sub<'a> {
    /// The topic it subscribed to.
    topic: &'a str,
    /// Where latency and counters go.
    rec: &'a Recorder,
    /// Messages are the bare published body (nchan), not pubgate's envelope.
    raw: bool,
}

/// [`receive_on`] for a permessage-deflate connection: every message is inflated, then checked
/// the same way.
async fn receive_deflate<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut DeflateWs<S>,
    mut order: Order,
    sub: Sub<'_>,
    until: Option<(tokio::time::Instant, Leave)>,
) -> Received {
    let deadline = until.map(|(at, _)| at);
    let end = loop {
        let read = match deadline {
            None => ws.read().await,
            Some(at) => match tokio::time::timeout_at(at, ws.read()).await {
                Ok(r) => r,
                Err(_) => {
                    if until.is_some_and(|(_, l)| l == Leave::Close) {
                        let close = 1000u16.to_be_bytes();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            ws.send(OpCode::Close, &close),
                        )
                        .await;
                    }
                    break End::Left;
                }
            },
        };
        let end = match read {
            Ok(m) => on_message(m.opcode, m.payload, m.wire_bytes, sub, &mut order),
            Err(e) => Some(End::Failed(e)),
        };
        if let Some(end) = end {
            break end;
        }
    };
    Received { order, end }
}

async fn receive_on<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    mut order: Order,
    sub: Sub<'_>,
    until: Option<(tokio::time::Instant, Leave)>,
) -> Received {
    let end = match until {
        None => loop {
            let frame = ws.read_frame().await;
            if let Some(end) = on_frame(frame, sub, &mut order) {
                break end;
            }
        },
        Some((at, leave)) => {
            let sleep = tokio::time::sleep_until(at);
            tokio::pin!(sleep);
            loop {
                let frame = tokio::select! {
                    biased;
                    f = ws.read_frame() => f,
                    _ = &mut sleep => {
                        if leave == Leave::Close {
                            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                ws.write_frame(Frame::close(1000, b"")).await?;
                                ws.flush().await
                            })
                            .await;
                        }
                        break End::Left;
                    }
                };
                if let Some(end) = on_frame(frame, sub, &mut order) {
                    break end;
                }
            }
        }
    };
    Received { order, end }
}

/// Handles one read result; `Some` when the connection is over.
#[inline]
fn on_frame(
    frame: Result<Frame<'_>, fastwebsockets::WebSocketError>,
    sub: Sub<'_>,
    order: &mut Order,
) -> Option<End> {
    let frame = match frame {
        Ok(f) => f,
        Err(e) => return Some(End::Failed(e.to_string())),
    };
    let wire_bytes = wire_len(frame.payload.len());
    on_message(frame.opcode, &frame.payload, wire_bytes, sub, order)
}

/// Bytes a server frame with a payload of `len` bytes takes on the wire (unmasked header included).
#[inline]
fn wire_len(len: usize) -> u64 {
    let header = match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    };
    (header + len) as u64
}

/// Checks one message (its payload inflated if it came compressed); `Some` when the connection is
/// over.
#[inline]
fn on_message(
    opcode: OpCode,
    payload: &[u8],
    wire_bytes: u64,
    sub: Sub<'_>,
    order: &mut Order,
) -> Option<End> {
    let (topic, rec) = (sub.topic, sub.rec);
    match opcode {
        OpCode::Text => {
            let now = now_ns();
            // nchan sends the body alone: the topic is the connection's, and there is no offset.
            let s = if sub.raw {
                scan_raw(payload, topic.as_bytes())
            } else {
                scan(payload)
            };
            match s.kind {
                Kind::Message => {
                    let seen = order.observe(s.offset, s.s);
                    let bad = s.topic != topic.as_bytes() || s.t.is_none() || seen.is_none();
                    rec.with(|sh| {
                        let c = &mut sh.counters;
                        c.received += 1;
                        c.wire_bytes += wire_bytes;
                        c.last_recv_ns = now;
                        match seen {
                            Some(Seen::Duplicate) => c.duplicates += 1,
                            Some(Seen::Late) => c.late += 1,
                            Some(Seen::Gap(n)) => c.gaps += n,
                            _ => {}
                        }
                        if bad {
                            c.bad_frames += 1;
                        }
                        if let Some(t) = s.t {
                            record(&mut sh.latency, now.saturating_sub(t));
                        }
                    });
                }
                Kind::Error => rec.with(|sh| sh.counters.errors += 1),
                _ => {}
            }
            None
        }
        OpCode::Close => {
            let code = if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                1005
            };
            Some(End::ServerClosed(code))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_refuses_non_loopback() {
        let n = Node::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(n.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(n.ws_path, "/ws");
        assert_eq!(Node::parse("127.0.0.1:9").unwrap().ws_path, "/ws");
        assert_eq!(Node::parse("http://127.0.0.5:9/").unwrap().ws_path, "/ws");
        assert!(Node::parse("ws://localhost:8080/ws").is_ok());
        assert!(Node::parse("ws://10.0.0.1:8080/ws").is_err());
        assert!(Node::parse("127.0.0.1").is_err());
        assert!(Node::parse("ftp://127.0.0.1:21").is_err());
    }

    #[test]
    fn tls_urls_need_a_ca() {
        let e = Node::parse("wss://127.0.0.1:8443/ws")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        let e = Node::parse_with(
            "wss://127.0.0.1:8443/ws",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("--tls-ca /nonexistent/ca.pem"),
            "{e:#}"
        );
        assert!(Node::parse("wss://10.0.0.1:8443/ws").is_err());
        assert_eq!(host_of("127.0.0.1:8443/ws"), "127.0.0.1");
        assert_eq!(host_of("localhost:8443"), "localhost");
        assert_eq!(host_of("[::1]:8443/ws"), "[::1]");
    }

    #[test]
    fn raw_messages_are_ordered_by_seq_from_zero() {
        // Acked at offset 500 (the topic's gateway offset), then raw publishes s = 1, 2, 2, 4.
        let mut o = Order::new(500);
        assert_eq!(o.observe(None, Some(1)), Some(Seen::InOrder));
        assert_eq!(o.observe(None, Some(2)), Some(Seen::InOrder));
        assert_eq!(o.observe(None, Some(2)), Some(Seen::Duplicate));
        assert_eq!(o.observe(None, Some(4)), Some(Seen::Gap(1)));
        assert_eq!(o.seqs.missing(4), 1);
        // A gateway message (with an offset) is tracked by offset, whatever its `s`.
        assert_eq!(o.observe(Some(501), Some(1)), Some(Seen::InOrder));
        assert_eq!(o.observe(None, None), None);
    }

    #[test]
    fn source_ips_start_at_two() {
        let ips = source_ips(3);
        assert_eq!(
            ips,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        assert_eq!(source_ips(0).len(), 1);
    }
}
