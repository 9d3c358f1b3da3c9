//! Client frames off the wire (RFC 6455 §5.2), with a read buffer that costs almost nothing while a
//! connection is idle.
//!
//! Most gateway connections sit idle for hours waiting for their next frame. A fixed read buffer per
//! connection (8 KiB in fastwebsockets 0.10) would dominate their memory, so this reader waits with a
//! small buffer, grows it only for the frame at hand, and gives large buffers back once they are empty.
//! Unmasking uses fastwebsockets' routine.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Smallest read buffer: what an idle connection holds while it waits for its next frame.
const MIN_BUFFER: usize = 256;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// Text message (first fragment).
    Text,
    /// Binary message (first fragment).
    Binary,
    /// Close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// Whether this is a control frame (close, ping, pong).
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One unmasked frame.
#[derive(Debug)]
pub struct RawFrame {
    /// Final fragment flag.
    pub fin: bool,
    /// The opcode.
    pub opcode: Opcode,
    /// RSV1: under permessage-deflate, set on the first frame of a compressed message (only ever
    /// set when the reader was told deflate was negotiated, and only on a text or binary frame).
    pub rsv1: bool,
    /// The unmasked payload.
    pub payload: BytesMut,
}

/// Why reading stopped: either a protocol violation (answer with this close code) or the peer went
/// away (nothing to answer).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Close with this code and reason.
    Violation(u16, &'static str),
    /// The connection ended or failed; no close frame can be sent.
    Gone,
}

/// Reads frames from a client (frames must be masked).
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_frame: usize,
    /// permessage-deflate was negotiated: RSV1 may mark the first frame of a message.
    rsv1_allowed: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream; frames with a payload over `max_frame` bytes are refused with 1009.
    pub fn new(io: R, max_frame: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            max_frame,
            rsv1_allowed: false,
        }
    }

    /// Lets RSV1 through on text and binary frames, for a connection that negotiated
    /// permessage-deflate.
    pub fn allow_rsv1(&mut self, allowed: bool) {
        self.rsv1_allowed = allowed;
    }

    /// Reads until `self.buf` holds at least `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<(), ReadError> {
        while self.buf.len() < n {
            let missing = n - self.buf.len();
            if self.buf.capacity() - self.buf.len() < missing {
                // Grow for the frame at hand only; while waiting for a header, stay small.
                self.buf.reserve(missing.max(MIN_BUFFER));
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Gone),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Reads one frame. Not cancel-safe: bytes of a partly read frame stay in the buffer, but the
    /// future must be driven to completion (give it a task of its own).
    pub async fn read(&mut self) -> Result<RawFrame, ReadError> {
        self.fill(2).await?;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let fin = b0 & 0x80 != 0;
        // RSV2 and RSV3 belong to no extension the node negotiates.
        if b0 & 0x30 != 0 {
            return Err(ReadError::Violation(1002, "reserved bits set"));
        }
        let rsv1 = b0 & 0x40 != 0;
        if rsv1 && !self.rsv1_allowed {
            return Err(ReadError::Violation(1002, "reserved bits set"));
        }
        let opcode =
            Opcode::from_bits(b0 & 0x0F).ok_or(ReadError::Violation(1002, "unknown opcode"))?;
        // RFC 7692 §6.1: only the first frame of a data message says it is compressed.
        if rsv1 && !matches!(opcode, Opcode::Text | Opcode::Binary) {
            return Err(ReadError::Violation(
                1002,
                "RSV1 set on a control or continuation frame",
            ));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Violation(1002, "client frames must be masked"));
        }
        let short_len = b1 & 0x7F;
        let ext = match short_len {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if opcode.is_control() && !fin {
            return Err(ReadError::Violation(1002, "fragmented control frame"));
        }
        self.fill(2 + ext + 4).await?;
        let len = match ext {
            0 => u64::from(short_len),
            2 => u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
            _ => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                u64::from_be_bytes(b)
            }
        };
        // The payload length counts, not its encoding: a 0-byte ping with a 16-bit length passes.
        if opcode.is_control() && len > 125 {
            return Err(ReadError::Violation(1002, "control frame too large"));
        }
        if len > self.max_frame as u64 {
            return Err(ReadError::Violation(1009, "message too large"));
        }
        let len = len as usize;
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&self.buf[2 + ext..2 + ext + 4]);
        let header = 2 + ext + 4;
        self.fill(header + len).await?;
        self.buf.advance(header);
        let mut payload = self.buf.split_to(len);
        if self.buf.is_empty() {
            // The empty tail still shares the payload's allocation (which may be large); let it go
            // with the payload instead of keeping it for the next, probably small, frame.
            self.buf = BytesMut::new();
        }
        fastwebsockets::unmask(&mut payload, mask);
        Ok(RawFrame {
            fin,
            opcode,
            rsv1,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<RawFrame, ReadError>> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&bytes).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, max);
        let mut out = Vec::new();
        loop {
            let f = r.read().await;
            let stop = f.is_err();
            out.push(f);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_frames_of_every_length_class() {
        let mut wire = Vec::new();
        for n in [0usize, 125, 126, 65535, 65536] {
            wire.extend(masked(0x82, &vec![7u8; n]));
        }
        let got = read_all(wire, 1 << 20).await;
        let lens: Vec<_> = got
            .iter()
            .filter_map(|f| f.as_ref().ok())
            .map(|f| f.payload.len())
            .collect();
        assert_eq!(lens, vec![0, 125, 126, 65535, 65536]);
        assert!(
            got.iter()
                .filter_map(|f| f.as_ref().ok())
                .all(|f| f.payload.iter().all(|&b| b == 7))
        );
        assert_eq!(got.last().unwrap().as_ref().unwrap_err(), &ReadError::Gone);
    }

    #[tokio::test]
    async fn violations_map_to_close_codes() {
        let first_err = |wire: Vec<u8>, max| async move {
            read_all(wire, max)
                .await
                .into_iter()
                .find_map(|f| f.err())
                .unwrap()
        };
        assert_eq!(
            first_err(masked(0xA1, b"x"), 100).await,
            ReadError::Violation(1002, "reserved bits set")
        );
        // RSV1 without permessage-deflate.
        assert_eq!(
            first_err(masked(0xC1, b"x"), 100).await,
            ReadError::Violation(1002, "reserved bits set")
        );
        assert_eq!(
            first_err(masked(0x83, b"x"), 100).await,
            ReadError::Violation(1002, "unknown opcode")
        );
        assert_eq!(
            first_err(masked(0x09, b"x"), 100).await,
            ReadError::Violation(1002, "fragmented control frame")
        );
        assert_eq!(
            first_err(masked(0x89, &[0; 126]), 1000).await,
            ReadError::Violation(1002, "control frame too large")
        );
        assert_eq!(
            first_err(masked(0x81, &[b'a'; 101]), 100).await,
            ReadError::Violation(1009, "message too large")
        );
        assert_eq!(
            first_err(vec![0x81, 0x01, b'a'], 100).await,
            ReadError::Violation(1002, "client frames must be masked")
        );
    }

    #[tokio::test]
    async fn rsv1_with_deflate_only_on_data_frames() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut r = FrameReader::new(b, 100);
        r.allow_rsv1(true);
        a.write_all(&masked(0xC1, b"x")).await.unwrap();
        a.write_all(&masked(0x81, b"y")).await.unwrap();
        a.write_all(&masked(0xC9, b"")).await.unwrap();
        let f = r.read().await.unwrap();
        assert!(f.rsv1 && f.opcode == Opcode::Text);
        assert!(!r.read().await.unwrap().rsv1);
        assert_eq!(
            r.read().await.unwrap_err(),
            ReadError::Violation(1002, "RSV1 set on a control or continuation frame")
        );
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut r = FrameReader::new(b, 100);
        r.allow_rsv1(true);
        a.write_all(&masked(0x40, b"x")).await.unwrap();
        assert!(matches!(r.read().await, Err(ReadError::Violation(1002, _))));
    }

    #[tokio::test]
    async fn idle_buffer_stays_small_after_a_big_frame() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&masked(0x82, &vec![1u8; 100_000]))
            .await
            .unwrap();
        let mut r = FrameReader::new(b, 1 << 20);
        assert_eq!(r.read().await.unwrap().payload.len(), 100_000);
        a.write_all(&masked(0x81, b"hi")).await.unwrap();
        assert_eq!(&r.read().await.unwrap().payload[..], b"hi");
        assert_eq!(r.buf.capacity(), 0);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), r.read()).await;
        assert!(waiting.is_err());
        assert!(
            r.buf.capacity() <= MIN_BUFFER,
            "idle capacity {}",
            r.buf.capacity()
        );
    }
}
