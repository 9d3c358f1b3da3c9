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
    partial: Option<(OpCode, BytesMut)>,
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
            let frame = self
                .inner
                .read_frame::<_, std::io::Error>(&mut |_| async { Ok(()) })
                .await
                .map_err(map_error)?;
            if let Some(incoming) = accept(&mut self.partial, self.max_message, frame)? {
                return Ok(incoming);
            }
        }
    }
}

/// Takes one frame: returns a complete message or control frame, or `None` while a fragmented
/// message is still incomplete.
fn accept(
    partial: &mut Option<(OpCode, BytesMut)>,
    max_message: usize,
    frame: Frame<'_>,
) -> Result<Option<Incoming>, ReadError> {
    let fin = frame.fin;
    let opcode = frame.opcode;
    let payload = frame.payload;
    match opcode {
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
            if fin {
                // fastwebsockets has validated UTF-8 of unfragmented text already.
                let data = Bytes::copy_from_slice(&payload);
                return Ok(Some(finish(opcode, data)?));
            }
            let mut buf = BytesMut::with_capacity(payload.len().max(256));
            buf.extend_from_slice(&payload);
            *partial = Some((opcode, buf));
            Ok(None)
        }
        OpCode::Continuation => {
            let Some((_, buf)) = partial.as_mut() else {
                return Err(ReadError::Violation(1002, "continuation without a message"));
            };
            if buf.len() + payload.len() > max_message {
                return Err(ReadError::Violation(1009, "message too large"));
            }
            buf.extend_from_slice(&payload);
            if !fin {
                return Ok(None);
            }
            let (opcode, buf) = partial.take().expect("checked above");
            Ok(Some(finish(opcode, buf.freeze())?))
        }
    }
}

fn finish(opcode: OpCode, data: Bytes) -> Result<Incoming, ReadError> {
    if opcode == OpCode::Text {
        if simdutf8::basic::from_utf8(&data).is_err() {
            return Err(ReadError::Violation(1007, "invalid UTF-8 in text message"));
        }
        Ok(Incoming::Text(data))
    } else {
        Ok(Incoming::Binary(data))
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
