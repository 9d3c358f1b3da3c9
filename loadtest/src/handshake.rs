//! Opening one subscriber connection: TCP connect from a chosen loopback source address, TLS for a
//! `wss://` node, a hand-written HTTP/1.1 upgrade (no hyper task per connection), then subscribe and
//! wait for the ack.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::deflate::{self, DeflateWs};
use crate::scan::{Kind, scan};
use crate::ws::{Node, Protocol};

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

/// An I/O error during the upgrade, labelled by its kind.
fn upgrade_io(e: std::io::Error) -> OpenError {
    OpenError::new(io_label("upgrade", &e), e)
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

/// A WebSocket over plain TCP or over TLS; chosen once per connection.
pub enum Ws {
    /// `ws://`.
    Plain(WebSocket<TcpStream>),
    /// `wss://`.
    Tls(Box<WebSocket<TlsStream<TcpStream>>>),
    /// `ws://` with permessage-deflate.
    Deflate(Box<DeflateWs<TcpStream>>),
    /// `wss://` with permessage-deflate.
    DeflateTls(Box<DeflateWs<TlsStream<TcpStream>>>),
}

/// An open, subscribed connection.
pub struct Conn {
    /// The WebSocket.
    pub ws: Ws,
    /// The ack's offset: the first message expected is the next one.
    pub ack_offset: u64,
    /// How long the setup took.
    pub timing: OpenTiming,
    /// Messages are the published body alone (an nchan node), not pubgate's envelope.
    pub raw: bool,
}

/// The well-known key/accept pair of RFC 6455 §1.3: the server's accept must match it.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

async fn tcp_connect(
    node: &Node,
    src: Option<Ipv4Addr>,
    rcvbuf: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = match node.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(bytes) = rcvbuf {
        // Before connect, so the window the server sees is small from the first byte: a client
        // that reads slowly then backs up into the server's queue rather than into megabytes of
        // loopback socket buffer.
        socket.set_recv_buffer_size(bytes)?;
    }
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

/// Sends the upgrade request (and flushes it: over TLS it may sit in a buffer otherwise).
async fn send_upgrade<S: AsyncWrite + Unpin>(
    stream: &mut S,
    node: &Node,
    path: &str,
    extra_headers: &str,
) -> Result<(), OpenError> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n",
        node.host()
    );
    stream.write_all(req.as_bytes()).await.map_err(upgrade_io)?;
    stream.flush().await.map_err(upgrade_io)
}

/// Reads exactly the response head from a TCP socket (peek, then read that many bytes, so no frame
/// byte is taken from the stream).
async fn read_head_tcp(stream: &mut TcpStream) -> Result<Vec<u8>, OpenError> {
    let mut buf = [0u8; 2048];
    let mut seen = 0;
    let head_len = loop {
        let n = stream.peek(&mut buf).await.map_err(upgrade_io)?;
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
    stream.read_exact(&mut head).await.map_err(upgrade_io)?;
    Ok(head)
}

/// Reads exactly the response head from a stream that cannot peek (TLS): a byte at a time, which
/// comes out of the TLS layer's plaintext buffer, once per connection.
async fn read_head_bytes<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, OpenError> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 2048 {
            return Err(OpenError::new("upgrade_bad", "response head too large"));
        }
        let n = stream.read(&mut byte).await.map_err(upgrade_io)?;
        if n == 0 {
            return Err(OpenError::new(
                "upgrade_eof",
                "server closed during upgrade",
            ));
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// Checks the response head: `101` with the right `Sec-WebSocket-Accept`, and permessage-deflate
/// accepted when it was offered.
fn check_head(head: &[u8], deflate: bool, raw: bool) -> Result<(), OpenError> {
    let head = String::from_utf8_lossy(head);
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
    if deflate && !deflate::accepted_with(&head, !raw) {
        return Err(OpenError::new(
            "deflate_declined",
            "the node did not accept permessage-deflate",
        ));
    }
    Ok(())
}

/// Sets the client options every connection uses.
fn client_ws<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> WebSocket<S> {
    let mut ws = WebSocket::after_handshake(stream, Role::Client);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    ws.set_max_message_size(16 << 20);
    ws
}

/// Subscribes to `topic` and waits for the ack; returns its offset.
async fn subscribe<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    topic: &str,
) -> Result<u64, OpenError> {
    let sub = format!(r#"{{"op":"subscribe","topic":"{topic}","id":1}}"#);
    ws.write_frame(Frame::text(Payload::Owned(sub.into_bytes())))
        .await
        .map_err(|e| OpenError::new("subscribe_write", e))?;
    ws.flush()
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
}

/// [`subscribe`] on a deflate connection.
async fn subscribe_deflate<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut DeflateWs<S>,
    topic: &str,
) -> Result<u64, OpenError> {
    let sub = format!(r#"{{"op":"subscribe","topic":"{topic}","id":1}}"#);
    ws.send(OpCode::Text, sub.as_bytes())
        .await
        .map_err(|e| OpenError::new("subscribe_write", e))?;
    loop {
        let m = ws
            .read()
            .await
            .map_err(|e| OpenError::new("subscribe_read", e))?;
        match m.opcode {
            OpCode::Text => {
                let s = scan(m.payload);
                match s.kind {
                    Kind::Ack => return Ok(s.offset.unwrap_or(0)),
                    Kind::Error => {
                        return Err(OpenError::new(
                            "subscribe_error",
                            String::from_utf8_lossy(m.payload),
                        ));
                    }
                    _ => {}
                }
            }
            OpCode::Close => return Err(OpenError::new("subscribe_closed", "server closed")),
            _ => {}
        }
    }
}

/// Connects (TCP, then TLS for a `wss://` node), upgrades and subscribes to `topic`; returns once
/// the ack arrived. `upgrade_ns` includes the TLS handshake.
pub async fn open(
    node: &Node,
    src: Option<Ipv4Addr>,
    topic: &str,
    timeout: Duration,
) -> Result<Conn, OpenError> {
    open_with(node, src, topic, timeout, None).await
}

/// [`open`] with the socket's receive buffer set to `rcvbuf` bytes (the kernel doubles it) before
/// connecting, for clients that are meant to fall behind.
pub async fn open_with(
    node: &Node,
    src: Option<Ipv4Addr>,
    topic: &str,
    timeout: Duration,
    rcvbuf: Option<u32>,
) -> Result<Conn, OpenError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let in_time = |stage: &'static str| {
        move |_| OpenError::new(format!("timeout_{stage}"), format!("{stage} timed out"))
    };
    let mut stream = tokio::time::timeout_at(deadline, tcp_connect(node, src, rcvbuf))
        .await
        .map_err(in_time("connect"))?
        .map_err(|e| OpenError::new(io_label("connect", &e), e))?;
    let tcp_ns = started.elapsed().as_nanos() as u64;
    let offer = if node.deflate { deflate::OFFER } else { "" };
    let path = node.protocol.subscribe_path(&node.ws_path, topic);
    // An nchan subscriber is subscribed by its upgrade: no subscribe frame, no ack.
    let raw = node.protocol == Protocol::Nchan;
    let (ws, upgrade_ns, ack_offset) = match &node.tls {
        None => {
            let up = async {
                send_upgrade(&mut stream, node, &path, offer).await?;
                check_head(&read_head_tcp(&mut stream).await?, node.deflate, raw)
            };
            tokio::time::timeout_at(deadline, up)
                .await
                .map_err(in_time("upgrade"))??;
            let upgrade_ns = started.elapsed().as_nanos() as u64;
            if node.deflate {
                let mut ws = Box::new(DeflateWs::new(stream));
                let ack = if raw {
                    0
                } else {
                    tokio::time::timeout_at(deadline, subscribe_deflate(&mut ws, topic))
                        .await
                        .map_err(in_time("subscribe"))??
                };
                return Ok(opened(
                    Ws::Deflate(ws),
                    ack,
                    raw,
                    (tcp_ns, upgrade_ns),
                    started,
                ));
            }
            let mut ws = client_ws(stream);
            let ack = if raw {
                0
            } else {
                tokio::time::timeout_at(deadline, subscribe(&mut ws, topic))
                    .await
                    .map_err(in_time("subscribe"))??
            };
            (Ws::Plain(ws), upgrade_ns, ack)
        }
        Some(tls) => {
            let mut stream = tokio::time::timeout_at(deadline, tls.connect(stream))
                .await
                .map_err(in_time("tls"))?
                .map_err(|e| OpenError::new(io_label("tls", &e), e))?;
            let up = async {
                send_upgrade(&mut stream, node, &path, offer).await?;
                check_head(&read_head_bytes(&mut stream).await?, node.deflate, raw)
            };
            tokio::time::timeout_at(deadline, up)
                .await
                .map_err(in_time("upgrade"))??;
            let upgrade_ns = started.elapsed().as_nanos() as u64;
            if node.deflate {
                let mut ws = Box::new(DeflateWs::new(stream));
                let ack = if raw {
                    0
                } else {
                    tokio::time::timeout_at(deadline, subscribe_deflate(&mut ws, topic))
                        .await
                        .map_err(in_time("subscribe"))??
                };
                return Ok(opened(
                    Ws::DeflateTls(ws),
                    ack,
                    raw,
                    (tcp_ns, upgrade_ns),
                    started,
                ));
            }
            let mut ws = Box::new(client_ws(stream));
            let ack = if raw {
                0
            } else {
                tokio::time::timeout_at(deadline, subscribe(&mut ws, topic))
                    .await
                    .map_err(in_time("subscribe"))??
            };
            (Ws::Tls(ws), upgrade_ns, ack)
        }
    };
    Ok(opened(ws, ack_offset, raw, (tcp_ns, upgrade_ns), started))
}

/// The open connection and its setup timings (`tcp`, `upgrade`: ns since `started`).
fn opened(
    ws: Ws,
    ack_offset: u64,
    raw: bool,
    (tcp_ns, upgrade_ns): (u64, u64),
    started: Instant,
) -> Conn {
    Conn {
        ws,
        ack_offset,
        raw,
        timing: OpenTiming {
            tcp_ns,
            upgrade_ns,
            total_ns: started.elapsed().as_nanos() as u64,
        },
    }
}
