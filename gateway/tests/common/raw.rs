//! A WebSocket client that writes frames by hand ([`RawWs`]), raw TCP and HTTP/1.1 for what a
//! well-behaved library will not do.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HttpResponse, RECV_TIMEOUT};

/// WebSocket opcodes, for [`RawWs`].
pub mod op {
    /// Continuation frame.
    pub const CONTINUATION: u8 = 0x0;
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping frame.
    pub const PING: u8 = 0x9;
    /// Pong frame.
    pub const PONG: u8 = 0xA;
}

/// One frame as the server sent it.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV1: a permessage-deflate compressed message (only on connections that negotiated it).
    pub rsv1: bool,
    /// Opcode (see [`op`]).
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == op::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Why [`RawWs::read_frame`] returned no frame.
#[derive(Debug)]
pub enum RawReadError {
    /// Nothing complete arrived before the deadline.
    Timeout,
    /// The server closed the TCP connection (EOF).
    Eof,
    /// A socket error (e.g. connection reset).
    Io(std::io::Error),
    /// The bytes are not a valid server frame.
    Protocol(String),
}

/// A WebSocket client that writes frames by hand and reads whatever comes back, for protocol
/// violations and misbehaving peers (never reads, never answers pings).
pub struct RawWs {
    /// The socket (after the handshake).
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// The `Sec-WebSocket-Key` of RFC 6455's example; the server's accept value is not checked.
const RAW_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

impl RawWs {
    /// Connects to `addr` and upgrades `/ws`; panics unless the server answers 101.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let stream = tcp_connect(addr).await;
        match RawWs::handshake(stream, addr, "/ws").await {
            Ok(ws) => ws,
            Err(r) => panic!("upgrade refused: {} {}", r.status, r.body),
        }
    }

    /// Connects with the socket's receive buffer set to `bytes` (see [`tcp_connect_small_rcvbuf`])
    /// and upgrades `/ws`: the client that stops reading, whose window fills after a few frames.
    /// Panics unless the server answers 101.
    pub async fn connect_small_rcvbuf(addr: SocketAddr, bytes: u32) -> RawWs {
        let stream = tcp_connect_small_rcvbuf(addr, bytes).await;
        match RawWs::handshake(stream, addr, "/ws").await {
            Ok(ws) => ws,
            Err(r) => panic!("upgrade refused: {} {}", r.status, r.body),
        }
    }

    /// Sends a `subscribe` op and returns the next JSON frame (its `ack` or `error`; the caller
    /// asserts which).
    pub async fn subscribe(&mut self, topic: &str, id: u64) -> Value {
        self.send_text(&serde_json::json!({"op":"subscribe","topic":topic,"id":id}).to_string())
            .await;
        self.recv_json(RECV_TIMEOUT).await
    }

    /// Performs the upgrade on an already connected socket (e.g. one with a small receive buffer).
    /// Returns the server's response when it is not 101.
    pub async fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
    ) -> Result<RawWs, HttpResponse> {
        RawWs::handshake_with(stream, addr, path, &[]).await
    }

    /// Like [`RawWs::handshake`], with extra request headers (e.g. `Origin`).
    pub async fn handshake_with(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<RawWs, HttpResponse> {
        RawWs::handshake_full(stream, addr, path, extra_headers)
            .await
            .map(|(ws, _)| ws)
    }

    /// Like [`RawWs::handshake_with`], returning the 101 response too (its headers say what was
    /// negotiated).
    pub async fn handshake_full(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        extra_headers: &[(&str, &str)],
    ) -> Result<(RawWs, HttpResponse), HttpResponse> {
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in extra_headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write upgrade request");
        let mut buf = Vec::new();
        let response = read_http_response(&mut stream, &mut buf, RECV_TIMEOUT, true)
            .await
            .unwrap_or_else(|e| panic!("reading the upgrade response: {e}"));
        if response.status == 101 {
            Ok((RawWs { stream, buf }, response))
        } else {
            Err(response)
        }
    }

    /// Writes one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame = masked_frame(fin, opcode, payload);
        self.stream
            .write_all(&frame)
            .await
            .unwrap_or_else(|e| panic!("write frame (opcode {opcode}): {e}"));
    }

    /// Writes several frames in one write (so the server sees them back to back).
    pub async fn send_frames(&mut self, frames: &[(bool, u8, &[u8])]) {
        let mut all = Vec::new();
        for (fin, opcode, payload) in frames {
            all.extend_from_slice(&masked_frame(*fin, *opcode, payload));
        }
        self.stream
            .write_all(&all)
            .await
            .unwrap_or_else(|e| panic!("write frames: {e}"));
    }

    /// Sends a whole text message in one frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, op::TEXT, text.as_bytes()).await;
    }

    /// Reads the next frame within `timeout`.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawReadError> {
        read_frame_from(&mut self.stream, &mut self.buf, timeout).await
    }

    /// Resets the connection: `SO_LINGER` 0, then close, so the server gets an RST instead of a
    /// FIN (a client that crashed or lost its network).
    pub fn reset(self) {
        // tokio deprecates set_linger because a non-zero linger blocks the thread on drop; a zero
        // linger never does.
        #[allow(deprecated)]
        self.stream
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER");
        drop(self);
    }

    /// Splits the connection so that one task can keep writing while another reads (floods from a
    /// client that does read).
    pub fn into_split(self) -> (RawWsReader, tokio::net::tcp::OwnedWriteHalf) {
        let (read, write) = self.stream.into_split();
        (
            RawWsReader {
                read,
                buf: self.buf,
            },
            write,
        )
    }

    /// Next text message (skipping pings and pongs) as JSON.
    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self
                .read_frame(left)
                .await
                .unwrap_or_else(|e| panic!("expected a text frame: {e:?}"));
            assert!(!frame.rsv1, "compressed frame on a plain read: {frame:?}");
            match frame.opcode {
                op::PING | op::PONG => continue,
                op::TEXT if frame.fin => {
                    return serde_json::from_slice(&frame.payload).unwrap_or_else(|e| {
                        panic!("server sent invalid JSON {:?}: {e}", frame.payload)
                    });
                }
                _ => panic!("expected a text frame, got {frame:?}"),
            }
        }
    }

    /// Reads until a close frame (skipping anything else) and asserts its code; returns the frames
    /// skipped before it. Panics if the connection ends first or nothing comes within `timeout`.
    pub async fn expect_close(&mut self, code: u16, timeout: Duration) -> Vec<RawFrame> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left).await {
                Ok(f) if f.opcode == op::CLOSE => {
                    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default());
                    assert_eq!(f.close_code(), Some(code), "close code (reason {reason:?})");
                    return skipped;
                }
                Ok(f) => skipped.push(f),
                Err(e) => panic!(
                    "no close frame {code} within {timeout:?}: {e:?} ({} frames before)",
                    skipped.len()
                ),
            }
        }
    }

    /// Reads and discards until the server closes the TCP connection; returns how many bytes came.
    /// Panics if the connection is still open after `timeout` or more than `max_bytes` arrive.
    pub async fn expect_eof(&mut self, timeout: Duration, max_bytes: usize) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut total = self.buf.len();
        self.buf.clear();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("connection still open after {timeout:?} ({total} bytes read)"),
                Ok(Ok(0)) | Ok(Err(_)) => return total,
                Ok(Ok(n)) => {
                    total += n;
                    assert!(
                        total <= max_bytes,
                        "more than {max_bytes} bytes before the connection closed"
                    );
                }
            }
        }
    }
}

/// The read half of a [`RawWs`] after [`RawWs::into_split`].
pub struct RawWsReader {
    read: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
}

impl RawWsReader {
    /// Reads the next frame within `timeout`.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawReadError> {
        read_frame_from(&mut self.read, &mut self.buf, timeout).await
    }
}

/// Reads one server frame from `io`, keeping unparsed bytes in `buf`.
async fn read_frame_from<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<RawFrame, RawReadError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some((frame, used)) = parse_server_frame(buf)? {
            buf.drain(..used);
            return Ok(frame);
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Err(RawReadError::Timeout),
            Ok(Ok(0)) => return Err(RawReadError::Eof),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(RawReadError::Io(e)),
        }
    }
}

/// Sends `request` (a complete HTTP/1.1 request, written as is) on a fresh connection and reads one
/// response, for requests a normal client would not send.
pub async fn raw_http(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut stream = tcp_connect(addr).await;
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    read_http_response(&mut stream, &mut buf, RECV_TIMEOUT, true)
        .await
        .unwrap_or_else(|e| panic!("reading the response to {request:?}: {e}"))
}

/// Encodes one client frame, masked as RFC 6455 requires of clients.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Parses one server frame from the front of `buf`: `Ok(None)` when incomplete.
fn parse_server_frame(buf: &[u8]) -> Result<Option<(RawFrame, usize)>, RawReadError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    // RSV1 is read (permessage-deflate); whoever reads the frame decides whether it may be set.
    if buf[0] & 0x30 != 0 {
        return Err(RawReadError::Protocol("reserved bits set".into()));
    }
    if buf[1] & 0x80 != 0 {
        return Err(RawReadError::Protocol("server frame is masked".into()));
    }
    let (len, header) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(n);
            let n = usize::try_from(n)
                .ok()
                .filter(|n| *n <= 256 << 20)
                .ok_or_else(|| RawReadError::Protocol(format!("frame of {n} bytes")))?;
            (n, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    let frame = RawFrame {
        fin,
        rsv1: buf[0] & 0x40 != 0,
        opcode,
        payload: buf[header..header + len].to_vec(),
    };
    Ok(Some((frame, header + len)))
}

/// Connects a plain TCP socket, with a deadline.
pub async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    match tokio::time::timeout(RECV_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("connect {addr}: {e}"),
        Err(_) => panic!("connect {addr}: timed out"),
    }
}

/// Connects a TCP socket whose receive buffer is set to `bytes` *before* connecting (so the window
/// the server sees stays small), for clients that stop reading.
pub async fn tcp_connect_small_rcvbuf(addr: SocketAddr, bytes: u32) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    match tokio::time::timeout(RECV_TIMEOUT, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("connect {addr}: {e}"),
        Err(_) => panic!("connect {addr}: timed out"),
    }
}

/// Reads from `stream` until the server closes it (EOF or reset). Returns what the server sent and
/// when the connection ended, measured from `started`; panics when it is still open at
/// `started + limit`.
pub async fn read_until_closed(
    stream: &mut TcpStream,
    started: Instant,
    limit: Duration,
) -> (Vec<u8>, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open {limit:?} after it started; server sent {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP/1.1 response head and its body (by `Content-Length`; to EOF without one, unless
/// `head_only_on_101` and the status is 101). Bytes after the response stay in `buf`.
async fn read_http_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
    head_only_on_101: bool,
) -> Result<HttpResponse, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err("response head larger than 64 KiB".into());
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(format!("timed out; got {:?}", String::from_utf8_lossy(buf))),
            Ok(Ok(0)) => return Err(format!("EOF; got {:?}", String::from_utf8_lossy(buf))),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut response = HttpResponse {
        status,
        headers,
        body: String::new(),
    };
    if status == 101 && head_only_on_101 {
        return Ok(response);
    }
    let length: Option<usize> = response
        .header("content-length")
        .and_then(|v| v.parse().ok());
    loop {
        if length.is_some_and(|n| buf.len() >= n) {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err("timed out reading the body".into()),
            Ok(Ok(0)) if length.is_none() => break,
            Ok(Ok(0)) => return Err("EOF inside the body".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    let n = length.unwrap_or(buf.len());
    response.body = String::from_utf8_lossy(&buf[..n]).into_owned();
    buf.drain(..n);
    Ok(response)
}
