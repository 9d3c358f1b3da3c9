//! Where Redis is and how to open one connection to it: a single server, the master behind Sentinel,
//! or a cluster.
//!
//! A [`Target`] is parsed once from `broker.url`; every (re)connect asks it for a fresh [`Conn`], which
//! for Sentinel means asking the sentinels where the master is *now*, so a failover is followed.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    ProtocolVersion, PushInfo, RedisError, RedisResult, ScriptInvocation, ToRedisArgs,
};

use super::sentinel::{self, SentinelTarget};
use crate::BrokerError;

/// Connection and response time limits for every connection the broker opens.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP/TLS connect plus handshake.
    pub connect: Duration,
    /// One command's answer.
    pub response: Duration,
}

/// How to reach Redis, parsed from `broker.url`.
#[derive(Debug)]
pub enum Target {
    /// One server (`redis://` / `rediss://`).
    Single(ConnectionInfo),
    /// The master of `master`, found through sentinels (`redis+sentinel://` / `rediss+sentinel://`).
    Sentinel(SentinelTarget),
    /// A Redis Cluster, from comma-separated seed nodes.
    Cluster(Vec<ConnectionInfo>),
}

/// A configuration error with context.
pub fn config_error(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Config(format!("{what}: {e}"))
}

impl Target {
    /// Parses `broker.url`. `cluster` selects the cluster form (comma-separated seeds).
    ///
    /// * `redis://[user:pass@]host:port[/db]`, `rediss://…` (TLS; `#insecure` skips verification)
    /// * `redis+sentinel://[user:pass@]host:port[,host:port…]/master[/db][?sentinel_password=…&sentinel_username=…]`
    ///   (`rediss+sentinel://` for TLS to sentinels and master)
    /// * cluster: `redis://[user:pass@]host:port,host:port,…`; seeds after the first may omit the
    ///   scheme and credentials, which they then share with the first.
    pub fn parse(url: &str, cluster: bool) -> Result<Target, BrokerError> {
        let url = url.trim();
        if url.is_empty() {
            return Err(BrokerError::Config("the Redis URL is empty".into()));
        }
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return sentinel::parse(rest, "redis", cluster);
        }
        if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            return sentinel::parse(rest, "rediss", cluster);
        }
        if !cluster {
            if url.contains(',') {
                return Err(BrokerError::Config(
                    "several URLs given; comma-separated seeds are for broker.kind = \"redis-cluster\""
                        .into(),
                ));
            }
            let info = url
                .into_connection_info()
                .map_err(|e| config_error("invalid Redis URL", e))?;
            return Ok(Target::Single(info));
        }
        let mut seeds = Vec::new();
        let mut base: Option<(String, String)> = None;
        for item in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let full = if item.contains("://") {
                let (scheme, rest) = item.split_once("://").unwrap_or(("redis", item));
                let userinfo = rest
                    .split('/')
                    .next()
                    .and_then(|authority| authority.rsplit_once('@'))
                    .map(|(u, _)| format!("{u}@"))
                    .unwrap_or_default();
                base.get_or_insert((scheme.to_string(), userinfo));
                item.to_string()
            } else {
                let (scheme, userinfo) = base.as_ref().ok_or_else(|| {
                    BrokerError::Config(
                        "the first cluster seed needs a scheme (redis:// or rediss://)".into(),
                    )
                })?;
                format!("{scheme}://{userinfo}{item}")
            };
            seeds.push(
                full.as_str()
                    .into_connection_info()
                    .map_err(|e| config_error("invalid cluster seed URL", e))?,
            );
        }
        if seeds.is_empty() {
            return Err(BrokerError::Config("no cluster seed nodes given".into()));
        }
        Ok(Target::Cluster(seeds))
    }

    /// Whether this is a cluster (sharded pub/sub, hash-tagged names).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// Opens one connection. With `push`, the connection speaks RESP3 and hands pushes (pub/sub
    /// messages, disconnect notices) to it. `name` is set with `CLIENT SETNAME` so operators (and
    /// tests) can tell the node's connections apart in `CLIENT LIST`.
    pub async fn connect(
        &self,
        timeouts: Timeouts,
        push: Option<PushFn>,
        name: &str,
    ) -> RedisResult<Conn> {
        let info = match self {
            Target::Single(info) => info.clone(),
            Target::Sentinel(s) => s.resolve_master(timeouts).await?,
            Target::Cluster(seeds) => {
                let mut b = ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(timeouts.connect)
                    .response_timeout(timeouts.response)
                    .retries(1);
                if let Some(push) = push {
                    b = b.use_protocol(ProtocolVersion::RESP3).push_sender(push);
                }
                let conn = b.build()?.get_async_connection().await?;
                return Ok(Conn::Cluster(conn));
            }
        };
        let mut conn = connect_single(info, timeouts, push).await?;
        let _: () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async(&mut conn)
            .await?;
        if let Target::Sentinel(_) = self {
            // Sentinel may still name the old master for a moment during a failover.
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
            let is_master =
                matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master");
            if !is_master {
                return Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "the address Sentinel gave is not a master (failover in progress?)",
                )));
            }
        }
        Ok(Conn::Single(conn))
    }
}

/// Channels per `SUBSCRIBE` when subscribing many at once on a single server.
const SUBSCRIBE_BATCH: usize = 500;

/// A push sink for one connection: a closure that forwards pushes tagged with the connection's
/// generation.
pub type PushFn = Box<dyn Fn(PushInfo) -> Result<(), ()> + Send + Sync>;

/// Opens one connection to one server.
pub async fn connect_single(
    info: ConnectionInfo,
    timeouts: Timeouts,
    push: Option<PushFn>,
) -> RedisResult<MultiplexedConnection> {
    let info = if push.is_some() {
        let redis = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        info.set_redis_settings(redis)
    } else {
        info
    };
    let client = Client::open(info)?;
    let mut config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeouts.connect))
        .set_response_timeout(Some(timeouts.response));
    if let Some(push) = push {
        config = config.set_push_sender(push);
    }
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// One open connection to a single server or a cluster. Cheap to clone; clones share the socket(s).
#[derive(Clone)]
pub enum Conn {
    /// A single server (standalone or the Sentinel master).
    Single(MultiplexedConnection),
    /// A cluster.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Runs a command.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// Runs a Lua script (`EVALSHA`, loading it on `NOSCRIPT`).
    pub async fn eval<T: FromRedisValue>(&mut self, inv: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(c).await,
            Conn::Cluster(c) => inv.invoke_async(c).await,
        }
    }

    /// `SUBSCRIBE` (single server) or `SSUBSCRIBE` (cluster) and waits for the confirmations.
    pub async fn subscribe(&mut self, channels: impl ToRedisArgs) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.subscribe(channels).await,
            Conn::Cluster(c) => c.ssubscribe(channels).await,
        }
    }

    /// Subscribes many channels: in batches on a single server; one `SSUBSCRIBE` per channel on a
    /// cluster (a sharded subscribe must stay within one slot), a few in flight at a time.
    pub async fn subscribe_all(&mut self, channels: &[String]) -> RedisResult<()> {
        use futures_util::{StreamExt, TryStreamExt};
        match self {
            Conn::Single(c) => {
                for chunk in channels.chunks(SUBSCRIBE_BATCH) {
                    c.subscribe(chunk).await?;
                }
                Ok(())
            }
            Conn::Cluster(c) => {
                // Owned futures (no borrow of `channels`), so the caller's future stays `Send`.
                let subscribes: Vec<_> = channels
                    .iter()
                    .map(|ch| {
                        let (mut c, ch) = (c.clone(), ch.clone());
                        async move { c.ssubscribe(ch).await }
                    })
                    .collect();
                futures_util::stream::iter(subscribes)
                    .buffer_unordered(32)
                    .try_collect::<Vec<()>>()
                    .await?;
                Ok(())
            }
        }
    }

    /// `PSUBSCRIBE` of one pattern. On a cluster this is classic (not sharded) pub/sub: the
    /// cluster connection sends it to one node, and every node sees classic `PUBLISH`es (the
    /// watch channels of wildcard subscriptions, [`super::watch`]).
    pub async fn psubscribe(&mut self, pattern: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.psubscribe(pattern).await,
            Conn::Cluster(c) => c.psubscribe(pattern).await,
        }
    }

    /// `PSUBSCRIBE` of many patterns: at once on a single server, one by one on a cluster (whose
    /// connection routes each command to a single node).
    pub async fn psubscribe_all(&mut self, patterns: &[String]) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.psubscribe(patterns).await,
            Conn::Cluster(c) => {
                for pattern in patterns {
                    c.psubscribe(pattern).await?;
                }
                Ok(())
            }
        }
    }

    /// `PUNSUBSCRIBE` of one pattern.
    pub async fn punsubscribe(&mut self, pattern: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.punsubscribe(pattern).await,
            Conn::Cluster(c) => c.punsubscribe(pattern).await,
        }
    }

    /// `UNSUBSCRIBE` / `SUNSUBSCRIBE`.
    pub async fn unsubscribe(&mut self, channels: impl ToRedisArgs) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.unsubscribe(channels).await,
            Conn::Cluster(c) => c.sunsubscribe(channels).await,
        }
    }
}

/// Whether an error means the connection itself is unusable (so it should be replaced), as opposed
/// to a refused command.
pub fn is_connection_error(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// Maps a Redis error to the broker error the gateway understands.
pub fn broker_error(e: RedisError) -> BrokerError {
    use redis::{ErrorKind, ServerErrorKind};
    let transient = is_connection_error(&e)
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
            ) | ErrorKind::ClusterConnectionNotFound
        );
    if transient {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Protocol(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_url_forms() {
        assert!(matches!(
            Target::parse("redis://:pw@127.0.0.1:6380/2", false),
            Ok(Target::Single(_))
        ));
        assert!(Target::parse("redis://a:1,b:2", false).is_err());
        let Ok(Target::Cluster(seeds)) =
            Target::parse("redis://:pw@127.0.0.1:7000,127.0.0.1:7001", true)
        else {
            panic!("cluster");
        };
        assert_eq!(seeds.len(), 2);
        assert_eq!(seeds[1].redis_settings().password(), Some("pw"));
        assert!(matches!(
            Target::parse("redis+sentinel://127.0.0.1:26379/mymaster", false),
            Ok(Target::Sentinel(_))
        ));
        assert!(Target::parse("redis+sentinel://127.0.0.1:26379/mymaster", true).is_err());
        assert!(Target::parse("", false).is_err());
    }
}
