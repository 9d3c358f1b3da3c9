//! The server-to-client half of a connection: one task that owns the socket's write side.
//!
//! It drains the connection's [`SendQueue`] in batches with vectored writes, sends heartbeat pings,
//! enforces the idle timeout, reacts to drain, and writes the final close frame.
//!
//! It is not the socket's only writer: whoever queues a frame while this task is idle
//! writes it straight to the socket, and this task takes over only when the socket would block (see
//! [`crate::send_queue`]). The queue lets one of them write at a time, and only on a frame
//! boundary, so frames never interleave and are never cut.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::drain::Drain;
use crate::frame::{self, OpCode};
use crate::send_queue::{Batch, CloseReason, MAX_SLICES, SendQueue, drop_written, fill_slices};

/// Timing of heartbeats and timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    /// Server ping period.
    pub ping_interval: Duration,
    /// Close after this long without hearing from the client; also the longest a single write may
    /// make no progress.
    pub idle_timeout: Duration,
}

/// When the connection last heard from its client, in milliseconds since `epoch`.
pub struct LastHeard {
    epoch: Instant,
    millis: AtomicU64,
}

impl LastHeard {
    /// Starts the clock now.
    pub fn new() -> Self {
        LastHeard {
            epoch: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    /// Records a sign of life.
    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.millis.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

impl Default for LastHeard {
    fn default() -> Self {
        LastHeard::new()
    }
}

/// How the writer ended.
#[derive(Debug)]
pub enum WriterEnd {
    /// A close frame was sent (or the peer was already gone) for this reason.
    Closed(CloseReason),
    /// Writing failed or stalled; the socket is unusable.
    Failed(io::Error),
}

/// Runs the writer until the connection closes.
pub async fn run<W: AsyncWrite + Unpin>(
    mut w: W,
    queue: Arc<SendQueue>,
    heard: Arc<LastHeard>,
    heartbeat: Heartbeat,
    drain: Arc<Drain>,
) -> WriterEnd {
    let mut next_ping = Instant::now() + heartbeat.ping_interval;
    // One timer for the whole connection, moved when a ping is due: creating a timer on every
    // wake-up showed up in profiles of busy fan-out.
    let ping_timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(ping_timer);
    let mut close_at: Option<Instant> = None;
    // Swapped with the queue's buffer on every take, so neither side allocates per message.
    let mut batch = Batch::default();
    loop {
        let now = Instant::now();
        // Checked on every pass, not only when idle, so a busy connection still drains and pings.
        if close_at.is_none() && drain.is_closing() {
            close_at = Some(drain.close_time());
        }
        if close_at.is_some_and(|at| now >= at) {
            queue.close(CloseReason::GOING_AWAY);
        }
        if now >= next_ping || ping_timer.is_elapsed() {
            next_ping = now + heartbeat.ping_interval;
            ping_timer.as_mut().reset(next_ping);
            if heard.silent_for() > heartbeat.idle_timeout {
                queue.close(CloseReason::IDLE);
            } else {
                queue.push(frame::frame(OpCode::Ping, b""));
            }
        }
        queue.take_batch(&mut batch);
        if batch.frames.is_empty() && batch.close.is_none() {
            tokio::select! {
                _ = queue.ready() => {}
                _ = &mut ping_timer => {}
                _ = drain.closing(), if close_at.is_none() => {}
                _ = sleep_until_some(close_at) => {}
            }
            continue;
        }
        if !batch.frames.is_empty()
            && let Err(e) = write_watched(&mut w, &mut batch, &queue, heartbeat.idle_timeout).await
        {
            return WriterEnd::Failed(e);
        }
        // A burst may have grown the buffer; an idle connection should not keep it.
        batch.frames.shrink_to(4);
        if let Some(reason) = batch.close.take() {
            if !reason.is_peer_gone() {
                // Boxed: this runs once per connection, and keeping its state out of the writer's
                // future keeps every idle connection smaller.
                Box::pin(send_close(&mut w, &reason, heartbeat.idle_timeout)).await;
            }
            return WriterEnd::Closed(reason);
        }
    }
}

/// Sends the close frame and shuts the write side down, best effort.
///
/// A close that discards the queue was brought on by the peer: it overflowed its queue (slow
/// consumer), or sent a close frame itself. Its socket may still be full of what it has not read
/// yet, so the close frame waits for room like any write, up to `stall_limit`. Other closes (drain,
/// idle timeout, protocol violation) give the peer a second: a drain must stay bounded.
async fn send_close<W: AsyncWrite + Unpin>(w: &mut W, reason: &CloseReason, stall_limit: Duration) {
    let deadline = if reason.discard_queued {
        stall_limit
    } else {
        Duration::from_secs(1)
    };
    let mut close = VecDeque::from([frame::close(reason.code, reason.reason)]);
    let mut head_sent = false;
    let _ = tokio::time::timeout(deadline, write_frames(w, &mut close, &mut head_sent, None)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes a batch, giving up when no byte moves for `stall_limit`, and reacting to a close
/// requested meanwhile:
///
/// - the peer is gone: the rest of the batch is dropped;
/// - a close that discards the queue (slow consumer, the client's own close): the frames not begun
///   are dropped, and a frame the socket already took part of is finished (the stall limit still
///   applies), so that the close frame after it starts on a frame boundary;
/// - any other close (drain, idle, protocol violation): the frames in flight get a second.
async fn write_watched<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &mut Batch,
    queue: &SendQueue,
    stall_limit: Duration,
) -> io::Result<()> {
    // Most batches go out in one non-blocking write: try that first, without arming a timer or
    // reading the clock. Dropping a write while it is pending loses nothing: the batch only changes
    // after bytes were written.
    {
        let attempt = write_frames(w, &mut batch.frames, &mut batch.head_sent, None);
        tokio::pin!(attempt);
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(r) = attempt.as_mut().poll(&mut cx) {
            return r;
        }
    }
    // When a byte last moved. The stall timer measures silence, not the whole batch: a big batch to
    // a client that reads steadily but slowly takes longer than `stall_limit` and must not be cut
    // off for it.
    let progress = LastHeard::new();
    let stall = tokio::time::sleep(stall_limit);
    tokio::pin!(stall);
    // Set once a discarding close left only a partly written frame to finish.
    let mut trimmed = false;
    loop {
        {
            let write = write_frames(w, &mut batch.frames, &mut batch.head_sent, Some(&progress));
            tokio::pin!(write);
            loop {
                tokio::select! {
                    r = &mut write => return r,
                    _ = queue.closing(), if !trimmed => break,
                    _ = &mut stall => {
                        let quiet = progress.silent_for();
                        if quiet < stall_limit {
                            stall.as_mut().reset(Instant::now() + (stall_limit - quiet));
                            continue;
                        }
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled"));
                    }
                }
            }
        }
        let reason = queue.close_reason().unwrap_or(CloseReason::PEER_GONE);
        if reason.is_peer_gone() {
            batch.frames.clear();
            return Ok(());
        }
        if reason.discard_queued {
            batch.frames.truncate(usize::from(batch.head_sent));
            trimmed = true;
            continue;
        }
        let rest = write_frames(w, &mut batch.frames, &mut batch.head_sent, Some(&progress));
        return match tokio::time::timeout(Duration::from_secs(1), rest).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "peer not reading")),
        };
    }
}

/// Writes every frame, several per system call, touching `progress` whenever bytes were written and
/// keeping `head_sent` true while the first frame left is partly written.
async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &mut VecDeque<Bytes>,
    head_sent: &mut bool,
    progress: Option<&LastHeard>,
) -> io::Result<()> {
    while !frames.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let count = fill_slices(frames, &mut slices);
        let written = w.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if let Some(p) = progress {
            p.touch();
        }
        *head_sent = drop_written(frames, written);
    }
    w.flush().await
}
