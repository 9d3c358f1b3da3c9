//! The server-to-client half of a connection: one task that owns the socket's write side.
//!
//! It drains the connection's [`SendQueue`] in batches with vectored writes, sends heartbeat pings,
//! enforces the idle timeout, reacts to drain, and writes the final close frame.
//!
//! It is not the socket's only writer: on plain TCP, whoever queues a frame while this task is idle
//! writes it straight to the socket, and this task takes over only when the socket would block (see
//! [`crate::send_queue`]). The queue lets one of them write at a time, so frames never interleave.

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
use crate::send_queue::{CloseReason, MAX_SLICES, SendQueue, drop_written, fill_slices};

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
    let mut frames = VecDeque::new();
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
        let close = queue.take_into(&mut frames);
        if frames.is_empty() && close.is_none() {
            tokio::select! {
                _ = queue.ready() => {}
                _ = &mut ping_timer => {}
                _ = drain.closing(), if close_at.is_none() => {}
                _ = sleep_until_some(close_at) => {}
            }
            continue;
        }
        if !frames.is_empty()
            && let Err(e) = write_watched(&mut w, &mut frames, &queue, heartbeat.idle_timeout).await
        {
            return WriterEnd::Failed(e);
        }
        // A burst may have grown the buffer; an idle connection should not keep it.
        frames.shrink_to(4);
        if let Some(reason) = close {
            if reason.code != CloseReason::PEER_GONE.code {
                // Boxed: this runs once per connection, and keeping its state out of the writer's
                // future keeps every idle connection smaller.
                Box::pin(send_close(&mut w, &reason)).await;
            }
            return WriterEnd::Closed(reason);
        }
    }
}

/// Sends the close frame and shuts the write side down, best effort: a peer that does not take it
/// within a second is dropped.
async fn send_close<W: AsyncWrite + Unpin>(w: &mut W, reason: &CloseReason) {
    let mut close = VecDeque::from([frame::close(reason.code, reason.reason)]);
    let deadline = Duration::from_secs(1);
    let _ = tokio::time::timeout(deadline, write_frames(w, &mut close, None)).await;
    let _ = tokio::time::timeout(deadline, w.shutdown()).await;
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes a batch, giving up when the connection is told to drop its queue (slow consumer) or no
/// byte moves for `stall_limit`.
async fn write_watched<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &mut VecDeque<Bytes>,
    queue: &SendQueue,
    stall_limit: Duration,
) -> io::Result<()> {
    // When a byte last moved. The stall timer measures silence, not the whole batch: a big batch to
    // a client that reads steadily but slowly takes longer than `stall_limit` and must not be cut
    // off for it.
    //
    // Most batches go out in one non-blocking write: try that first, without arming a timer or
    // reading the clock. Dropping the attempt while it is pending loses nothing: `frames` only
    // changes after bytes were written.
    {
        let attempt = write_frames(w, frames, None);
        tokio::pin!(attempt);
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(r) = attempt.as_mut().poll(&mut cx) {
            return r;
        }
    }
    let progress = LastHeard::new();
    let write = write_frames(w, frames, Some(&progress));
    tokio::pin!(write);
    let stall = tokio::time::sleep(stall_limit);
    tokio::pin!(stall);
    loop {
        tokio::select! {
            r = &mut write => return r,
            _ = queue.closing() => {
                // Give the frames in flight a moment, so a close frame can follow cleanly.
                return match tokio::time::timeout(Duration::from_secs(1), &mut write).await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "peer not reading")),
                };
            }
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

/// Writes every frame, several per system call, touching `progress` whenever bytes were written.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &mut VecDeque<Bytes>,
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
        drop_written(frames, written);
    }
    w.flush().await
}
