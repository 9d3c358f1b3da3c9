//! The client-to-server half of RFC 6455: whole messages out of frames.
//!
//! [`crate::frame_read`] reads single frames (with a read buffer that costs almost nothing while a
//! connection is idle); this layer reassembles fragmented messages under a size cap, validates UTF-8
//! as fragments arrive (failing at the first bad fragment), checks close frames, and names the
//! RFC 6455 close code for every violation. Messages compressed with permessage-deflate (RSV1 on
//! their first frame, RFC 7692 §6) are inflated here, under the same size cap. Nothing is written
//! from the read side: the session answers pings and closes through its own send queue.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;

use crate::deflate::{self, InflateError};
pub use crate::frame_read::ReadError;
use crate::frame_read::{FrameReader, Opcode, RawFrame};

/// What the client sent.
#[derive(Debug)]
pub enum Incoming {
    /// A complete text message (valid UTF-8).
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping with its payload; the caller answers with a pong.
    Ping(Bytes),
    /// A pong (counts as a sign of life).
    Pong,
    /// A close frame: the code to echo (1000 when the client sent none).
    Close(u16),
}

/// Reads whole messages from a client connection.
pub struct WsReader<R> {
    frames: FrameReader<R>,
    max_message: usize,
    partial: Option<Partial>,
}

/// A fragmented message still being received.
struct Partial {
    opcode: Opcode,
    buf: BytesMut,
    /// Text only: `buf[..utf8_valid]` is known to be valid UTF-8. What follows is at most an
    /// incomplete character that the next fragment may finish.
    utf8_valid: usize,
    /// The message is compressed: `buf` holds DEFLATE data, checked once inflated.
    compressed: bool,
}

/// Close codes a peer may send (RFC 6455 §7.4, as the Autobahn suite checks them).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// Wraps the read half of an upgraded connection. `max_message` bounds a message after
    /// reassembly, and so every single frame.
    pub fn new(read: R, max_message: usize) -> Self {
        WsReader {
            frames: FrameReader::new(read, max_message),
            max_message,
            partial: None,
        }
    }

    /// Reads compressed messages too: for a connection that negotiated permessage-deflate.
    /// Without it, RSV1 on any frame closes with 1002.
    pub fn with_inflate(mut self, inflate: bool) -> Self {
        self.frames.allow_rsv1(inflate);
        self
    }

    /// Reads until one complete message or control frame is available.
    ///
    /// Not cancel-safe (a frame may be half read when the future is dropped): call it from a task of
    /// its own, never inside `select!`.
    pub async fn next(&mut self) -> Result<Incoming, ReadError> {
        loop {
            let frame = self.frames.read().await?;
            if let Some(incoming) = accept(&mut self.partial, self.max_message, frame)? {
                return Ok(incoming);
            }
        }
    }
}

/// Takes one frame: returns a complete message or control frame, or `None` while a fragmented
/// message is still incomplete.
fn accept(
    partial: &mut Option<Partial>,
    max_message: usize,
    frame: RawFrame,
) -> Result<Option<Incoming>, ReadError> {
    // RSV1 comes only on text and binary frames of a deflate connection (see FrameReader).
    let RawFrame {
        fin,
        opcode,
        rsv1,
        payload,
    } = frame;
    match opcode {
        // The frame reader has refused fragmented and oversized (> 125 bytes) control frames.
        Opcode::Ping => Ok(Some(Incoming::Ping(payload.freeze()))),
        Opcode::Pong => Ok(Some(Incoming::Pong)),
        Opcode::Close => close_code(&payload).map(|c| Some(Incoming::Close(c))),
        Opcode::Text | Opcode::Binary => {
            if partial.is_some() {
                return Err(ReadError::Violation(
                    1002,
                    "new message inside a fragmented one",
                ));
            }
            if fin {
                let data = if rsv1 {
                    inflated(&payload, max_message)?
                } else {
                    payload.freeze()
                };
                return complete(opcode, data).map(Some);
            }
            let mut p = Partial {
                opcode,
                buf: payload,
                utf8_valid: 0,
                compressed: rsv1,
            };
            // Check the first fragment now, so invalid text fails fast instead of after the whole
            // message arrived.
            p.check_utf8(false)?;
            *partial = Some(p);
            Ok(None)
        }
        Opcode::Continuation => {
            let Some(p) = partial.as_mut() else {
                return Err(ReadError::Violation(1002, "continuation without a message"));
            };
            if p.buf.len() + payload.len() > max_message {
                return Err(ReadError::Violation(1009, "message too large"));
            }
            p.buf.extend_from_slice(&payload);
            p.check_utf8(fin)?;
            if !fin {
                return Ok(None);
            }
            let p = partial.take().expect("checked above");
            if p.compressed {
                let data = inflated(&p.buf, max_message)?;
                return complete(p.opcode, data).map(Some);
            }
            let data = p.buf.freeze();
            Ok(Some(if p.opcode == Opcode::Text {
                Incoming::Text(data)
            } else {
                Incoming::Binary(data)
            }))
        }
    }
}

/// A whole unfragmented (or inflated) message, its text checked for UTF-8.
fn complete(opcode: Opcode, data: Bytes) -> Result<Incoming, ReadError> {
    if opcode == Opcode::Text {
        if simdutf8::basic::from_utf8(&data).is_err() {
            return Err(ReadError::Violation(1007, "invalid UTF-8 in text message"));
        }
        return Ok(Incoming::Text(data));
    }
    Ok(Incoming::Binary(data))
}

/// Inflates a compressed message under the message size cap.
fn inflated(compressed: &[u8], max_message: usize) -> Result<Bytes, ReadError> {
    match deflate::inflate(compressed, max_message) {
        Ok(data) => Ok(Bytes::from(data)),
        Err(InflateError::TooLarge) => Err(ReadError::Violation(1009, "message too large")),
        Err(InflateError::Corrupt) => Err(ReadError::Violation(1007, "invalid compressed data")),
    }
}

impl Partial {
    /// Validates the text received since the last call (binary messages pass). Fails on the first
    /// invalid sequence, so a message is refused as soon as the fragment that breaks it arrives
    /// (RFC 6455 §8.1); an incomplete character at the end is allowed until the last fragment.
    /// Each byte is validated about once: only an unfinished tail of at most 3 bytes is re-read.
    fn check_utf8(&mut self, fin: bool) -> Result<(), ReadError> {
        if self.opcode != Opcode::Text || self.compressed {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(&self.buf[self.utf8_valid..]) {
            Ok(_) => {
                self.utf8_valid = self.buf.len();
                Ok(())
            }
            Err(e) if e.error_len().is_none() && !fin => {
                self.utf8_valid += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(ReadError::Violation(1007, "invalid UTF-8 in text message")),
        }
    }
}

/// Validates a close frame's payload and returns the code to echo.
fn close_code(payload: &[u8]) -> Result<u16, ReadError> {
    match payload.len() {
        0 => Ok(1000),
        1 => Err(ReadError::Violation(
            1002,
            "close frame with a 1-byte payload",
        )),
        n if n > 125 => Err(ReadError::Violation(1002, "control frame too large")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(ReadError::Violation(1002, "invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ReadError::Violation(1007, "invalid UTF-8 in close reason"));
            }
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: Opcode, payload: &[u8]) -> RawFrame {
        RawFrame {
            fin,
            opcode,
            rsv1: false,
            payload: BytesMut::from(payload),
        }
    }

    /// Feeds frames to `accept` and returns what came of the last one.
    fn feed(frames: &[(bool, Opcode, &[u8])]) -> Result<Option<Incoming>, ReadError> {
        let mut partial = None;
        let mut last = Ok(None);
        for &(fin, op, payload) in frames {
            last = accept(&mut partial, 1024, frame(fin, op, payload));
            if last.is_err() {
                break;
            }
        }
        last
    }

    #[test]
    fn fragmented_text_keeps_characters_split_across_frames() {
        let euro = "€".as_bytes(); // e2 82 ac
        let r = feed(&[
            (false, Opcode::Text, &euro[..1]),
            (false, Opcode::Continuation, &euro[1..2]),
            (true, Opcode::Continuation, &euro[2..]),
        ]);
        assert!(matches!(r, Ok(Some(Incoming::Text(t))) if t == euro));
    }

    #[test]
    fn fragmented_text_fails_fast_on_invalid_utf8() {
        // Autobahn 6.4.1: the second fragment holds an invalid code point; refused at once.
        let first: &[u8] = &[0xce, 0xba, 0xe1, 0xbd, 0xb9];
        let r = feed(&[
            (false, Opcode::Text, first),
            (false, Opcode::Continuation, &[0xf4, 0x90, 0x80, 0x80]),
        ]);
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1007, "invalid UTF-8 in text message")
        );
        // Autobahn 6.4.2: the byte that breaks a sequence begun in the previous fragment.
        let r = feed(&[
            (false, Opcode::Text, &[0xce, 0xba, 0xf4]),
            (false, Opcode::Continuation, &[0x90]),
        ]);
        assert!(matches!(r, Err(ReadError::Violation(1007, _))));
        // The first fragment alone: refused before the rest arrives.
        let r = feed(&[(false, Opcode::Text, &[0xff])]);
        assert!(matches!(r, Err(ReadError::Violation(1007, _))));
    }

    #[test]
    fn fragmented_text_ending_mid_character_is_refused() {
        let r = feed(&[
            (false, Opcode::Text, b"ab"),
            (true, Opcode::Continuation, &[0xe2, 0x82]),
        ]);
        assert!(matches!(r, Err(ReadError::Violation(1007, _))));
    }

    #[test]
    fn fragmented_binary_is_not_utf8_checked_and_is_capped() {
        let r = feed(&[
            (false, Opcode::Binary, &[0xff]),
            (true, Opcode::Continuation, &[0xfe]),
        ]);
        assert!(matches!(r, Ok(Some(Incoming::Binary(b))) if b[..] == [0xff, 0xfe]));
        let big = vec![0u8; 600];
        let r = feed(&[
            (false, Opcode::Binary, &big),
            (true, Opcode::Continuation, &big),
        ]);
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1009, "message too large")
        );
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&[]), Ok(1000));
        assert_eq!(close_code(&[0x03, 0xe8]), Ok(1000));
        assert_eq!(close_code(&[0x0b, 0xb8]), Ok(3000));
        assert!(close_code(&[0x03]).is_err());
        assert!(close_code(&1005u16.to_be_bytes()).is_err());
        assert!(close_code(&999u16.to_be_bytes()).is_err());
        assert_eq!(
            close_code(&[0x03, 0xe8, 0xff]),
            Err(ReadError::Violation(1007, "invalid UTF-8 in close reason"))
        );
    }

    fn deflated(data: &[u8]) -> Vec<u8> {
        let f = deflate::compress_frame(crate::frame::OpCode::Text, data, 6).unwrap();
        crate::frame::payload(&f).to_vec()
    }

    fn compressed(fin: bool, opcode: Opcode, payload: &[u8]) -> RawFrame {
        RawFrame {
            rsv1: true,
            ..frame(fin, opcode, payload)
        }
    }

    #[test]
    fn compressed_messages_inflate_whole_or_fragmented() {
        let text = "é, ".repeat(100);
        let z = deflated(text.as_bytes());
        let mut partial = None;
        let r = accept(&mut partial, 1024, compressed(true, Opcode::Text, &z));
        assert!(matches!(r, Ok(Some(Incoming::Text(t))) if t == text.as_bytes()));
        // Split mid-stream: only the first frame has RSV1.
        let (a, b) = z.split_at(z.len() / 2);
        assert!(matches!(
            accept(&mut partial, 1024, compressed(false, Opcode::Text, a)),
            Ok(None)
        ));
        let r = accept(&mut partial, 1024, frame(true, Opcode::Continuation, b));
        assert!(matches!(r, Ok(Some(Incoming::Text(t))) if t == text.as_bytes()));
    }

    #[test]
    fn compressed_violations() {
        let z = deflated(&[b'a'; 2000]);
        let mut partial = None;
        let r = accept(&mut partial, 1024, compressed(true, Opcode::Text, &z));
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1009, "message too large")
        );
        let r = accept(
            &mut partial,
            1024,
            compressed(true, Opcode::Binary, &[0xff; 8]),
        );
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1007, "invalid compressed data")
        );
        // Inflated text is checked for UTF-8 like any other.
        let bad = deflated(&[0xff; 300]);
        let r = accept(&mut partial, 1024, compressed(true, Opcode::Text, &bad));
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1007, "invalid UTF-8 in text message")
        );
    }
}
