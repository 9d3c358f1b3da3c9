//! The client side of one subscriber connection: TCP connect from a chosen loopback source address,
//! a hand-written HTTP/1.1 upgrade (no hyper task per connection), subscribe, then a receive loop
//! that checks every message and records its latency.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::scan::{Kind, scan};
use crate::stats::{Recorder, record};
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
}

impl Node {
    /// Parses `ws://127.0.0.1:8080/ws`, `http://localhost:8080` or `127.0.0.1:8080`. Only loopback
    /// addresses are accepted: this tool never sends load anywhere else.
    pub fn parse(url: &str) -> anyhow::Result<Node> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .unwrap_or(url);
        if rest.contains("://") {
            bail!("{url}: only ws:// and http:// (plain, loopback) URLs are supported");
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
        })
    }

    /// `host:port` for the Host header.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// Source addresses 127.0.0.2, 127.0.0.3, … (`count` of them) for spreading connections.
pub fn source_ips(count: usize) -> Vec<Ipv4Addr> {
    (0..count.clamp(1, 250))
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
        .collect()
}

/// Why opening a connection failed; the label is what the report counts.
#[derive(Debug)]
pub struct OpenError {
    /// Short stable label: `connect_refused`, `timeout_connect`, `http_503`, …
    pub label: String,
    /// Detail for logs.
    pub detail: String,
}

impl OpenError {
    fn new(label: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        OpenError {
            label: label.into(),
            detail: detail.to_string(),
        }
    }
}

fn io_label(stage: &str, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let kind = match e.kind() {
        K::ConnectionRefused => "refused",
        K::ConnectionReset => "reset",
        K::AddrInUse | K::AddrNotAvailable => "no_port",
        K::TimedOut => "timeout",
        K::UnexpectedEof => "eof",
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "fd_limit",
            _ => "io",
        },
    };
    format!("{stage}_{kind}")
}

/// Timings of one connection's setup, in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenTiming {
    /// TCP connect.
    pub tcp_ns: u64,
    /// TCP connect + HTTP upgrade (101 received).
    pub upgrade_ns: u64,
    /// Until the subscribe ack arrived (the whole setup).
    pub total_ns: u64,
}

/// An open, subscribed connection.
pub struct Conn {
    /// The WebSocket.
    pub ws: WebSocket<TcpStream>,
    /// The ack's offset: the first message expected is the next one.
    pub ack_offset: u64,
    /// How long the setup took.
    pub timing: OpenTiming,
}

/// The well-known key/accept pair of RFC 6455 §1.3: the server's accept must match it.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

async fn tcp_connect(node: &Node, src: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let socket = match node.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let (Some(ip), SocketAddr::V4(_)) = (src, node.addr) {
        // Let connect() pick the port per 4-tuple instead of bind() reserving one per address:
        // each source address then gives a full ephemeral range towards each server port.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket fd we own, with a pointer to a live c_int.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(node.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the upgrade request and reads exactly the response head (peek, then read that many bytes,
/// so no frame byte is taken from the stream). Returns the HTTP status.
async fn upgrade(
    stream: &mut TcpStream,
    node: &Node,
    extra_headers: &str,
) -> Result<(), OpenError> {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n",
        node.ws_path,
        node.host()
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| OpenError::new(io_label("upgrade", &e), e))?;
    let mut buf = [0u8; 2048];
    let mut seen = 0;
    let head_len = loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|e| OpenError::new(io_label("upgrade", &e), e))?;
        if n == 0 {
            return Err(OpenError::new(
                "upgrade_eof",
                "server closed during upgrade",
            ));
        }
        if let Some(i) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if n == buf.len() {
            return Err(OpenError::new("upgrade_bad", "response head too large"));
        }
        if n == seen {
            // Part of the head is here and the rest is not: do not spin on peek.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    };
    let mut head = vec![0u8; head_len];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| OpenError::new(io_label("upgrade", &e), e))?;
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 101 {
        return Err(OpenError::new(
            format!("http_{status}"),
            head.lines().next().unwrap_or(""),
        ));
    }
    let accept_ok = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == WS_ACCEPT
        })
    });
    if !accept_ok {
        return Err(OpenError::new(
            "upgrade_bad_accept",
            "wrong Sec-WebSocket-Accept",
        ));
    }
    Ok(())
}

/// Connects, upgrades and subscribes to `topic`; returns once the ack arrived.
pub async fn open(
    node: &Node,
    src: Option<Ipv4Addr>,
    topic: &str,
    timeout: Duration,
) -> Result<Conn, OpenError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let in_time = |stage: &'static str| {
        move |_| OpenError::new(format!("timeout_{stage}"), format!("{stage} timed out"))
    };
    let mut stream = tokio::time::timeout_at(deadline, tcp_connect(node, src))
        .await
        .map_err(in_time("connect"))?
        .map_err(|e| OpenError::new(io_label("connect", &e), e))?;
    let tcp_ns = started.elapsed().as_nanos() as u64;
    tokio::time::timeout_at(deadline, upgrade(&mut stream, node, ""))
        .await
        .map_err(in_time("upgrade"))??;
    let upgrade_ns = started.elapsed().as_nanos() as u64;
    let mut ws = WebSocket::after_handshake(stream, Role::Client);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    ws.set_max_message_size(16 << 20);
    let sub = format!(r#"{{"op":"subscribe","topic":"{topic}","id":1}}"#);
    let ack = async {
        ws.write_frame(Frame::text(Payload::Owned(sub.into_bytes())))
            .await
            .map_err(|e| OpenError::new("subscribe_write", e))?;
        loop {
            let frame = ws
                .read_frame()
                .await
                .map_err(|e| OpenError::new("subscribe_read", e))?;
            match frame.opcode {
                OpCode::Text => {
                    let s = scan(&frame.payload);
                    match s.kind {
                        Kind::Ack => return Ok(s.offset.unwrap_or(0)),
                        Kind::Error => {
                            return Err(OpenError::new(
                                "subscribe_error",
                                String::from_utf8_lossy(&frame.payload),
                            ));
                        }
                        _ => {}
                    }
                }
                OpCode::Close => {
                    return Err(OpenError::new("subscribe_closed", "server closed"));
                }
                _ => {}
            }
        }
    };
    let ack_offset = tokio::time::timeout_at(deadline, ack)
        .await
        .map_err(in_time("subscribe"))??;
    Ok(Conn {
        ws,
        ack_offset,
        timing: OpenTiming {
            tcp_ns,
            upgrade_ns,
            total_ns: started.elapsed().as_nanos() as u64,
        },
    })
}

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
    mut conn: Conn,
    topic: Arc<str>,
    rec: Arc<Recorder>,
    until: Option<(tokio::time::Instant, Leave)>,
) -> Received {
    let mut order = Order::new(conn.ack_offset);
    let end = match until {
        None => loop {
            let frame = conn.ws.read_frame().await;
            if let Some(end) = on_frame(frame, &topic, &rec, &mut order) {
                break end;
            }
        },
        Some((at, leave)) => {
            let sleep = tokio::time::sleep_until(at);
            tokio::pin!(sleep);
            loop {
                let frame = tokio::select! {
                    biased;
                    f = conn.ws.read_frame() => f,
                    _ = &mut sleep => {
                        if leave == Leave::Close {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                conn.ws.write_frame(Frame::close(1000, b"")),
                            )
                            .await;
                        }
                        break End::Left;
                    }
                };
                if let Some(end) = on_frame(frame, &topic, &rec, &mut order) {
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
    topic: &str,
    rec: &Recorder,
    order: &mut Order,
) -> Option<End> {
    let frame = match frame {
        Ok(f) => f,
        Err(e) => return Some(End::Failed(e.to_string())),
    };
    match frame.opcode {
        OpCode::Text => {
            let now = now_ns();
            let s = scan(&frame.payload);
            match s.kind {
                Kind::Message => {
                    let seen = order.observe(s.offset, s.s);
                    let bad = s.topic != topic.as_bytes() || s.t.is_none() || seen.is_none();
                    rec.with(|sh| {
                        let c = &mut sh.counters;
                        c.received += 1;
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
            let code = if frame.payload.len() >= 2 {
                u16::from_be_bytes([frame.payload[0], frame.payload[1]])
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
        assert!(Node::parse("wss://127.0.0.1:8080/ws").is_err());
        assert!(Node::parse("127.0.0.1").is_err());
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
