//! Graceful shutdown in two phases, so a rolling restart moves clients without a reconnect storm.
//!
//! 1. *Not ready*: `/readyz` turns 503 while the node keeps serving and accepting, for `drain.delay`, so the
//!    load balancer and Kubernetes endpoints stop sending new clients here.
//! 2. *Closing*: the node stops accepting and closes its WebSocket clients with 1001, spaced evenly over
//!    most of what is left of `drain.grace`, so they reconnect elsewhere a few at a time.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The node's drain state, shared with every connection's writer.
#[derive(Default)]
pub struct Drain {
    not_ready: AtomicBool,
    /// Mirrors `closing`: writers check it on every wake-up, and a plain load is cheaper there.
    closing_flag: AtomicBool,
    closing: CancellationToken,
    plan: OnceLock<Plan>,
}

struct Plan {
    start: Instant,
    window: Duration,
    total: usize,
    next: AtomicUsize,
}

impl Drain {
    /// Phase 1: readiness turns false.
    pub fn begin(&self) {
        self.not_ready.store(true, Ordering::Relaxed);
    }

    /// Whether phase 1 has begun.
    pub fn is_draining(&self) -> bool {
        self.not_ready.load(Ordering::Relaxed)
    }

    /// Phase 2: stop accepting and close the `connections` open now, evenly over `window`.
    pub fn close_clients(&self, connections: usize, window: Duration) {
        self.begin();
        let _ = self.plan.set(Plan {
            start: Instant::now(),
            window,
            total: connections.max(1),
            next: AtomicUsize::new(0),
        });
        self.closing_flag.store(true, Ordering::Release);
        self.closing.cancel();
    }

    /// Whether phase 2 has begun.
    pub fn is_closing(&self) -> bool {
        self.closing_flag.load(Ordering::Acquire)
    }

    /// Resolves when phase 2 begins. Cancel-safe.
    pub async fn closing(&self) {
        self.closing.cancelled().await
    }

    /// When the calling connection should close: the next free slot of the plan. Connections that ask
    /// later (more than were open at the start) close at the end of the window.
    pub fn close_time(&self) -> Instant {
        let Some(plan) = self.plan.get() else {
            return Instant::now();
        };
        let rank = plan.next.fetch_add(1, Ordering::Relaxed).min(plan.total);
        plan.start + plan.window.mul_f64(rank as f64 / plan.total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn closes_are_spaced_evenly_over_the_window() {
        let d = Drain::default();
        assert!(!d.is_draining());
        d.close_clients(4, Duration::from_secs(8));
        assert!(d.is_draining() && d.is_closing());
        let start = Instant::now();
        let gaps: Vec<u64> = (0..6).map(|_| (d.close_time() - start).as_secs()).collect();
        assert_eq!(gaps, vec![0, 2, 4, 6, 8, 8]);
    }
}
