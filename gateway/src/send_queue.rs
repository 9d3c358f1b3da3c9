//! A connection's bounded queue of encoded frames, between everyone who produces frames for it
//! (fan-out, the session's replies) and its single writer task.
//!
//! Producers never wait: a push either queues the frame, or applies the slow-consumer policy right
//! away, so one client that stops reading cannot delay anyone else. The writer takes everything queued
//! in one batch, so a burst costs one lock and one vectored write.
//!
//! On a plain TCP connection the queue also holds a [`DirectWrite`] handle to the socket. While the
//! writer task is idle, whoever queued a frame writes it straight to the socket without waiting
//! ([`SendQueue::flush`]), and only hands over to the writer when the socket would block. Waking a
//! writer task per delivered message (scheduling, a second lock, the task's poll) cost a third of the
//! fan-out path's CPU in profiles, next to the one `writev` that is the real work. Order is kept
//! because every write of a frame happens under the queue's lock from the queue's head, or by the
//! writer while it alone may write (`writer_busy`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::{Buf, Bytes};
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

/// A socket that can be written without waiting, from any thread.
pub trait DirectWrite: Send + Sync {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
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
    /// The writer has taken frames it has not finished writing: only it may write now.
    writer_busy: bool,
    /// The first frame was partly written by a flush: it cannot be dropped.
    head_sent: bool,
    /// Where frames go while the writer is idle; `None` on TLS, and once the session ended.
    direct: Option<Arc<dyn DirectWrite>>,
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
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
        let mut st = self.lock();
        if st.close.is_some() {
            return (Pushed::Closed, false);
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
                    return (Pushed::Overflow, false);
                }
                SlowConsumerPolicy::DropOldest => {
                    // A frame the socket has taken part of must be finished, or the stream breaks.
                    let keep = usize::from(st.head_sent);
                    while !fits(&st) && st.frames.len() > keep {
                        if let Some(old) = st.frames.remove(keep) {
                            st.bytes -= old.len();
                            dropped += 1;
                        }
                    }
                }
            }
        }
        st.bytes += frame.len();
        st.frames.push_back(frame);
        // A busy writer takes the queue again when its write is done; otherwise the first frame into
        // an empty queue is flushed directly, or wakes the writer.
        let first = st.frames.len() == 1 && !st.writer_busy;
        let flush = first && st.direct.is_some();
        drop(st);
        if first && !flush {
            self.ready.wake();
        }
        let pushed = if dropped > 0 {
            Pushed::DroppedOldest(dropped)
        } else {
            Pushed::Queued
        };
        (pushed, flush)
    }

    /// Writes what is queued straight to the socket, as far as it takes it without waiting, while
    /// the writer is idle; hands the rest (and any error) over to the writer. Does nothing on a
    /// queue without a direct-write socket, while the writer is busy, or once closing.
    pub fn flush(&self) {
        let mut st = self.lock();
        if st.writer_busy || st.close.is_some() || st.frames.is_empty() {
            return;
        }
        let Some(direct) = st.direct.clone() else {
            return;
        };
        let had_waiters = self.is_half_full(&st);
        while !st.frames.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = fill_slices(&st.frames, &mut slices);
            match direct.try_write_vectored(&slices[..count]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    st.bytes -= n;
                    st.head_sent = drop_written(&mut st.frames, n);
                }
            }
        }
        let rest = !st.frames.is_empty();
        let room = had_waiters && !self.is_half_full(&st);
        drop(st);
        // The socket would block (or failed): the writer waits for it, or reports the error.
        if rest {
            self.ready.wake();
        }
        if room {
            self.taken.notify_waiters();
        }
    }

    /// Whether a reader may be waiting in [`SendQueue::room`].
    fn is_half_full(&self, st: &State) -> bool {
        st.frames.len() * 2 >= self.max_frames || st.bytes * 2 >= self.max_bytes
    }

    /// Marks the connection as ended: no more frames are taken, and the socket handle is released
    /// so the connection's file descriptor closes even while others still hold the queue. A reader
    /// waiting in [`SendQueue::room`] (a resume's replay, for one) wakes up and sees it closing.
    pub fn detach(&self) {
        let mut st = self.lock();
        st.direct = None;
        if st.close.is_none() {
            st.close = Some(CloseReason::PEER_GONE);
        }
        st.frames = VecDeque::new();
        st.bytes = 0;
        st.head_sent = false;
        drop(st);
        self.taken.notify_waiters();
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
                if st.close.is_some() || !self.is_half_full(&st) {
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
        // While the writer holds frames, nobody else may write: they would overtake them.
        st.writer_busy = !frames.is_empty();
        let head_sent = std::mem::take(&mut st.head_sent);
        drop(st);
        if close.as_ref().is_some_and(|c| c.discard_queued) {
            // Even when discarding, a partly written frame is finished before the close frame.
            frames.truncate(usize::from(head_sent));
        }
        if !frames.is_empty() {
            self.taken.notify_waiters();
        }
        close
    }
}

/// Slices per vectored write, for the direct flush and the writer alike: a burst goes out in a few
/// system calls, and the array stays small on the stack.
pub const MAX_SLICES: usize = 16;

/// Points `slots` at the first frames; returns how many it filled.
pub fn fill_slices<'a>(frames: &'a VecDeque<Bytes>, slots: &mut [IoSlice<'a>]) -> usize {
    let mut count = 0;
    for (slot, f) in slots.iter_mut().zip(frames) {
        *slot = IoSlice::new(f);
        count += 1;
    }
    count
}

/// Drops `written` bytes from the front of `frames`. Returns whether the first frame left was
/// partly written.
pub fn drop_written(frames: &mut VecDeque<Bytes>, mut written: usize) -> bool {
    while written > 0 {
        let front = frames
            .front_mut()
            .expect("written bytes came from queued frames");
        if written < front.len() {
            front.advance(written);
            return true;
        }
        written -= front.len();
        frames.pop_front();
    }
    false
}

/// Queues that are due a [`SendQueue::flush`], collected while a lock is held (fan-out holds its
/// topic's) and flushed after it is released, so no system call runs under that lock.
#[must_use = "frames stay queued until the flushes run"]
pub struct Flushes {
    due: Vec<Arc<SendQueue>>,
}

impl Flushes {
    /// Queues flushed per task when the fan-out spreads its writes over tasks.
    const PER_TASK: usize = 64;

    /// Nothing due yet.
    pub fn new() -> Self {
        Flushes { due: Vec::new() }
    }

    /// Queues `frame` on `queue` (see [`SendQueue::enqueue`]), remembering the queue if it is due a
    /// flush.
    pub fn push(&mut self, queue: &Arc<SendQueue>, frame: Bytes) -> Pushed {
        let (pushed, flush) = queue.enqueue(frame);
        if flush {
            self.due.push(queue.clone());
        }
        pushed
    }

    /// Flushes every due queue now, in this task.
    pub fn run(mut self) {
        for q in self.due.drain(..) {
            q.flush();
        }
    }

    /// Flushes the due queues in tasks of up to 64 queues each, so a big fan-out writes on every
    /// worker thread and the caller (the broker's delivery) does not wait for the system calls.
    /// Without a runtime it flushes in place.
    pub fn spawn(mut self) {
        spawn_flushes(std::mem::take(&mut self.due));
    }
}

/// See [`Flushes::spawn`].
fn spawn_flushes(mut due: Vec<Arc<SendQueue>>) {
    if due.is_empty() {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        due.iter().for_each(|q| q.flush());
        return;
    };
    let tasks = due.len().div_ceil(Flushes::PER_TASK);
    let per_task = due.len().div_ceil(tasks);
    // The last chunk keeps the list itself, so the common single-task fan-out moves it as is.
    while due.len() > per_task {
        let chunk = due.split_off(due.len() - per_task);
        rt.spawn(async move { chunk.iter().for_each(|q| q.flush()) });
    }
    rt.spawn(async move { due.iter().for_each(|q| q.flush()) });
}

impl Default for Flushes {
    fn default() -> Self {
        Flushes::new()
    }
}

impl Drop for Flushes {
    /// A flush that was never run would leave frames queued with nobody to write them.
    fn drop(&mut self) {
        spawn_flushes(std::mem::take(&mut self.due));
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

    /// A connected loopback pair: the server side split like a session's, and the client side.
    async fn tcp_pair() -> (
        crate::tcp::TcpRead,
        crate::tcp::TcpWrite,
        Arc<tokio::net::TcpStream>,
        tokio::net::TcpStream,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (r, w, direct) = crate::tcp::split(server);
        // Known writable, so the first direct write does not find the readiness still unknown.
        direct.writable().await.unwrap();
        (r, w, direct, client)
    }

    /// The connection's writer task, without pings or idle timeout.
    fn spawn_writer(
        w: crate::tcp::TcpWrite,
        q: &Arc<SendQueue>,
    ) -> tokio::task::JoinHandle<crate::writer::WriterEnd> {
        let hour = std::time::Duration::from_secs(3600);
        tokio::spawn(crate::writer::run(
            w,
            q.clone(),
            Arc::new(crate::writer::LastHeard::new()),
            crate::writer::Heartbeat {
                ping_interval: hour,
                idle_timeout: hour,
            },
            Arc::new(crate::drain::Drain::default()),
        ))
    }

    /// A queue over the server side of a fresh loopback pair whose first push is 32 MiB, more than
    /// the socket buffers take while the client does not read: that frame stays partly written.
    async fn queue_with_a_partly_written_head(
        max_frames: usize,
        policy: SlowConsumerPolicy,
    ) -> (
        Arc<SendQueue>,
        crate::tcp::TcpWrite,
        tokio::net::TcpStream,
        Bytes,
    ) {
        let (_r, w, direct, client) = tcp_pair().await;
        let q = Arc::new(SendQueue::with_direct(
            max_frames,
            1 << 30,
            policy,
            Some(direct),
        ));
        let big = Bytes::from(vec![b'A'; 32 << 20]);
        q.push(big.clone());
        assert!(q.lock().head_sent, "the head is partly written");
        (q, w, client, big)
    }

    #[tokio::test]
    async fn a_push_to_an_idle_queue_goes_straight_to_the_socket() {
        use tokio::io::AsyncReadExt;
        let (_r, _w, direct, mut client) = tcp_pair().await;
        let q = Arc::new(SendQueue::with_direct(
            8,
            1 << 20,
            SlowConsumerPolicy::Disconnect,
            Some(direct),
        ));
        // No writer task runs: the bytes can only have come through the direct path.
        assert_eq!(q.push(Bytes::from_static(b"hello ")), Pushed::Queued);
        let mut flushes = Flushes::new();
        assert_eq!(
            flushes.push(&q, Bytes::from_static(b"world")),
            Pushed::Queued
        );
        let mut got = [0u8; 11];
        client.read_exact(&mut got[..6]).await.unwrap();
        assert_eq!(&got[..6], b"hello ");
        // Queued until its flush runs; a push meanwhile only queues behind it.
        assert_eq!(q.push(Bytes::from_static(b"!")), Pushed::Queued);
        assert!(
            matches!(client.try_read(&mut got[6..]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        );
        flushes.run();
        client.read_exact(&mut got[6..]).await.unwrap();
        assert_eq!(&got, b"hello world");
        client.read_exact(&mut got[..1]).await.unwrap();
        assert_eq!(got[0], b'!');
        assert!(q.take().frames.is_empty());
    }

    /// Many frames through spawned flushes and the writer taking over whenever the socket is full:
    /// every frame arrives once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_and_the_writer_keep_order_when_the_socket_fills() {
        use tokio::io::AsyncReadExt;
        const FRAMES: u32 = 20_000;
        let (_r, w, direct, mut client) = tcp_pair().await;
        let q = Arc::new(SendQueue::with_direct(
            1 << 20,
            1 << 30,
            SlowConsumerPolicy::Disconnect,
            Some(direct),
        ));
        let writer = spawn_writer(w, &q);
        let producer = tokio::spawn({
            let q = q.clone();
            async move {
                for i in 0..FRAMES {
                    // 1 KiB frames: the socket buffers fill while the client is not reading.
                    let mut frame = vec![b'.'; 1024];
                    frame[..4].copy_from_slice(&i.to_be_bytes());
                    let mut flushes = Flushes::new();
                    flushes.push(&q, Bytes::from(frame));
                    flushes.spawn();
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
        // Let the buffers fill before reading.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut frame = vec![0u8; 1024];
        for i in 0..FRAMES {
            client.read_exact(&mut frame).await.unwrap();
            let got = u32::from_be_bytes(frame[..4].try_into().unwrap());
            assert_eq!(got, i, "frame {i} arrived as {got}");
        }
        producer.await.unwrap();
        q.close(CloseReason::PEER_GONE);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn detach_stops_direct_writes_and_releases_the_socket() {
        use tokio::io::AsyncReadExt;
        let (r, w, direct, mut client) = tcp_pair().await;
        let q = SendQueue::with_direct(8, 1 << 20, SlowConsumerPolicy::Disconnect, Some(direct));
        drop((r, w));
        q.detach();
        assert_eq!(q.push(Bytes::from_static(b"late")), Pushed::Closed);
        // The queue held the last reference to the socket: it is closed now.
        let mut buf = [0u8; 8];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }

    /// Under `drop_oldest`, a frame the socket has already taken part of is finished, not dropped:
    /// the client sees whole frames only.
    #[tokio::test]
    async fn drop_oldest_never_drops_a_partly_written_frame() {
        use tokio::io::AsyncReadExt;
        let (q, w, mut client, big) =
            queue_with_a_partly_written_head(3, SlowConsumerPolicy::DropOldest).await;
        // Overflow: the oldest whole frames go, the partly written head stays.
        for i in 0..6u8 {
            q.push(Bytes::from(vec![b'0' + i; 10]));
        }
        let writer = spawn_writer(w, &q);
        let mut got = vec![0u8; big.len() + 20];
        // A dropped head would leave the stream short (or torn): bounded wait, clear failure.
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            client.read_exact(&mut got),
        )
        .await
        .expect("the head and the newest frames arrive")
        .unwrap();
        assert!(got[..big.len()].iter().all(|&b| b == b'A'), "head intact");
        assert_eq!(&got[big.len()..], b"44444444445555555555");
        q.close(CloseReason::PEER_GONE);
        writer.await.unwrap();
    }

    /// A slow consumer's queue is discarded on close, but a frame the socket has taken part of is
    /// finished first, so the close frame that follows is readable.
    #[tokio::test]
    async fn discarding_close_finishes_a_partly_written_frame() {
        use tokio::io::AsyncReadExt;
        let (q, w, mut client, big) =
            queue_with_a_partly_written_head(3, SlowConsumerPolicy::Disconnect).await;
        let mut overflowed = false;
        for _ in 0..4 {
            overflowed |= q.push(Bytes::from_static(b"xx")) == Pushed::Overflow;
        }
        assert!(overflowed);
        let writer = spawn_writer(w, &q);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let r = client.read_to_end(&mut got).await;
            (r, got)
        });
        let end = writer.await.unwrap();
        assert!(
            matches!(end, crate::writer::WriterEnd::Closed(ref c) if c.code == 1008),
            "{end:?}"
        );
        let (r, got) = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
            .await
            .expect("the connection is closed")
            .unwrap();
        r.unwrap();
        assert!(got.len() > big.len() + 4, "{} bytes", got.len());
        assert!(got[..big.len()].iter().all(|&b| b == b'A'), "head intact");
        // Then the close frame with 1008, and nothing of the discarded frames.
        let close = &got[big.len()..];
        assert_eq!(close[0], 0x88);
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1008);
        assert_eq!(close.len(), 2 + usize::from(close[1]));
    }
}
