//! The command connection (publish, position, replay, canaries) with reconnection, and the broker's
//! health state that readiness is computed from.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::RedisError;

use super::conn::{Conn, Target, Timeouts, is_connection_error};
use super::retry::{backoff, log_attempt};
use crate::BrokerError;

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What readiness is made of. Written by the connection tasks, read by [`Health::is_ready`].
pub struct Health {
    start: Instant,
    /// The command connection is open.
    pub cmd_up: AtomicBool,
    /// The subscription connection is open and every topic is subscribed on it.
    pub sub_up: AtomicBool,
    /// When the last canary came back, in ms since `start` (0: none since the last reconnect).
    last_canary_ms: AtomicU64,
    canary_timeout: Duration,
    /// Set when the broker is dropped: background loops end.
    pub closed: AtomicBool,
}

impl Health {
    /// Fresh state: nothing connected yet.
    pub fn new(canary_timeout: Duration) -> Self {
        Health {
            start: Instant::now(),
            cmd_up: AtomicBool::new(false),
            sub_up: AtomicBool::new(false),
            last_canary_ms: AtomicU64::new(0),
            canary_timeout,
            closed: AtomicBool::new(false),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        (at.duration_since(self.start).as_millis() as u64).max(1)
    }

    /// Records a canary that came back now.
    pub fn canary_arrived(&self) {
        self.last_canary_ms
            .store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// Forgets earlier canaries: after a reconnect readiness waits for a fresh one.
    pub fn reset_canary(&self) {
        self.last_canary_ms.store(0, Ordering::Relaxed);
    }

    /// How long ago the last canary came back, `None` if none did since the last reconnect.
    pub fn canary_age(&self) -> Option<Duration> {
        let at = self.last_canary_ms.load(Ordering::Relaxed);
        (at != 0).then(|| Duration::from_millis(self.ms(Instant::now()).saturating_sub(at)))
    }

    /// Both connections are up and a canary made the full round trip recently.
    pub fn is_ready(&self) -> bool {
        self.cmd_up.load(Ordering::Relaxed)
            && self.sub_up.load(Ordering::Relaxed)
            && self
                .canary_age()
                .is_some_and(|age| age < self.canary_timeout)
    }

    /// Whether the broker was dropped.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// The shared command connection. Callers get a clone of the current connection, or an immediate
/// `Unavailable` while there is none (a reconnect runs in the background), so a publish never
/// waits for Redis to come back.
pub struct CmdLink {
    target: Arc<Target>,
    timeouts: Timeouts,
    name: String,
    /// What the link is, in log lines.
    what: String,
    /// Whether the link's state is the command connection's part of readiness.
    counts_for_readiness: bool,
    health: Arc<Health>,
    state: Mutex<LinkState>,
}

struct LinkState {
    /// The current connection and its generation.
    conn: Option<(u64, Conn)>,
    generation: u64,
    /// A reconnect loop is running.
    connecting: bool,
}

impl CmdLink {
    /// A link that is not connected yet; the first [`CmdLink::get`] starts connecting. `name` is
    /// its `CLIENT SETNAME`; `counts_for_readiness` makes its state part of [`Health::is_ready`].
    pub fn new(
        target: Arc<Target>,
        timeouts: Timeouts,
        name: String,
        counts_for_readiness: bool,
        health: Arc<Health>,
    ) -> Self {
        CmdLink {
            target,
            timeouts,
            what: format!("Redis connection {name}"),
            name,
            counts_for_readiness,
            health,
            state: Mutex::new(LinkState {
                conn: None,
                generation: 0,
                connecting: false,
            }),
        }
    }

    /// The current connection, or `Unavailable` (and a reconnect starts) when there is none.
    pub fn get(self: &Arc<Self>) -> Result<(u64, Conn), BrokerError> {
        let mut s = lock(&self.state);
        if let Some((generation, conn)) = &s.conn {
            return Ok((*generation, conn.clone()));
        }
        self.start_connecting(&mut s);
        Err(BrokerError::Unavailable(
            "no connection to Redis (reconnecting)".into(),
        ))
    }

    /// Reports that a command on connection `generation` failed; a broken connection is dropped and
    /// replaced in the background.
    pub fn failed(self: &Arc<Self>, generation: u64, e: Option<&RedisError>) {
        if e.is_some_and(|e| !is_connection_error(e)) {
            return;
        }
        let mut s = lock(&self.state);
        if s.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(error = ?e.map(|e| e.to_string()), "{} lost; reconnecting", self.what);
            s.conn = None;
            self.set_up(false);
            self.start_connecting(&mut s);
        }
    }

    /// Drops the current connection (whatever its state) and reconnects, e.g. because the master
    /// moved.
    pub fn reset(self: &Arc<Self>) {
        let mut s = lock(&self.state);
        if s.conn.take().is_some() {
            self.set_up(false);
        }
        self.start_connecting(&mut s);
    }

    fn set_up(&self, up: bool) {
        if self.counts_for_readiness {
            self.health.cmd_up.store(up, Ordering::Relaxed);
        }
    }

    fn start_connecting(self: &Arc<Self>, s: &mut LinkState) {
        if s.connecting || self.health.is_closed() {
            return;
        }
        s.connecting = true;
        tokio::spawn(self.clone().reconnect());
    }

    async fn reconnect(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            if self.health.is_closed() {
                return;
            }
            let budget = self.timeouts.connect + self.timeouts.response * 3;
            let result =
                tokio::time::timeout(budget, self.target.connect(self.timeouts, None, &self.name))
                    .await;
            match result {
                Ok(Ok(conn)) => {
                    let mut s = lock(&self.state);
                    s.generation += 1;
                    s.conn = Some((s.generation, conn));
                    s.connecting = false;
                    self.set_up(true);
                    tracing::info!("{} established", self.what);
                    return;
                }
                Ok(Err(e)) => log_attempt(attempt, &self.what, &e.to_string()),
                Err(_) => log_attempt(attempt, &self.what, "timed out"),
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_connections_and_a_fresh_canary() {
        let h = Health::new(Duration::from_secs(3));
        assert!(!h.is_ready());
        h.cmd_up.store(true, Ordering::Relaxed);
        h.sub_up.store(true, Ordering::Relaxed);
        assert!(!h.is_ready(), "no canary yet");
        h.canary_arrived();
        assert!(h.is_ready());
        h.reset_canary();
        assert!(!h.is_ready());
    }
}
