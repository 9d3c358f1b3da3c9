//! A connection's bounded queue of encoded frames, between everyone who produces frames for it
//! (fan-out, the session's replies) and the socket.
//!
//! Producers never wait: a push either queues the frame, or applies the slow-consumer policy right
//! away, so one client that stops reading cannot delay anyone else.
//!
//! Three parts, one job each:
//!
//! - [`queue`]: the queue itself: bounds, the slow-consumer policy, close requests, and what the
//!   connection's writer task ([`crate::writer`]) takes out of it.
//! - [`direct`]: the direct-write rules: on a TCP or TLS connection, whoever queues a frame while the
//!   writer task is idle writes it straight to the socket ([`SendQueue::flush`]) and hands over to
//!   the writer only when the socket would block. Waking a writer task per delivered message
//!   (scheduling, a second lock, the task's poll) cost a third of the fan-out path's CPU in
//!   profiles, next to the one `writev` that is the real work.
//! - [`flushes`]: when those direct writes run during a fan-out ([`Flushes`]): after the topic's
//!   lock is released, spread over tasks for a big fan-out.
//!
//! # Invariants
//!
//! - **Two writers, one at a time.** Bytes reach the socket from the writer task, or from a direct
//!   flush; never from both at once. A flush writes only while `writer_busy` is false, and only
//!   with the queue's lock held, from the queue's head; the writer writes only frames it has taken
//!   out of the queue, and while it holds any, `writer_busy` is true. So frames go out whole and
//!   in order, whoever writes them.
//! - **`writev` under the queue lock.** A flush calls the socket's non-blocking vectored write
//!   while holding the queue's lock. That is what orders it against other flushes and against the
//!   writer's next take; it never waits (the socket either takes bytes or says `WouldBlock`), so
//!   the lock is held for one system call at most per batch of 16 frames.
//! - **Lock order.** The queue's lock is the innermost lock: fan-out takes it while holding its
//!   topic's lock (to queue frames), never the other way round, and no other lock is taken while it
//!   is held, but a TLS connection's own state lock inside the direct write
//!   ([`crate::tls_stream`]), which never takes another. No system call runs under a topic's lock: flushes that are due are collected
//!   ([`Flushes`]) and run after the topic's lock is released.
//! - **Handing over to the writer.** A flush that leaves bytes queued (the socket would block, or
//!   failed) wakes the writer. The writer takes the whole queue (`writer_busy` turns true), writes
//!   it waiting for the socket as long as needed, and takes again; when a take finds the queue
//!   empty, `writer_busy` turns false and the next push flushes directly again. Pushes while the
//!   writer is busy only queue: the writer's next take picks them up.
//! - **No frame is ever cut.** Once the socket has taken part of a frame (`head_sent`), that frame
//!   is finished before anything else: neither the `drop_oldest` policy nor a close that discards
//!   the queue drops it. A close frame always starts on a frame boundary.

mod conflate;
mod direct;
mod flushes;
mod queue;

#[cfg(test)]
mod tests;

pub use direct::{DirectWrite, MAX_SLICES, drop_written, fill_slices};
pub use flushes::Flushes;
pub use queue::{Batch, Policy, SendQueue};

/// Why a connection is being closed, and the close frame it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    /// RFC 6455 status code.
    pub code: u16,
    /// Short reason text.
    pub reason: &'static str,
    /// Whether frames already queued are dropped instead of sent first.
    pub discard_queued: bool,
}

impl CloseReason {
    /// The send queue overflowed under the disconnect policy.
    pub const SLOW_CONSUMER: CloseReason = CloseReason {
        code: 1008,
        reason: "slow consumer: send queue full",
        discard_queued: true,
    };
    /// The node is shutting down; reconnect elsewhere.
    pub const GOING_AWAY: CloseReason = CloseReason {
        code: 1001,
        reason: "server shutting down: reconnect",
        discard_queued: false,
    };
    /// The peer is gone: send nothing more, not even a close frame (1006 never goes on the wire).
    pub const PEER_GONE: CloseReason = CloseReason {
        code: 1006,
        reason: "",
        discard_queued: true,
    };
    /// Nothing heard from the client for `server.idle_timeout`.
    pub const IDLE: CloseReason = CloseReason {
        code: 1001,
        reason: "idle timeout",
        discard_queued: false,
    };

    /// Whether this close sends nothing more at all (the peer is gone).
    pub fn is_peer_gone(&self) -> bool {
        self.code == CloseReason::PEER_GONE.code
    }
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The frame is queued.
    Queued,
    /// The frame is queued and this many older frames were dropped to make room.
    DroppedOldest(usize),
    /// The frame replaced a waiting one of the same conflation key (which is not sent).
    Conflated,
    /// The queue overflowed and the connection is now closing; the frame was not queued.
    Overflow,
    /// The connection is already closing; the frame was not queued.
    Closed,
}
