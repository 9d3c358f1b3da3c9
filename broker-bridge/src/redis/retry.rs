//! Retrying with backoff, and logging retries without flooding the log.

use std::time::Duration;

/// A reconnect delay: exponential from 100 ms up to 5 s, with jitter so a fleet of nodes does not
/// reconnect in lockstep after a Redis restart.
pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let jittered = base / 2 + rand::random::<u64>() % (base / 2 + 1);
    Duration::from_millis(jittered)
}

/// Logs a failed attempt at `what`: the first and every tenth at `warn` (so a wrong password or an
/// unreachable Redis is visible without flooding the log), the rest at `debug`.
pub fn log_attempt(attempt: u32, what: &str, error: &str) {
    if attempt.is_multiple_of(10) {
        tracing::warn!(attempt, error, "{what} failed; retrying");
    } else {
        tracing::debug!(attempt, error, "{what} failed; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            assert!(d >= Duration::from_millis(50), "{d:?}");
            assert!(d <= Duration::from_secs(5), "{d:?}");
        }
        assert!(backoff(10) >= Duration::from_millis(2_500));
    }
}
