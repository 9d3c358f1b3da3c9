//! The receive path's threads: one single-threaded tokio runtime per core, each with its own share
//! of the connections and its own epoll.
//!
//! A work-stealing runtime wakes a second worker whenever one finds several tasks ready, and at
//! 10–20 messages per second per connection most of its wake-ups carry one message: profiles of the
//! tool spent 18% of its CPU in context switches. Connections pinned to a thread are only ever woken
//! by their own socket.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

static SHARDS: OnceLock<Vec<Handle>> = OnceLock::new();

/// Starts `threads` receive threads (once per process; later calls do nothing).
pub fn start(threads: usize) -> std::io::Result<()> {
    if SHARDS.get().is_some() {
        return Ok(());
    }
    let mut handles = Vec::new();
    for i in 0..threads.max(1) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        std::thread::Builder::new()
            .name(format!("receive-{i}"))
            // Runs until the process exits: the runtime drives every task spawned on its handle.
            .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    }
    let _ = SHARDS.set(handles);
    Ok(())
}

/// Spawns connection `k`'s task on its receive thread (on the current runtime when the threads
/// were not started, e.g. in tests and `connect --procs` workers).
pub fn spawn<F>(k: usize, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match SHARDS.get() {
        Some(h) => h[k % h.len()].spawn(fut),
        None => tokio::spawn(fut),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spreads_connections_over_the_threads() {
        super::start(2).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let names: Vec<String> = rt.block_on(async {
            let mut names = Vec::new();
            for k in 0..4 {
                let name = super::spawn(k, async {
                    std::thread::current().name().unwrap_or("").to_string()
                })
                .await
                .unwrap();
                names.push(name);
            }
            names
        });
        assert_eq!(names, ["receive-0", "receive-1", "receive-0", "receive-1"]);
    }
}
