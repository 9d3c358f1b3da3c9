//! The client-to-server half of RFC 6455: whole messages out of raw frames.
//!
//! fastwebsockets parses single frames; this layer adds what pubgate needs on top of it (see
//! shared notes on fastwebsockets 0.10): a cap on the reassembled size of fragmented messages, UTF-8
//! validation of fragmented text, strict checks of control frames, and a mapping of every violation
//! to the RFC 6455 close code that fits. Automatic pong and close echo are off: the session answers
//! through its own send queue, so nothing is ever written from the read side.

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Role, WebSocketError, WebSocketRead};
use tokio::io::AsyncRead;

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

/// Why reading stopped: either a protocol violation (answer with this close code) or the peer went
/// away (nothing to answer).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Close with this code and reason.
    Violation(u16, &'static str),
    /// The connection ended or failed; no close frame can be sent.
    Gone,
}

/// Reads whole messages from a client connection.
pub struct WsReader<R> {
    inner: WebSocketRead<R>,
    max_message: usize,
    partial: Option<Partial>,
}

/// A fragmented message still being received.
struct Partial {
    opcode: OpCode,
    buf: BytesMut,
    /// Text only: `buf[..utf8_valid]` is known to be valid UTF-8. What follows is at most an
    /// incomplete character that the next fragment may finish.
    utf8_valid: usize,
}

/// Close codes a peer may send (RFC 6455 §7.4, as the Autobahn suite checks them).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// Wraps the read half of an upgraded connection. `max_message` bounds a message after
    /// reassembly, and so every single frame.
    pub fn new(read: R, max_message: usize) -> Self {
        let (mut inner, _) =
            fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
        inner.set_auto_close(false);
        inner.set_auto_pong(false);
        // fastwebsockets refuses frames whose length is >= the limit.
        inner.set_max_message_size(max_message.saturating_add(1));
        WsReader {
            inner,
            max_message,
            partial: None,
        }
    }

    /// Reads until one complete message or control frame is available.
    ///
    /// Not cancel-safe (fastwebsockets consumes frame headers before payloads arrive): call it from a
    /// task of its own, never inside `select!`.
    pub async fn next(&mut self) -> Result<Incoming, ReadError> {
        loop {
            let mut frame = self
                .inner
                .read_frame::<_, std::io::Error>(&mut |_| async { Ok(()) })
                .await
                .map_err(map_error)?;
            // RFC 6455 §5.1: a server must fail the connection on an unmasked client frame.
            // fastwebsockets 0.10 does not check, and unmasks only frames that carry a key.
            if !is_masked(&mut frame) {
                return Err(ReadError::Violation(1002, "client frame not masked"));
            }
            if let Some(incoming) = accept(&mut self.partial, self.max_message, frame)? {
                return Ok(incoming);
            }
        }
    }
}

/// Whether the frame arrived with a masking key. fastwebsockets keeps the key private, but writes
/// it back into a formatted header.
fn is_masked(frame: &mut Frame<'_>) -> bool {
    let mut head = [0u8; 16];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

/// Takes one frame: returns a complete message or control frame, or `None` while a fragmented
/// message is still incomplete.
fn accept(
    partial: &mut Option<Partial>,
    max_message: usize,
    frame: Frame<'_>,
) -> Result<Option<Incoming>, ReadError> {
    let fin = frame.fin;
    let opcode = frame.opcode;
    let payload = frame.payload;
    match opcode {
        // fastwebsockets refuses pings over 125 bytes before reading them; pongs and closes it
        // does not check, so they are refused here (closes in `close_code`).
        OpCode::Ping => Ok(Some(Incoming::Ping(Bytes::copy_from_slice(&payload)))),
        OpCode::Pong if payload.len() > 125 => {
            Err(ReadError::Violation(1002, "control frame too large"))
        }
        OpCode::Pong => Ok(Some(Incoming::Pong)),
        OpCode::Close => close_code(&payload).map(|c| Some(Incoming::Close(c))),
        OpCode::Text | OpCode::Binary => {
            if partial.is_some() {
                return Err(ReadError::Violation(
                    1002,
                    "new message inside a fragmented one",
                ));
            }
            let data = Bytes::copy_from_slice(&payload);
            if fin {
                // fastwebsockets has validated UTF-8 of unfragmented text already.
                return Ok(Some(if opcode == OpCode::Text {
                    Incoming::Text(data)
                } else {
                    Incoming::Binary(data)
                }));
            }
            let mut buf = BytesMut::with_capacity(payload.len().max(256));
            buf.extend_from_slice(&payload);
            let mut p = Partial {
                opcode,
                buf,
                utf8_valid: 0,
            };
            // fastwebsockets does not validate text frames without FIN: check the first fragment
            // now, so invalid text fails fast instead of after the whole message arrived.
            p.check_utf8(false)?;
            *partial = Some(p);
            Ok(None)
        }
        OpCode::Continuation => {
            let Some(p) = partial.as_mut() else {
                return Err(ReadError::Violation(1002, "continuation without a message"));
            };
            if p.buf.len() + payload.len() > max_message {
                return Err(ReadError::Violation(1009, "message too large"));
            }
            p.buf.extend_from_slice(&payload);
            // Continuation frames are never validated by fastwebsockets.
            p.check_utf8(fin)?;
            if !fin {
                return Ok(None);
            }
            let p = partial.take().expect("checked above");
            let data = p.buf.freeze();
            Ok(Some(if p.opcode == OpCode::Text {
                Incoming::Text(data)
            } else {
                Incoming::Binary(data)
            }))
        }
    }
}

impl Partial {
    /// Validates the text received since the last call (binary messages pass). Fails on the first
    /// invalid sequence, so a message is refused as soon as the fragment that breaks it arrives
    /// (RFC 6455 §8.1); an incomplete character at the end is allowed until the last fragment.
    /// Each byte is validated about once: only an unfinished tail of at most 3 bytes is re-read.
    fn check_utf8(&mut self, fin: bool) -> Result<(), ReadError> {
        if self.opcode != OpCode::Text {
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

fn map_error(e: WebSocketError) -> ReadError {
    use WebSocketError as E;
    match e {
        E::InvalidUTF8 => ReadError::Violation(1007, "invalid UTF-8 in text message"),
        E::FrameTooLarge => ReadError::Violation(1009, "message too large"),
        E::ReservedBitsNotZero => ReadError::Violation(1002, "reserved bits set"),
        E::ControlFrameFragmented => ReadError::Violation(1002, "fragmented control frame"),
        E::PingFrameTooLarge => ReadError::Violation(1002, "control frame too large"),
        E::InvalidFragment | E::InvalidContinuationFrame => {
            ReadError::Violation(1002, "invalid fragment")
        }
        E::InvalidValue => ReadError::Violation(1002, "invalid opcode"),
        E::InvalidCloseFrame | E::InvalidCloseCode => {
            ReadError::Violation(1002, "invalid close frame")
        }
        _ => ReadError::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastwebsockets::Payload;

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'static> {
        Frame::new(fin, opcode, None, Payload::Owned(payload.to_vec()))
    }

    /// Feeds frames to `accept` and returns what came of the last one.
    fn feed(frames: &[(bool, OpCode, &[u8])]) -> Result<Option<Incoming>, ReadError> {
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
            (false, OpCode::Text, &euro[..1]),
            (false, OpCode::Continuation, &euro[1..2]),
            (true, OpCode::Continuation, &euro[2..]),
        ]);
        assert!(matches!(r, Ok(Some(Incoming::Text(t))) if t == euro));
    }

    #[test]
    fn fragmented_text_fails_fast_on_invalid_utf8() {
        // Autobahn 6.4.1: the second fragment holds an invalid code point; refused at once.
        let first: &[u8] = &[0xce, 0xba, 0xe1, 0xbd, 0xb9];
        let r = feed(&[
            (false, OpCode::Text, first),
            (false, OpCode::Continuation, &[0xf4, 0x90, 0x80, 0x80]),
        ]);
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1007, "invalid UTF-8 in text message")
        );
        // Autobahn 6.4.2: the byte that breaks a sequence begun in the previous fragment.
        let r = feed(&[
            (false, OpCode::Text, &[0xce, 0xba, 0xf4]),
            (false, OpCode::Continuation, &[0x90]),
        ]);
        assert!(matches!(r, Err(ReadError::Violation(1007, _))));
        // The first fragment alone (fastwebsockets does not check text frames without FIN).
        let r = feed(&[(false, OpCode::Text, &[0xff])]);
        assert!(matches!(r, Err(ReadError::Violation(1007, _))));
    }

    #[test]
    fn fragmented_text_ending_mid_character_is_refused() {
        let r = feed(&[
            (false, OpCode::Text, b"ab"),
            (true, OpCode::Continuation, &[0xe2, 0x82]),
        ]);
        assert!(matches!(r, Err(ReadError::Violation(1007, _))));
    }

    #[test]
    fn fragmented_binary_is_not_utf8_checked_and_is_capped() {
        let r = feed(&[
            (false, OpCode::Binary, &[0xff]),
            (true, OpCode::Continuation, &[0xfe]),
        ]);
        assert!(matches!(r, Ok(Some(Incoming::Binary(b))) if b[..] == [0xff, 0xfe]));
        let big = vec![0u8; 600];
        let r = feed(&[
            (false, OpCode::Binary, &big),
            (true, OpCode::Continuation, &big),
        ]);
        assert_eq!(
            r.unwrap_err(),
            ReadError::Violation(1009, "message too large")
        );
    }

    #[test]
    fn mask_bit_is_seen() {
        let mut f = frame(true, OpCode::Text, b"x");
        assert!(!is_masked(&mut f));
        let mut f = Frame::new(
            true,
            OpCode::Text,
            Some([1, 2, 3, 4]),
            Payload::Owned(vec![0; 70000]),
        );
        assert!(is_masked(&mut f));
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
}
