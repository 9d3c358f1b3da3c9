//! Fan-out flush scheduling: which queues are due a direct flush, and when and where those flushes
//! run (never under the topic's lock; in tasks of their own for a big fan-out).

use std::sync::Arc;

use bytes::Bytes;

use super::{Policy, Pushed, SendQueue};

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
    #[cfg(test)]
    pub fn push(&mut self, queue: &Arc<SendQueue>, frame: Bytes) -> Pushed {
        self.push_as(queue, frame, Policy::Own)
    }

    /// [`Flushes::push`] with the policy that fits the frame.
    pub fn push_as(&mut self, queue: &Arc<SendQueue>, frame: Bytes, policy: Policy<'_>) -> Pushed {
        let (pushed, flush) = queue.enqueue_as(frame, policy);
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
