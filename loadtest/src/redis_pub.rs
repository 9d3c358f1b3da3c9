//! Raw publishes straight into Redis: `PUBLISH <prefix><topic> <payload>`, which every pubgate node on
//! that Redis delivers to its subscribers as `data` without an `offset` (docs/broker.md, "raw
//! publish"). Subscribers then check order and loss by the payload's per-topic sequence number `s`.

use std::net::ToSocketAddrs;

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;

/// Multiplexed Redis connections opened at most, whatever `--publishers` says.
pub const MAX_CONNECTIONS: usize = 4;

/// Where to publish: a loopback Redis and the gateway's channel prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// `redis://[user:password@]127.0.0.1:PORT[/db]`.
    pub url: String,
    /// `broker.prefix` of the gateways (default `pubgate:`).
    pub prefix: String,
}

/// Checks `redis://[user:password@]host:port[/db]` and that the host is a loopback address (the
/// same rule as `--url`).
pub fn check_url(url: &str) -> anyhow::Result<()> {
    let Some(rest) = url.strip_prefix("redis://") else {
        bail!("--redis-url {url}: only redis:// URLs are supported");
    };
    let rest = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let addrs: Vec<_> = hostport
        .to_socket_addrs()
        .with_context(|| {
            format!("--redis-url {url}: cannot resolve {hostport:?} (need host:port)")
        })?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "--redis-url {url}: no address");
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "--redis-url {url}: {} is not a loopback address; pubgate-loadtest only targets 127.0.0.0/8 or ::1",
            a.ip()
        );
    }
    Ok(())
}

/// Open connections, the channel of each topic, and one lock per topic.
///
/// A topic's publishes go out one at a time (the lock is taken before its next `s` is drawn and held
/// until Redis answered), so Redis — and every node behind it — sees each topic's sequence numbers
/// in order, whichever publisher task and connection carried them.
pub struct RedisPub {
    cons: Vec<MultiplexedConnection>,
    channels: Vec<Vec<u8>>,
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl RedisPub {
    /// Connects `connections` (1..=[`MAX_CONNECTIONS`]) multiplexed connections.
    pub async fn open(
        target: &RedisTarget,
        topics: &[std::sync::Arc<str>],
        connections: usize,
    ) -> anyhow::Result<RedisPub> {
        check_url(&target.url)?;
        let client = redis::Client::open(target.url.as_str())
            .with_context(|| format!("--redis-url {}", target.url))?;
        let mut cons = Vec::new();
        for _ in 0..connections.clamp(1, MAX_CONNECTIONS) {
            let con = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                client.get_multiplexed_async_connection(),
            )
            .await
            .with_context(|| format!("connecting to {}: timed out", target.url))?
            .with_context(|| format!("connecting to {}", target.url))?;
            cons.push(con);
        }
        Ok(RedisPub {
            cons,
            channels: topics
                .iter()
                .map(|t| format!("{}{t}", target.prefix).into_bytes())
                .collect(),
            locks: topics.iter().map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    /// Waits for topic `t`'s turn; hold the guard until [`RedisPub::publish`] returned.
    pub async fn turn(&self, t: usize) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks[t].lock().await
    }

    /// `PUBLISH` on topic `t`'s channel through connection `c % connections`; returns how many
    /// Redis subscribers (gateway nodes) got it.
    pub async fn publish(&self, c: usize, t: usize, payload: &[u8]) -> Result<u64, String> {
        let mut con = self.cons[c % self.cons.len()].clone();
        redis::cmd("PUBLISH")
            .arg(&self.channels[t][..])
            .arg(payload)
            .query_async::<u64>(&mut con)
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "redis_timeout".to_string()
                } else if e.is_io_error() || e.is_connection_dropped() {
                    "redis_io".to_string()
                } else {
                    "redis_error".to_string()
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_redis_urls_only() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("redis://:secret@127.0.0.1:6379").is_ok());
        assert!(check_url("redis://user:p@ss@localhost:6379/1").is_ok());
        let e = check_url("redis://192.0.2.1:6379").unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(check_url("rediss://127.0.0.1:6379").is_err());
        assert!(check_url("127.0.0.1:6379").is_err());
        assert!(check_url("redis://127.0.0.1").is_err());
    }
}
