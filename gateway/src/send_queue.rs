//! A connection's bounded queue of encoded frames, between everyone who produces frames for it
//! (fan-out, the session's replies) and its single writer task.
//!
//! Producers never wait: a push either queues the frame, or applies the slow-consumer policy right
//! away, so one client that stops reading cannot delay anyone else. The writer takes everything queued
//! in one batch, so a burst costs one lock and one vectored write.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::config::SlowConsumerPolicy;

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
    /// Nothing heard from the client for `server.idle_timeout`.
    pub const IDLE: CloseReason = CloseReason {
        code: 1001,
        reason: "idle timeout",
        discard_queued: false,
    };
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The frame is queued.
    Queued,
    /// The frame is queued and this many older frames were dropped to make room.
    DroppedOldest(usize),
    /// The queue overflowed and the connection is now closing; the frame was not queued.
    Overflow,
    /// The connection is already closing; the frame was not queued.
    Closed,
}

/// The bounded per-connection frame queue.
pub struct SendQueue {
    state: Mutex<State>,
    /// Wakes the writer (the queue's only consumer) when frames arrive or a close is requested.
    /// Cheaper than a `Notify` on the fan-out path: waking is one atomic swap.
    ready: AtomicWaker,
    /// Wakes a reader waiting in [`SendQueue::room`] when the writer takes the queue or a close is
    /// requested.
    taken: Notify,
    max_frames: usize,
    max_bytes: usize,
    policy: SlowConsumerPolicy,
}

struct State {
    frames: VecDeque<Bytes>,
    bytes: usize,
    close: Option<CloseReason>,
}

/// What the writer takes out of the queue in one go.
pub struct Batch {
    /// Frames to write, in order.
    pub frames: VecDeque<Bytes>,
    /// Set when the connection must be closed after writing `frames`.
    pub close: Option<CloseReason>,
}

impl SendQueue {
    /// Makes an empty queue. An empty queue holds no heap memory.
    pub fn new(max_frames: usize, max_bytes: usize, policy: SlowConsumerPolicy) -> Self {
        SendQueue {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                bytes: 0,
                close: None,
            }),
            ready: AtomicWaker::new(),
            taken: Notify::new(),
            max_frames,
            max_bytes,
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waiting, applying the slow-consumer policy when full.
    pub fn push(&self, frame: Bytes) -> Pushed {
        let mut st = self.lock();
        if st.close.is_some() {
            return Pushed::Closed;
        }
        let fits = |st: &State| {
            st.frames.len() < self.max_frames && st.bytes + frame.len() <= self.max_bytes
        };
        let mut dropped = 0;
        if !fits(&st) {
            match self.policy {
                SlowConsumerPolicy::Disconnect => {
                    st.close = Some(CloseReason::SLOW_CONSUMER);
                    drop(st);
                    self.ready.wake();
                    return Pushed::Overflow;
                }
                SlowConsumerPolicy::DropOldest => {
                    while !fits(&st) {
                        match st.frames.pop_front() {
                            Some(old) => {
                                st.bytes -= old.len();
                                dropped += 1;
                            }
                            None => break,
                        }
                    }
                }
            }
        }
        st.bytes += frame.len();
        st.frames.push_back(frame);
        let was_empty = st.frames.len() == 1;
        drop(st);
        if was_empty {
            self.ready.wake();
        }
        if dropped > 0 {
            Pushed::DroppedOldest(dropped)
        } else {
            Pushed::Queued
        }
    }

    /// Asks the writer to close the connection. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.lock();
        if st.close.is_none() {
            st.close = Some(reason);
        }
        drop(st);
        self.ready.wake();
        self.taken.notify_waiters();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Waits until there is something for the writer: frames or a close request. Cancel-safe.
    /// Only the writer may wait here (one waker is kept).
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            self.ready.register(cx.waker());
            let st = self.lock();
            if st.frames.is_empty() && st.close.is_none() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Waits until a close is requested. Cancel-safe; for the writer only, like [`Self::ready`].
    pub async fn closing(&self) {
        std::future::poll_fn(|cx| {
            self.ready.register(cx.waker());
            if self.lock().close.is_some() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until the queue is less than half full (in frames and in bytes), or closing.
    /// Cancel-safe.
    ///
    /// A connection's reader calls this before it reads the client's next request, so that replies
    /// to a client's own requests (pongs, acks, errors, echoes) wait for the writer instead of
    /// overflowing the queue: a client that pipelines requests faster than its replies are written
    /// is slowed down by TCP (its requests stay unread) rather than closed as a slow consumer, and
    /// half the queue stays free for fan-out. Fan-out never waits (see [`SendQueue::push`]).
    pub async fn room(&self) {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            // Registered before the check, so a take() in between is not missed.
            taken.as_mut().enable();
            {
                let st = self.lock();
                if st.close.is_some()
                    || (st.frames.len() * 2 < self.max_frames && st.bytes * 2 < self.max_bytes)
                {
                    return;
                }
            }
            taken.await;
        }
    }

    /// Takes everything queued, and the close request if any.
    pub fn take(&self) -> Batch {
        let mut frames = VecDeque::new();
        let close = self.take_into(&mut frames);
        Batch { frames, close }
    }

    /// Moves everything queued into `frames` (which must be empty) by swapping buffers, so the
    /// queue keeps the caller's spare capacity and pushes do not allocate. Returns the close request,
    /// if any.
    pub fn take_into(&self, frames: &mut VecDeque<Bytes>) -> Option<CloseReason> {
        debug_assert!(frames.is_empty());
        let mut st = self.lock();
        let close = st.close.clone();
        st.bytes = 0;
        std::mem::swap(&mut st.frames, frames);
        drop(st);
        if close.as_ref().is_some_and(|c| c.discard_queued) {
            frames.clear();
        }
        if !frames.is_empty() {
            self.taken.notify_waiters();
        }
        close
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn disconnect_policy_closes_on_overflow() {
        let q = SendQueue::new(2, 1000, SlowConsumerPolicy::Disconnect);
        assert_eq!(q.push(f(1)), Pushed::Queued);
        assert_eq!(q.push(f(1)), Pushed::Queued);
        assert_eq!(q.push(f(1)), Pushed::Overflow);
        assert_eq!(q.push(f(1)), Pushed::Closed);
        let b = q.take();
        assert!(b.frames.is_empty());
        assert_eq!(b.close, Some(CloseReason::SLOW_CONSUMER));
    }

    #[test]
    fn byte_bound_counts() {
        let q = SendQueue::new(100, 10, SlowConsumerPolicy::Disconnect);
        assert_eq!(q.push(f(6)), Pushed::Queued);
        assert_eq!(q.push(f(5)), Pushed::Overflow);
    }

    #[test]
    fn drop_oldest_keeps_newest() {
        let q = SendQueue::new(2, 1000, SlowConsumerPolicy::DropOldest);
        q.push(Bytes::from_static(b"1"));
        q.push(Bytes::from_static(b"2"));
        assert_eq!(q.push(Bytes::from_static(b"3")), Pushed::DroppedOldest(1));
        let b = q.take();
        assert_eq!(
            b.frames,
            vec![Bytes::from_static(b"2"), Bytes::from_static(b"3")]
        );
        assert!(b.close.is_none());
    }

    #[tokio::test]
    async fn room_waits_while_half_full_until_the_writer_takes_or_a_close() {
        use std::time::Duration;
        let q = std::sync::Arc::new(SendQueue::new(4, 1000, SlowConsumerPolicy::Disconnect));
        q.push(f(1));
        // 1 of 4 frames: room.
        tokio::time::timeout(Duration::from_secs(1), q.room())
            .await
            .expect("room at 1 of 4 frames");
        q.push(f(1));
        // 2 of 4: half full, wait for the writer.
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "room() returned at half full");
        assert_eq!(q.take().frames.len(), 2);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room after take")
            .unwrap();
        // Bytes count too, and a close ends the wait.
        q.push(f(600));
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "room() returned at 600 of 1000 bytes"
        );
        q.close(CloseReason::IDLE);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room after close")
            .unwrap();
    }

    #[test]
    fn graceful_close_keeps_queued_frames() {
        let q = SendQueue::new(4, 1000, SlowConsumerPolicy::Disconnect);
        q.push(f(1));
        q.close(CloseReason::GOING_AWAY);
        q.close(CloseReason::IDLE);
        let b = q.take();
        assert_eq!(b.frames.len(), 1);
        assert_eq!(b.close, Some(CloseReason::GOING_AWAY));
    }
}
