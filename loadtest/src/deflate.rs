//! The client side of permessage-deflate (RFC 7692) for `--deflate`: the offer, the check of the
//! server's answer, and a small frame reader that inflates compressed messages.
//!
//! fastwebsockets 0.10 refuses any frame with RSV1 set, so a deflate connection reads its frames
//! here instead: server frames are unmasked, whole (pubgate never fragments what it sends) and
//! compressed without context takeover, so each message inflates on its own. Every message is
//! inflated and then checked like a plain one; the bytes each frame took on the wire are counted,
//! so the report can say what a delivery costs in bytes.

use bytes::{Buf, BytesMut};
use fastwebsockets::OpCode;
use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The request header a `--deflate` connection sends (what browsers offer).
pub const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// What RFC 7692 §7.2.2 appends to a compressed message before inflating it.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Largest message accepted once inflated.
const MAX_MESSAGE: usize = 16 << 20;

/// Whether the 101 response accepted permessage-deflate, without context takeover on the server's
/// side (needed: each message is inflated on its own).
pub fn accepted(head: &str) -> bool {
    accepted_with(head, true)
}

/// [`accepted`], where `need_no_takeover: false` also takes a bare `permessage-deflate`. nchan
/// answers that way, yet deflates each message once for all its subscribers, so every message
/// stands alone all the same; one that did not would fail to inflate and end its connection.
pub fn accepted_with(head: &str, need_no_takeover: bool) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-extensions")
                && v.trim_start().starts_with("permessage-deflate")
                && (!need_no_takeover || v.contains("server_no_context_takeover"))
        })
    })
}

/// One frame off a deflate connection, its payload inflated when it was compressed.
pub struct Message<'a> {
    /// Text, binary, close, ping or pong.
    pub opcode: OpCode,
    /// The (inflated) payload.
    pub payload: &'a [u8],
    /// Bytes the frame took on the wire, header included.
    pub wire_bytes: u64,
}

/// A client WebSocket that negotiated permessage-deflate.
pub struct DeflateWs<S> {
    io: S,
    buf: BytesMut,
    inflater: Decompress,
    inflated: Vec<u8>,
    payload: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> DeflateWs<S> {
    /// Wraps a stream right after a 101 that accepted deflate.
    pub fn new(io: S) -> Self {
        DeflateWs {
            io,
            buf: BytesMut::with_capacity(4096),
            inflater: Decompress::new(false),
            inflated: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Sends a frame (masked, uncompressed: RFC 7692 lets either side send plain messages).
    pub async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let mut f = Vec::with_capacity(payload.len() + 14);
        f.push(0x80 | opcode as u8);
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        // The masking key protects intermediaries, not this tool: a fixed one does.
        let mask = [0x5a, 0x17, 0xc3, 0x8e];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.io.write_all(&f).await?;
        self.io.flush().await
    }

    /// Reads the next frame; answers pings itself (and still returns them).
    pub async fn read(&mut self) -> Result<Message<'_>, String> {
        let (opcode, rsv1, header, len) = loop {
            if let Some(h) = parse_header(&self.buf)? {
                if self.buf.len() >= h.2 + h.3 {
                    break h;
                }
                self.buf.reserve(h.2 + h.3 - self.buf.len());
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed".into());
            }
        };
        self.buf.advance(header);
        let body = self.buf.split_to(len);
        if opcode == OpCode::Ping {
            self.send(OpCode::Pong, &body)
                .await
                .map_err(|e| e.to_string())?;
        }
        let wire_bytes = (header + len) as u64;
        if rsv1 {
            inflate(&mut self.inflater, &body, &mut self.inflated)?;
            return Ok(Message {
                opcode,
                payload: &self.inflated,
                wire_bytes,
            });
        }
        self.payload.clear();
        self.payload.extend_from_slice(&body);
        Ok(Message {
            opcode,
            payload: &self.payload,
            wire_bytes,
        })
    }
}

/// Parses a server frame header: (opcode, rsv1, header length, payload length), or `None` when more
/// bytes are needed.
fn parse_header(b: &[u8]) -> Result<Option<(OpCode, bool, usize, usize)>, String> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x80 == 0 {
        return Err("fragmented server frame".into());
    }
    if b[0] & 0x30 != 0 || b[1] & 0x80 != 0 {
        return Err("reserved bits or a mask on a server frame".into());
    }
    let opcode = match b[0] & 0x0F {
        0x1 => OpCode::Text,
        0x2 => OpCode::Binary,
        0x8 => OpCode::Close,
        0x9 => OpCode::Ping,
        0xA => OpCode::Pong,
        op => return Err(format!("unexpected opcode {op}")),
    };
    let rsv1 = b[0] & 0x40 != 0;
    let (header, len) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
        127 if b.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            (10, u64::from_be_bytes(n) as usize)
        }
        126 | 127 => return Ok(None),
        n => (2, n as usize),
    };
    if len > MAX_MESSAGE {
        return Err(format!("server frame of {len} bytes"));
    }
    Ok(Some((opcode, rsv1, header, len)))
}

/// Inflates one message with a fresh window into `out`.
fn inflate(d: &mut Decompress, body: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    d.reset(false);
    out.clear();
    out.reserve(body.len() * 4 + 256);
    for input in [body, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let at = (d.total_in() - start) as usize;
            d.decompress_vec(&input[at..], out, FlushDecompress::Sync)
                .map_err(|e| format!("invalid compressed message: {e}"))?;
            if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                break;
            }
            if out.len() > MAX_MESSAGE {
                return Err("compressed message inflates past 16 MiB".into());
            }
            out.reserve(out.capacity());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn reads_compressed_and_plain_frames_and_answers_pings() {
        let text =
            br#"{"op":"message","topic":"t","offset":1,"data":{"pad":"aaaaaaaaaaaaaaaaaaaaaaaa"}}"#;
        let mut c = Compress::new(Compression::new(6), false);
        let mut z = Vec::with_capacity(256);
        c.compress_vec(text, &mut z, FlushCompress::Sync).unwrap();
        z.truncate(z.len() - 4);
        let mut wire = vec![0xC1, z.len() as u8];
        wire.extend_from_slice(&z);
        wire.extend_from_slice(&[0x89, 0x00, 0x81, 0x02, b'h', b'i']);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut server, client) = tokio::io::duplex(4096);
            server.write_all(&wire).await.unwrap();
            let mut ws = DeflateWs::new(client);
            let m = ws.read().await.unwrap();
            assert_eq!((m.opcode, m.payload), (OpCode::Text, &text[..]));
            assert_eq!(m.wire_bytes, 2 + z.len() as u64);
            assert_eq!(ws.read().await.unwrap().opcode, OpCode::Ping);
            let m = ws.read().await.unwrap();
            assert_eq!(m.payload, b"hi");
            let mut pong = [0u8; 6];
            server.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong[0], 0x8A);
        });
        assert!(accepted(
            "HTTP/1.1 101 Switching Protocols\r\nsec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n"
        ));
        assert!(!accepted("HTTP/1.1 101 Switching Protocols\r\n\r\n"));
        let bare = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
        assert!(!accepted(bare));
        assert!(accepted_with(bare, false));
    }
}
