//! The direct-write rules: who may write queued frames straight to the socket, when, and how the
//! writer task takes over (see the invariants in [`super`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes};

use super::SendQueue;
use super::queue::State;

/// A socket that can be written without waiting, from any thread.
pub trait DirectWrite: Send + Sync {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing. Bytes reported as not
    /// written must be offered again, first, by the next write on the connection: a TLS connection
    /// holds one byte back this way when the socket left ciphertext over, so that the writer task
    /// takes over and waits for the socket (see [`crate::tls_stream`]).
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

/// Slices per vectored write, for the direct flush and the writer alike: a burst goes out in a few
/// system calls, and the array stays small on the stack.
pub const MAX_SLICES: usize = 16;

impl SendQueue {
    /// Writes what is queued straight to the socket, as far as it takes it without waiting, while
    /// the writer is idle; hands the rest (and any error) over to the writer. Does nothing on a
    /// queue without a direct-write socket, while the writer is busy, or once closing.
    ///
    /// The writes happen under the queue's lock: that is what keeps two flushes, or a flush and the
    /// writer's next take, from interleaving their bytes. They never wait, so the lock is held for
    /// one non-blocking system call per 16 frames.
    pub fn flush(&self) {
        let mut st = self.lock();
        if st.writer_busy || st.close.is_some() || st.is_empty() {
            return;
        }
        let Some(direct) = st.direct.clone() else {
            return;
        };
        let had_waiters = self.is_half_full(&st);
        loop {
            if st.frames.is_empty() {
                // The conflated frames that waited behind the queue are next.
                let State { slots, frames, .. } = &mut *st;
                slots.drain_into(frames);
                if st.frames.is_empty() {
                    break;
                }
            }
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
        // The socket would block (or failed): the writer waits for it, or reports the error. It
        // takes the queue, partly written head included, and is the only writer until it is done.
        if rest {
            self.ready.wake();
        }
        if room {
            self.taken.notify_waiters();
        }
    }
}

/// Points `slots` at the first frames; returns how many it filled.
pub fn fill_slices<'a>(frames: &'a VecDeque<Bytes>, slots: &mut [IoSlice<'a>]) -> usize {
    let mut count = 0;
    for (slot, f) in slots.iter_mut().zip(frames) {
        *slot = IoSlice::new(f);
        count += 1;
    }
    count
}

/// Drops `written` bytes from the front of `frames` (`written` must not exceed what they hold).
/// Returns whether the first frame left was partly written.
pub fn drop_written(frames: &mut VecDeque<Bytes>, mut written: usize) -> bool {
    while written > 0 {
        let Some(front) = frames.front_mut() else {
            debug_assert!(false, "{written} bytes written beyond the queued frames");
            return false;
        };
        if written < front.len() {
            front.advance(written);
            return true;
        }
        written -= front.len();
        frames.pop_front();
    }
    false
}
