//! Server-to-client WebSocket frames, encoded once into shareable bytes.
//!
//! Server frames are never masked (RFC 6455 §5.1), so a frame's bytes are the same for every
//! receiver: the registry encodes a message once and every subscriber's writer sends the same
//! [`Bytes`]. Payloads are written after a reserved header gap and the header is filled in at the end,
//! so building a frame costs one buffer and no copy of the payload.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest server frame header: 2 bytes + 8-byte extended length.
const MAX_HEADER: usize = 10;

/// WebSocket opcodes the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    /// UTF-8 text.
    Text = 0x1,
    /// Binary (echo route only).
    Binary = 0x2,
    /// Close, with a status code.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong.
    Pong = 0xA,
}

/// Builds one frame: write the payload into it, then [`FrameBuilder::finish`].
pub struct FrameBuilder {
    buf: BytesMut,
}

impl FrameBuilder {
    /// Starts a frame whose payload is expected to be about `payload_hint` bytes.
    pub fn with_capacity(payload_hint: usize) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_HEADER + payload_hint);
        buf.put_bytes(0, MAX_HEADER);
        FrameBuilder { buf }
    }

    /// Appends payload bytes.
    pub fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a decimal number.
    pub fn put_u64(&mut self, n: u64) {
        self.put(itoa::Buffer::new().format(n).as_bytes());
    }

    /// Appends a string as a JSON string literal, escaped.
    pub fn put_json_str(&mut self, s: &str) {
        // serde_json's escaping is the reference; writing into a Vec-backed writer cannot fail.
        let mut w = (&mut self.buf).writer();
        let _ = serde_json::to_writer(&mut w, s);
    }

    /// Fills in the header and returns the complete frame.
    pub fn finish(self, opcode: OpCode) -> Bytes {
        self.finish_with(opcode, 0)
    }

    /// Like [`FrameBuilder::finish`], for a payload compressed with permessage-deflate: RSV1 marks
    /// it (RFC 7692 §6).
    pub fn finish_compressed(self, opcode: OpCode) -> Bytes {
        self.finish_with(opcode, RSV1)
    }

    fn finish_with(self, opcode: OpCode, flags: u8) -> Bytes {
        let mut buf = self.buf;
        let len = buf.len() - MAX_HEADER;
        let header_len = header_len(len);
        let start = MAX_HEADER - header_len;
        write_header(&mut buf[start..MAX_HEADER], opcode, len);
        buf[start] |= flags;
        buf.freeze().slice(start..)
    }
}

/// The RSV1 bit of a frame's first byte: "compressed" under permessage-deflate.
pub const RSV1: u8 = 0x40;

/// The payload of a complete server frame (unmasked, as built here).
pub fn payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or_default()
}

fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

fn write_header(out: &mut [u8], opcode: OpCode, len: usize) {
    out[0] = 0x80 | opcode as u8;
    match out.len() {
        2 => out[1] = len as u8,
        4 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// A complete frame with the given payload.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut b = FrameBuilder::with_capacity(payload.len());
    b.put(payload);
    b.finish(opcode)
}

/// A close frame with a status code and a reason (cut to fit the 125-byte control payload).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = FrameBuilder::with_capacity(2 + end);
    b.put(&code.to_be_bytes());
    b.put(&reason.as_bytes()[..end]);
    b.finish(OpCode::Close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_for_each_length_class() {
        for (len, hdr) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let f = frame(OpCode::Text, &vec![b'a'; len]);
            assert_eq!(f.len(), len + hdr);
            assert_eq!(f[0], 0x81);
            match hdr {
                2 => assert_eq!(f[1] as usize, len),
                4 => {
                    assert_eq!(f[1], 126);
                    assert_eq!(u16::from_be_bytes([f[2], f[3]]) as usize, len);
                }
                _ => {
                    assert_eq!(f[1], 127);
                    assert_eq!(
                        u64::from_be_bytes(f[2..10].try_into().unwrap()) as usize,
                        len
                    );
                }
            }
        }
    }

    #[test]
    fn close_frame_is_bounded_and_keeps_utf8() {
        let f = close(1008, &"é".repeat(100));
        assert_eq!(f[0], 0x88);
        assert!(f[1] as usize <= 125);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 1008);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    #[test]
    fn numbers_and_strings() {
        let mut b = FrameBuilder::with_capacity(8);
        b.put_u64(0);
        b.put(b",");
        b.put_u64(18446744073709551615);
        b.put_json_str("a\"b");
        let f = b.finish(OpCode::Text);
        assert_eq!(&f[2..], b"0,18446744073709551615\"a\\\"b\"");
    }

    #[test]
    fn payload_skips_each_header_class_and_rsv1_is_set() {
        for len in [0usize, 125, 126, 70_000] {
            let body = vec![b'x'; len];
            let mut b = FrameBuilder::with_capacity(len);
            b.put(&body);
            let f = b.finish_compressed(OpCode::Text);
            assert_eq!(f[0], 0xC1);
            assert_eq!(payload(&f), &body[..]);
        }
        assert_eq!(payload(&[]), b"");
    }
}
