//! permessage-deflate (RFC 7692): negotiation ([`negotiate`]), the codec ([`codec`]), and the
//! compressed form of a fan-out frame, built at most once per message per node ([`SharedFrame`]).
//!
//! Every connection that accepted deflate negotiated no context takeover in both directions, so a
//! compressed server message depends on nothing sent before it: the registry compresses a message
//! once, the first time a deflate subscriber needs it, and every deflate subscriber gets the same
//! bytes, as plain subscribers get the same plain bytes. Messages under `compression.min_size`, and
//! messages that do not shrink, go out plain to everyone.

pub mod codec;
pub mod negotiate;

use std::cell::{Cell, OnceCell};

use bytes::Bytes;

use crate::frame::{self, OpCode};
use crate::metrics::Metrics;

pub use codec::{InflateError, compress_frame, inflate};
pub use negotiate::{Agreement, Decline, negotiate};

/// How the node compresses what it sends: `compression.min_size` and `compression.level`. Absent
/// when `compression.enabled` is false (then no connection negotiates deflate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// Payloads shorter than this go out plain: compressing them saves too little to pay for it.
    pub min_size: usize,
    /// DEFLATE level, 0 (stored) to 9 (smallest).
    pub level: u32,
}

impl Outbound {
    /// A frame for one client (a reply, an echo): compressed when the client takes compressed
    /// frames and the payload is worth it, else plain. Compresses every time it is called: for
    /// frames that go to many clients, use [`SharedFrame`].
    pub fn frame(this: Option<&Outbound>, deflate: bool, opcode: OpCode, payload: &[u8]) -> Bytes {
        if let Some(out) = this
            && deflate
            && payload.len() >= out.min_size
            && let Some(f) = compress_frame(opcode, payload, out.level)
        {
            return f;
        }
        frame::frame(opcode, payload)
    }
}

/// One message on its way to its subscribers: the plain frame, encoded the first time a subscriber
/// needs it, and the compressed frame, built the first time a deflate subscriber needs it; each is
/// shared by every subscriber that gets that form.
///
/// Lives for one fan-out (on the stack); counts what it did into the metrics when dropped, so the
/// per-subscriber path touches no shared counter.
pub struct SharedFrame<'a> {
    encode: &'a dyn Fn() -> Bytes,
    plain: OnceCell<Bytes>,
    deflated: OnceCell<Option<Bytes>>,
    out: Option<&'a Outbound>,
    metrics: &'a Metrics,
    deliveries: Cell<u64>,
    saved: Cell<u64>,
}

impl<'a> SharedFrame<'a> {
    /// A message whose plain text frame `encode` builds (called at most once).
    pub fn new(
        encode: &'a dyn Fn() -> Bytes,
        out: Option<&'a Outbound>,
        metrics: &'a Metrics,
    ) -> Self {
        SharedFrame {
            encode,
            plain: OnceCell::new(),
            deflated: OnceCell::new(),
            out,
            metrics,
            deliveries: Cell::new(0),
            saved: Cell::new(0),
        }
    }

    /// The plain frame.
    pub fn plain(&self) -> &Bytes {
        self.plain.get_or_init(self.encode)
    }

    /// The frame for a subscriber: the shared compressed one if `deflate` (the subscriber's
    /// connection takes full-window compressed frames) and the message is worth compressing, else the
    /// plain one.
    pub fn for_subscriber(&self, deflate: bool) -> Bytes {
        let Some(out) = self.out.filter(|_| deflate) else {
            return self.plain().clone();
        };
        let plain = self.plain();
        let deflated = self.deflated.get_or_init(|| {
            let payload = frame::payload(plain);
            if payload.len() < out.min_size {
                return None;
            }
            self.metrics.deflate_frames.inc();
            compress_frame(OpCode::Text, payload, out.level)
        });
        match deflated {
            Some(f) => {
                self.deliveries.set(self.deliveries.get() + 1);
                self.saved
                    .set(self.saved.get() + (plain.len() - f.len()) as u64);
                f.clone()
            }
            None => plain.clone(),
        }
    }
}

impl Drop for SharedFrame<'_> {
    fn drop(&mut self) {
        if self.deliveries.get() > 0 {
            self.metrics
                .deflate_deliveries
                .inc_by(self.deliveries.get());
            self.metrics.deflate_bytes_saved.inc_by(self.saved.get());
        }
    }
}
