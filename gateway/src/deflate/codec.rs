//! Raw DEFLATE for one message at a time (RFC 7692 §7.2), both directions.
//!
//! No context is kept between messages (the node negotiates no context takeover both ways), so the
//! compressor and the decompressor are per worker thread, reset before each message, instead of per
//! connection: an idle connection pays nothing for deflate, and a busy node keeps one of each per
//! thread.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::frame::{FrameBuilder, OpCode};

/// What a sync flush ends a message with; RFC 7692 §7.2.1 strips it on the wire and §7.2.2 puts it
/// back before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    /// The thread's compressor and the level it was made for.
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    /// Compressed bytes of the message at hand, reused so compressing allocates only the frame.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The thread's decompressor.
    static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Why a compressed client message could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates past the size cap (close 1009).
    #[error("message inflates past the size limit")]
    TooLarge,
    /// It is not valid DEFLATE data.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Compresses `payload` into a complete frame with RSV1 set (RFC 7692 §6.1), or `None` when it does
/// not get smaller: the caller then sends the plain frame, which a deflate peer reads as well.
pub fn compress_frame(opcode: OpCode, payload: &[u8], level: u32) -> Option<Bytes> {
    SCRATCH.with_borrow_mut(|out| {
        out.clear();
        DEFLATE.with_borrow_mut(|slot| {
            let c = match slot {
                Some((l, c)) if *l == level => c,
                _ => {
                    &mut slot
                        .insert((level, Compress::new(Compression::new(level), false)))
                        .1
                }
            };
            c.reset();
            deflate_into(c, payload, out)
        })?;
        if !out.ends_with(&TAIL) || out.len() - TAIL.len() >= payload.len() {
            return None;
        }
        let body = &out[..out.len() - TAIL.len()];
        let mut b = FrameBuilder::with_capacity(body.len());
        b.put(body);
        let frame = b.finish_compressed(opcode);
        // A burst of large messages must not leave a large buffer behind on every thread.
        out.truncate(0);
        out.shrink_to(64 << 10);
        Some(frame)
    })
}

/// Deflates all of `input` with a sync flush into `out`. `None` if the compressor fails.
fn deflate_into(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.reserve(input.len() / 2 + 64);
    loop {
        let consumed = c.total_in() as usize;
        c.compress_vec(&input[consumed..], out, FlushCompress::Sync)
            .ok()?;
        // Done once every byte went in and the flush did not run out of room.
        if c.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Some(());
        }
        out.reserve(out.capacity().max(1024));
    }
}

/// Inflates one compressed message (its frames' payloads joined, without the stripped tail) into
/// at most `cap` bytes. Never allocates more than `cap` for the output: a message that would pass it
/// is refused as soon as it does.
pub fn inflate(compressed: &[u8], cap: usize) -> Result<Vec<u8>, InflateError> {
    INFLATE.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        // A guess at the ratio, bounded by the cap; grows by doubling up to the cap.
        let mut out = Vec::with_capacity(cap.min(compressed.len().saturating_mul(4).max(256)));
        for input in [compressed, &TAIL[..]] {
            if inflate_part(d, input, &mut out, cap)? {
                break;
            }
        }
        Ok(out)
    })
}

/// Feeds `input` to the decompressor. `Ok(true)` when the stream ended (a final block), so the rest
/// of the input is not needed.
fn inflate_part(
    d: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    cap: usize,
) -> Result<bool, InflateError> {
    let start = d.total_in();
    loop {
        let pos = (d.total_in() - start) as usize;
        if out.len() == out.capacity() {
            if out.len() >= cap {
                // Full at the cap: one more byte of output means too large.
                let mut probe = [0u8; 64];
                let before = d.total_out();
                let status = d
                    .decompress(&input[pos..], &mut probe, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if d.total_out() > before {
                    return Err(InflateError::TooLarge);
                }
                if status == Status::StreamEnd {
                    return Ok(true);
                }
                if (d.total_in() - start) as usize == input.len() {
                    return Ok(false);
                }
                if d.total_in() - start == pos as u64 {
                    return Err(InflateError::Corrupt);
                }
                continue;
            }
            let grow = out.capacity().max(1024).min(cap - out.len());
            out.reserve_exact(grow);
        }
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(&input[pos..], out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        if status == Status::StreamEnd {
            return Ok(true);
        }
        let consumed_all = (d.total_in() - start) as usize == input.len();
        if consumed_all && out.len() < out.capacity() {
            return Ok(false);
        }
        if d.total_in() == in_before && d.total_out() == out_before && out.len() < out.capacity() {
            // No progress with room to write: the data cannot go on.
            return Err(InflateError::Corrupt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn payload_of(f: &Bytes) -> &[u8] {
        frame::payload(f)
    }

    #[test]
    fn round_trip_and_rsv1() {
        let msg = br#"{"op":"message","topic":"scores.nba","offset":42,"data":{"home":3,"away":1,"home_name":"home","away_name":"away"}}"#.repeat(4);
        let f = compress_frame(OpCode::Text, &msg, 6).expect("compresses");
        assert_eq!(f[0], 0x80 | 0x40 | 0x1);
        let body = payload_of(&f);
        assert!(
            body.len() < msg.len() / 2,
            "{} of {}",
            body.len(),
            msg.len()
        );
        assert!(!body.ends_with(&TAIL));
        assert_eq!(inflate(body, 1 << 20).unwrap(), msg);
        // Each message stands alone: the second compresses the same, with no shared window.
        let g = compress_frame(OpCode::Text, &msg, 6).unwrap();
        assert_eq!(f, g);
    }

    #[test]
    fn round_trip_of_every_size_class() {
        for len in [300usize, 5000, 40_000, 200_000] {
            let msg = "price bid ask volume ".repeat(len / 21 + 1).into_bytes();
            let f = compress_frame(OpCode::Text, &msg[..len], 6).expect("compresses");
            assert_eq!(
                inflate(payload_of(&f), 1 << 20).unwrap(),
                &msg[..len],
                "{len}"
            );
        }
    }

    #[test]
    fn incompressible_payload_stays_plain() {
        // xorshift64: bytes with no repetition for LZ77 or Huffman to use.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(compress_frame(OpCode::Binary, &noise, 9), None);
    }

    #[test]
    fn cap_is_exact() {
        let msg = vec![b'a'; 10_000];
        let f = compress_frame(OpCode::Text, &msg, 6).unwrap();
        let body = payload_of(&f);
        assert_eq!(inflate(body, 10_000).unwrap().len(), 10_000);
        assert_eq!(inflate(body, 9_999), Err(InflateError::TooLarge));
        // A bomb: 16 MiB of zeros in a few KiB, refused at a 64 KiB cap without growing past it.
        let bomb = compress_frame(OpCode::Binary, &vec![0u8; 16 << 20], 9).unwrap();
        assert!(payload_of(&bomb).len() < 64 << 10);
        assert_eq!(
            inflate(payload_of(&bomb), 64 << 10),
            Err(InflateError::TooLarge)
        );
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 1000),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn final_block_from_a_peer_is_read() {
        // A peer may end a message with BFINAL set instead of a sync flush (RFC 7692 §7.2.3.4
        // examples): the empty final stored block `03 00` holds nothing more.
        let mut c = Compress::new(Compression::new(6), false);
        let mut out = Vec::with_capacity(256);
        c.compress_vec(b"Hello", &mut out, FlushCompress::Finish)
            .unwrap();
        assert_eq!(inflate(&out, 100).unwrap(), b"Hello");
    }
}
