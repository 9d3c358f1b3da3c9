//! The queue itself: bounded in frames and bytes, with the slow-consumer policy applied at push
//! time, close requests, and the batches the writer task takes out of it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use super::conflate::Slots;
use super::{CloseReason, DirectWrite, Pushed};
use crate::config::SlowConsumerPolicy;

/// How a frame is queued when the connection is behind.
#[derive(Clone, Copy, Debug)]
pub enum Policy<'a> {
    /// The connection's own slow-consumer policy (`limits.slow_consumer`).
    Own,
    /// Another policy (a namespace's).
    Queue(SlowConsumerPolicy),
    /// Conflated: it replaces a waiting frame of the same key (see [`super::conflate`]).
    Conflate(&'a Bytes),
}

/// The bounded per-connection frame queue.
pub struct SendQueue {
    pub(super) state: Mutex<State>,
    /// Wakes the writer (the queue's only consumer) when frames arrive or a close is requested.
    /// Cheaper than a `Notify` on the fan-out path: waking is one atomic swap.
    pub(super) ready: AtomicWaker,
    /// Wakes a reader waiting in [`SendQueue::room`] when the writer takes the queue or a close is
    /// requested.
    pub(super) taken: Notify,
    max_frames: usize,
    max_bytes: usize,
    policy: SlowConsumerPolicy,
    /// The connection takes full-window permessage-deflate frames: fan-out gives it the shared
    /// compressed frame of each message ([`crate::deflate::SharedFrame`]).
    deflate: bool,
}

pub(super) struct State {
    pub(super) frames: VecDeque<Bytes>,
    /// Conflating frames waiting behind `frames`; their bytes count in `bytes`.
    pub(super) slots: Slots,
    pub(super) bytes: usize,
    pub(super) close: Option<CloseReason>,
    /// The writer has taken frames it has not finished writing: only it may write now.
    pub(super) writer_busy: bool,
    /// The first frame was partly written by a flush: it cannot be dropped.
    pub(super) head_sent: bool,
    /// Where frames go while the writer is idle; `None` once the session ended.
    pub(super) direct: Option<Arc<dyn DirectWrite>>,
}

impl State {
    /// Drops every queued frame but a partly written head, which must still be finished so that the
    /// close frame after it starts on a frame boundary.
    fn discard_queued(&mut self) {
        let keep = usize::from(self.head_sent);
        self.frames.truncate(keep);
        self.slots.clear();
        self.bytes = self.frames.iter().map(Bytes::len).sum();
    }

    /// Frames waiting, queued and conflating.
    pub(super) fn len(&self) -> usize {
        self.frames.len() + self.slots.len()
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.slots.is_empty()
    }
}

/// What the writer takes out of the queue in one go.
#[derive(Debug, Default)]
pub struct Batch {
    /// Frames to write, in order.
    pub frames: VecDeque<Bytes>,
    /// Set when the connection must be closed after writing `frames`.
    pub close: Option<CloseReason>,
    /// Whether the socket already took part of the first frame (a direct flush began it): it must
    /// be finished, even when the rest is discarded.
    pub head_sent: bool,
}

impl SendQueue {
    /// Makes an empty queue without a direct-write handle (tests).
    #[cfg(test)]
    pub fn new(max_frames: usize, max_bytes: usize, policy: SlowConsumerPolicy) -> Self {
        Self::with_direct(max_frames, max_bytes, policy, None)
    }

    /// Makes an empty queue whose frames are written through `direct` while the writer is idle.
    pub fn with_direct(
        max_frames: usize,
        max_bytes: usize,
        policy: SlowConsumerPolicy,
        direct: Option<Arc<dyn DirectWrite>>,
    ) -> Self {
        SendQueue {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                slots: Slots::default(),
                bytes: 0,
                close: None,
                writer_busy: false,
                head_sent: false,
                direct,
            }),
            ready: AtomicWaker::new(),
            taken: Notify::new(),
            max_frames,
            max_bytes,
            policy,
            deflate: false,
        }
    }

    /// Marks the queue's connection as one that takes compressed frames (before it is shared).
    pub fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// Whether the connection takes full-window permessage-deflate frames.
    pub fn takes_deflate(&self) -> bool {
        self.deflate
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame without waiting, applying the slow-consumer policy when full, and writes it
    /// right away when it is this queue's turn to be flushed (see [`SendQueue::enqueue`]).
    pub fn push(&self, frame: Bytes) -> Pushed {
        let (pushed, flush) = self.enqueue(frame);
        if flush {
            self.flush();
        }
        pushed
    }

    /// Queues a frame without waiting and without writing, applying the slow-consumer policy when
    /// full. Returns, besides what it did, whether the caller must [`flush`](SendQueue::flush) the
    /// queue: true for the push that finds the queue empty while the writer is idle on a
    /// direct-write connection. Until that flush, later pushes only queue.
    pub fn enqueue(&self, frame: Bytes) -> (Pushed, bool) {
        self.enqueue_as(frame, Policy::Own)
    }

    /// [`SendQueue::enqueue`] with the policy that fits the frame.
    pub fn enqueue_as(&self, frame: Bytes, policy: Policy<'_>) -> (Pushed, bool) {
        let mut st = self.lock();
        if st.close.is_some() {
            return (Pushed::Closed, false);
        }
        let key = match policy {
            Policy::Conflate(key) => Some(key),
            Policy::Own | Policy::Queue(_) => None,
        };
        // Behind with conflated frames waiting (or a conflating frame behind anything): the frame
        // joins the tail, so nothing overtakes and waiting keys stay replaceable.
        let to_tail = !st.slots.is_empty() || (key.is_some() && (!st.is_empty() || st.writer_busy));
        // A conflating frame that finds nothing waiting goes out now, like any other; when it
        // does not fit, the connection's own policy applies.
        let overflow_policy = match policy {
            Policy::Queue(p) => p,
            Policy::Own | Policy::Conflate(_) => self.policy,
        };
        let len = frame.len();
        // What the frame adds: a replaced frame's bytes and place are given back.
        let replaced = key.filter(|_| to_tail).and_then(|k| st.slots.waiting(k));
        let fits = |st: &State| {
            let (frames, bytes) = match replaced {
                Some(old) => (st.len(), st.bytes - old + len),
                None => (st.len() + 1, st.bytes + len),
            };
            frames <= self.max_frames && bytes <= self.max_bytes
        };
        let mut dropped = 0;
        if !fits(&st) {
            match overflow_policy {
                SlowConsumerPolicy::Disconnect => return (self.overflow(st), false),
                SlowConsumerPolicy::DropOldest => {
                    // A frame the socket has taken part of must be finished, or the stream breaks.
                    let keep = usize::from(st.head_sent);
                    while !fits(&st) && st.frames.len() > keep {
                        if let Some(old) = st.frames.remove(keep) {
                            st.bytes -= old.len();
                            dropped += 1;
                        }
                    }
                    while !fits(&st) && replaced.is_none() {
                        let Some(old) = st.slots.pop_oldest() else {
                            break;
                        };
                        st.bytes -= old.len();
                        dropped += 1;
                    }
                    if !fits(&st) {
                        return (self.overflow(st), false);
                    }
                }
            }
        }
        st.bytes += len;
        let mut pushed = Pushed::Queued;
        let first = if to_tail {
            match key {
                Some(key) => {
                    if let Some(old) = st.slots.put(key, frame) {
                        st.bytes -= old.len();
                        pushed = Pushed::Conflated;
                    }
                }
                None => st.slots.push(frame),
            }
            // Whoever made the connection behind (a queued frame's flush, or the busy writer)
            // writes the tail after the queue; were nobody left to (the queue written, the writer
            // idle), the tail becomes the queue now.
            let orphaned = st.frames.is_empty() && !st.writer_busy;
            if orphaned {
                let State { slots, frames, .. } = &mut *st;
                slots.drain_into(frames);
            }
            orphaned
        } else {
            st.frames.push_back(frame);
            // A busy writer takes the queue again when its write is done; otherwise the first frame
            // into an empty queue is flushed directly, or wakes the writer.
            st.frames.len() == 1 && !st.writer_busy
        };
        let flush = first && st.direct.is_some();
        drop(st);
        if first && !flush {
            self.ready.wake();
        }
        if dropped > 0 {
            pushed = Pushed::DroppedOldest(dropped);
        }
        (pushed, flush)
    }

    /// Closes a connection whose queue overflowed (`disconnect`).
    fn overflow(&self, mut st: MutexGuard<'_, State>) -> Pushed {
        st.close = Some(CloseReason::SLOW_CONSUMER);
        // Freed now rather than when the writer gets to them: a consumer that is stuck may keep
        // the writer waiting on its socket for a while.
        st.discard_queued();
        drop(st);
        self.ready.wake();
        self.taken.notify_waiters();
        Pushed::Overflow
    }

    /// See [`DirectWrite::limit_unsent`]; nothing on a queue without a socket handle.
    pub fn limit_unsent(&self, bytes: u32) {
        let direct = self.lock().direct.clone();
        if let Some(direct) = direct {
            direct.limit_unsent(bytes);
        }
    }

    /// Whether a reader may be waiting in [`SendQueue::room`].
    pub(super) fn is_half_full(&self, st: &State) -> bool {
        st.len() * 2 >= self.max_frames || st.bytes * 2 >= self.max_bytes
    }

    /// Marks the connection as ended: no more frames are taken, and the socket handle is released
    /// so the connection's file descriptor closes even while others still hold the queue.
    pub fn detach(&self) {
        let mut st = self.lock();
        st.direct = None;
        if st.close.is_none() {
            st.close = Some(CloseReason::PEER_GONE);
        }
        st.frames = VecDeque::new();
        st.slots.clear();
        st.bytes = 0;
        st.head_sent = false;
        drop(st);
        // A reader waiting in `room` (a resume's replay, for one) wakes up and sees it closing.
        self.taken.notify_waiters();
    }

    /// Asks the writer to close the connection. The first reason wins; when it discards the queue,
    /// queued frames are dropped at once (but a partly written one).
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.lock();
        if st.close.is_none() {
            if reason.discard_queued {
                st.discard_queued();
            }
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

    /// The close requested, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    /// Waits until there is something for the writer: frames or a close request. Cancel-safe.
    /// Only the writer may wait here (one waker is kept).
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            self.ready.register(cx.waker());
            let st = self.lock();
            if st.is_empty() && st.close.is_none() {
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
                if st.close.is_some() || !self.is_half_full(&st) {
                    return;
                }
            }
            taken.await;
        }
    }

    /// Takes everything queued, and the close request if any (tests).
    #[cfg(test)]
    pub fn take(&self) -> Batch {
        let mut batch = Batch::default();
        self.take_batch(&mut batch);
        batch
    }

    /// Moves everything queued into `batch` (whose `frames` must be empty) by swapping buffers, so
    /// the queue keeps the caller's spare capacity and pushes do not allocate. Sets the batch's
    /// close request and whether its first frame is partly written.
    ///
    /// From here until a take finds the queue empty, the caller is the connection's only writer
    /// (see the module's invariants).
    pub fn take_batch(&self, batch: &mut Batch) {
        debug_assert!(batch.frames.is_empty());
        let mut st = self.lock();
        batch.close = st.close.clone();
        st.bytes = 0;
        std::mem::swap(&mut st.frames, &mut batch.frames);
        st.slots.drain_into(&mut batch.frames);
        // While the writer holds frames, nobody else may write: they would overtake them.
        st.writer_busy = !batch.frames.is_empty();
        batch.head_sent = std::mem::take(&mut st.head_sent);
        drop(st);
        if batch.close.as_ref().is_some_and(|c| c.discard_queued) {
            // Even when discarding, a partly written frame is finished before the close frame.
            batch.frames.truncate(usize::from(batch.head_sent));
        }
        if !batch.frames.is_empty() {
            self.taken.notify_waiters();
        }
    }
}
