//! The Redis brokers: many stateless gateway nodes act as one through Redis pub/sub.
//!
//! * Publishing runs one Lua script that assigns the topic's next offset (`INCR`), appends the
//!   message to the topic's history stream (`XADD … MAXLEN`) and publishes it, atomically, so offsets
//!   are global across nodes ([`scripts`]).
//! * A node holds one subscription per topic with local subscribers on a dedicated connection, which
//!   is re-established with backoff whenever it breaks; after a reconnect every topic is subscribed
//!   again and history fills whatever was missed in between ([`subscriber`]).
//! * Every second the node sends a *canary* to itself through Redis; readiness requires that it came
//!   back recently, which catches a wedged subscription connection that still looks open.
//! * The same code serves a single Redis, a Sentinel-managed master (found again after a failover)
//!   and Redis Cluster (sharded pub/sub with hash-tagged names) ([`conn`]).
//! * Wildcard subscriptions pattern-subscribe on a single Redis; on a cluster, publishers are told
//!   which prefixes are watched through per-slot watch sets ([`watch`]).
//!
//! The wire format is in [`wire`] and `docs/broker.md`.

mod canary;
mod conn;
mod directory;
mod fill;
mod link;
mod retry;
mod scripts;
mod sentinel;
mod subscriber;
mod topics;
mod watch;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::RedisError;
use tokio::task::JoinHandle;

use crate::{
    Broker, BrokerError, BrokerObserver, Directory, Epoch, HistoryLimits, HistoryPolicy,
    HistoryRead, MAX_OFFSET, MessageSink, Position, Replay, Seek,
};
use conn::{Target, Timeouts, broker_error};
use link::{CmdLink, Health};
use scripts::{Salt, Scripts};
use subscriber::{Backlog, Control, Unsubscribing};
use topics::Topics;
use wire::Names;

/// Settings of a Redis broker.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://…`, `rediss://…`, `redis+sentinel://…`, or comma-separated cluster seeds.
    pub url: String,
    /// Redis Cluster (sharded pub/sub) instead of a single Redis / Sentinel master.
    pub cluster: bool,
    /// Prefix of every channel and key.
    pub prefix: String,
    /// How much history each topic keeps (asked on every publish and history read).
    pub history: Arc<dyn HistoryPolicy>,
    /// How long a topic's epoch and offset survive without being used. A topic unused for longer
    /// starts a new epoch at its next use.
    pub topic_idle_ttl: Duration,
    /// The longest a command may take before it counts as failed (and the caller gets
    /// `Unavailable`).
    pub command_timeout: Duration,
    /// Connect (TCP, TLS, handshake) time limit.
    pub connect_timeout: Duration,
    /// How often a canary is sent.
    pub canary_interval: Duration,
    /// Not ready (and the subscription connection is replaced) when no canary came back for this
    /// long.
    pub canary_timeout: Duration,
    /// Messages from Redis that may wait for the node at most; past that (or `backlog_bytes`) a
    /// message is dropped and its topic refilled from history.
    pub backlog_messages: usize,
    /// Payload bytes from Redis that may wait for the node at most.
    pub backlog_bytes: usize,
    /// The most messages, and bytes, a gap fill pushes to the node's subscribers at once; a larger
    /// hole is signalled as a gap, and subscribers resume it from history at their own pace (set it
    /// to what a subscriber's send queue takes comfortably).
    pub fill_limit: (usize, usize),
    /// Cluster: how long a wildcard prefix's watch lasts in the slots' watch sets unless renewed.
    pub watch_lease: Duration,
    /// Cluster: how often a node renews its watches (must be well below the lease).
    pub watch_refresh: Duration,
    /// Cluster: the most distinct prefixes that may hold a watch lease from this node at once,
    /// counting unsubscribed ones until their lease ends (each costs a write to every slot).
    pub watch_limit: usize,
    /// How long the topic directory remembers a publish (standalone and Sentinel): how far back
    /// a wildcard resume may reach.
    pub directory_window: Duration,
}

impl RedisConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>, cluster: bool) -> Self {
        RedisConfig {
            url: url.into(),
            cluster,
            prefix: "pubgate:".into(),
            history: Arc::new(HistoryLimits::NONE),
            topic_idle_ttl: Duration::from_secs(24 * 3600),
            command_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            canary_interval: Duration::from_secs(1),
            canary_timeout: Duration::from_secs(3),
            backlog_messages: 65_536,
            backlog_bytes: 64 << 20,
            fill_limit: (512, 2 << 20),
            watch_lease: Duration::from_secs(60),
            watch_refresh: Duration::from_secs(15),
            watch_limit: 1000,
            directory_window: Duration::from_secs(3600),
        }
    }

    /// Checks the settings without connecting: the URL must parse and the canary timeout must be
    /// longer than the interval.
    pub fn validate(&self) -> Result<(), BrokerError> {
        Target::parse(&self.url, self.cluster)?;
        if self.canary_interval.is_zero() || self.canary_timeout <= self.canary_interval {
            return Err(BrokerError::Config(
                "the canary timeout must be longer than the canary interval".into(),
            ));
        }
        if self.watch_refresh.is_zero() || self.watch_lease < self.watch_refresh * 2 {
            return Err(BrokerError::Config(
                "the watch lease must be at least twice the watch refresh interval".into(),
            ));
        }
        Ok(())
    }
}

/// A broker backed by Redis (standalone, Sentinel or Cluster).
///
/// Created with [`RedisBroker::connect`], which returns at once: the connections are opened in the
/// background and [`Broker::is_ready`] turns true once the first canary made the round trip.
/// Dropping the broker stops its background tasks.
pub struct RedisBroker {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

/// State shared by the broker's methods and its subscription task.
struct Inner {
    config: RedisConfig,
    names: Arc<Names>,
    target: Arc<Target>,
    timeouts: Timeouts,
    node_id: String,
    scripts: Scripts,
    observer: Arc<dyn BrokerObserver>,
    health: Arc<Health>,
    /// Publishes, positions and canaries.
    cmd: Arc<CmdLink>,
    /// History reads (resumes, `GET /v1/history`, gap fills), on their own connection: a long
    /// read must not hold up the publishes queued behind it.
    reads: Arc<CmdLink>,
    /// Topics this node wants delivered, and what was delivered of them.
    topics: Topics,
    /// The subscription connection; held across subscribe/unsubscribe/resubscribe so they apply in
    /// order.
    control: tokio::sync::Mutex<Control>,
    /// Unsubscribe confirmations this node expects on the current connection.
    unsubscribing: Unsubscribing,
    /// Messages Redis pushed that the node has not handled yet.
    backlog: Arc<Backlog>,
    /// Cluster: the wildcard prefixes this node watches in the slots' watch sets.
    watches: watch::Watches,

    /// Generation of the current subscription connection (a copy of `control`'s, readable without
    /// waiting).
    generation: std::sync::atomic::AtomicU64,
    /// Generations handed out so far (one per connection attempt).
    next_generation: std::sync::atomic::AtomicU64,
    /// Asks the subscription task to replace the subscription connection.
    kick: tokio::sync::Notify,
}

impl RedisBroker {
    /// Parses the URL and starts connecting; delivers subscribed topics to `sink` and reports
    /// connection events to `observer`. Must be called inside a Tokio runtime.
    ///
    /// Fails only on an unusable configuration (a malformed URL); an unreachable Redis is retried
    /// in the background while the broker reports not-ready.
    pub fn connect(
        config: RedisConfig,
        sink: Arc<dyn MessageSink>,
        observer: Arc<dyn BrokerObserver>,
    ) -> Result<RedisBroker, BrokerError> {
        config.validate()?;
        let target = Arc::new(Target::parse(&config.url, config.cluster)?);
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            response: config.command_timeout,
        };
        let node_id = format!("{:08x}", rand::random::<u32>());
        let health = Arc::new(Health::new(config.canary_timeout));
        let cmd = Arc::new(CmdLink::new(
            target.clone(),
            timeouts,
            format!("pubgate-cmd-{node_id}"),
            true,
            health.clone(),
        ));
        let reads = Arc::new(CmdLink::new(
            target.clone(),
            timeouts,
            format!("pubgate-read-{node_id}"),
            false,
            health.clone(),
        ));
        // Start connecting right away; the error only says "not yet".
        let _ = cmd.get();
        let _ = reads.get();
        let config_backlog_bytes = config.backlog_bytes;
        let config_fill_limit = config.fill_limit;
        let config_cluster = target.is_cluster();
        let inner = Arc::new(Inner {
            names: Arc::new(Names::new(&config.prefix, target.is_cluster())),
            config,
            target,
            timeouts,
            node_id,
            scripts: Scripts::new(config_cluster),
            topics: Topics::new(sink, observer.clone(), config_fill_limit),
            observer,
            health,
            cmd,
            reads,
            control: tokio::sync::Mutex::new(Control::default()),
            unsubscribing: Default::default(),

            backlog: Arc::new(Backlog::new(config_backlog_bytes)),
            watches: watch::Watches::new(),
            generation: std::sync::atomic::AtomicU64::new(0),
            next_generation: std::sync::atomic::AtomicU64::new(0),
            kick: tokio::sync::Notify::new(),
        });
        tracing::info!(node = %inner.node_id, cluster = inner.names.is_cluster(), "Redis broker starting");
        let mut tasks = vec![tokio::spawn(subscriber::run(inner.clone()))];
        if inner.names.is_cluster() {
            tasks.push(tokio::spawn(watch::run(inner.clone())));
        }
        if let Target::Sentinel(_) = &*inner.target {
            let watcher = inner.clone();
            tasks.push(tokio::spawn(async move {
                if let Target::Sentinel(s) = &*watcher.target {
                    s.watch(watcher.timeouts, || {
                        // Drop every connection now; they reconnect to the new master.
                        watcher.cmd.reset();
                        watcher.reads.reset();
                        watcher.kick.notify_one();
                    })
                    .await;
                }
            }));
        }
        Ok(RedisBroker { inner, tasks })
    }

    /// This node's id in Redis: its connections are named `pubgate-cmd-<id>` and `pubgate-sub-<id>`
    /// and its canary channel ends in `#canary.<id>`.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.inner.health.closed.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Inner {
    /// Runs one command on the command connection with the command timeout; failures that mean
    /// the connection broke make it reconnect.
    async fn with_cmd<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(conn::Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        Self::on_link(&self.cmd, self.config.command_timeout, f).await
    }

    /// Runs one command on `link` with a time limit; failures that mean the connection broke make
    /// it reconnect.
    async fn on_link<T, F, Fut>(
        link: &Arc<CmdLink>,
        limit: Duration,
        f: F,
    ) -> Result<T, BrokerError>
    where
        F: FnOnce(conn::Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let (generation, conn) = link.get()?;
        match tokio::time::timeout(limit, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                link.failed(generation, Some(&e));
                Err(broker_error(e))
            }
            Err(_) => {
                link.failed(generation, None);
                Err(BrokerError::Unavailable(format!(
                    "Redis did not answer within {limit:?}"
                )))
            }
        }
    }

    /// Runs one command on the reads connection. That connection may have died unnoticed since its
    /// last use (after a Redis restart nothing tells until a command fails), so when the command
    /// fails for want of a connection, it waits for the new one (up to the command timeout) and
    /// tries once more: a client's resume is not refused for a connection nobody used since.
    async fn on_reads<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: Fn(conn::Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let limit = self.config.command_timeout;
        match Self::on_link(&self.reads, limit, &f).await {
            Err(BrokerError::Unavailable(first)) => {
                let deadline = tokio::time::Instant::now() + limit;
                while self.reads.get().is_err() {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(BrokerError::Unavailable(first));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Self::on_link(&self.reads, limit, &f).await
            }
            other => other,
        }
    }

    /// Checks the reads connection, so a dead one is replaced before a client needs it.
    pub(super) async fn ping_reads(&self) {
        let pinged = Self::on_link(
            &self.reads,
            self.config.command_timeout,
            |mut c| async move { c.query::<()>(&redis::cmd("PING")).await },
        )
        .await;
        if let Err(e) = pinged {
            tracing::debug!(error = %e, "reads connection ping failed");
        }
    }

    /// A candidate `"<epoch> <salt>"` for a script that may have to start a new epoch.
    fn candidate() -> String {
        format!("{} {:016x}", Epoch::random(), rand::random::<u64>())
    }

    fn idle_ms(&self) -> u64 {
        self.config.topic_idle_ttl.as_millis() as u64
    }

    fn limits(&self, topic: &str) -> HistoryLimits {
        self.config.history.limits(topic)
    }

    async fn position(&self, topic: &str) -> Result<(Position, Salt), BrokerError> {
        let keys = self.names.keys(topic);
        let candidate = Self::candidate();
        let value = self
            .with_cmd(|mut c| async move {
                let mut inv = self.scripts.position.prepare_invoke();
                inv.key(&keys.epoch)
                    .key(&keys.offset)
                    .key(&keys.history)
                    .arg(&candidate)
                    .arg(self.idle_ms());
                c.eval::<redis::Value>(&inv).await
            })
            .await?;
        scripts::parse_head(value)
    }

    /// Reads a page of history (the history script, then [`HistoryRead::page`]), on the reads
    /// connection.
    pub(super) async fn history(
        &self,
        topic: &Arc<str>,
        read: HistoryRead<'_>,
    ) -> Result<(Replay, Salt), BrokerError> {
        let keys = self.names.keys(topic);
        let candidate = Self::candidate();
        let ttl_ms = self.limits(topic).ttl.as_millis() as u64;
        // Exact in Lua's doubles; anything larger is beyond every topic's latest offset anyway.
        let read = HistoryRead {
            since: read.since.map(|s| s.min(MAX_OFFSET)),
            ..read
        };
        let since = read.since.map_or(-1, |s| s as i64);
        let (keys, candidate) = (&keys, &candidate);
        let value = self
            .on_reads(|mut c| async move {
                let mut inv = self.scripts.history.prepare_invoke();
                inv.key(&keys.epoch)
                    .key(&keys.offset)
                    .key(&keys.history)
                    .arg(candidate)
                    .arg(self.idle_ms())
                    .arg(read.epoch.unwrap_or(""))
                    .arg(since)
                    .arg(read.limit)
                    .arg(ttl_ms)
                    .arg(if read.whole { "1" } else { "0" });
                c.eval::<redis::Value>(&inv).await
            })
            .await?;
        scripts::parse_history(value, topic, &read)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, topic: &str, data: Bytes) -> Result<Position, BrokerError> {
        let inner = &self.inner;
        let keys = inner.names.keys(topic);
        let channel = inner.names.channel(topic);
        let candidate = Inner::candidate();
        let command = if inner.names.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let limits = inner.limits(topic);
        // Cluster: the topic's slot's watch set and the watch channels' prefix (see `watch`).
        let watched = inner.names.is_cluster().then(|| {
            let tag = inner.watches.tags().tag(watch::slot_of(topic));
            (inner.names.watch_key(tag), inner.names.watch_channel(""))
        });
        let watched = &watched;
        // Standalone and Sentinel keep the topic directory; its keys span slots, so not a cluster.
        let dir = (!inner.names.is_cluster())
            .then(|| directory::publish_keys(inner.names.prefix(), topic));
        let dir_window = inner.config.directory_window.as_millis() as u64;
        let value = inner
            .with_cmd(|mut c| async move {
                let mut inv = inner.scripts.publish.prepare_invoke();
                inv.key(&keys.epoch)
                    .key(&keys.offset)
                    .key(&keys.history)
                    .arg(&candidate)
                    .arg(inner.idle_ms())
                    .arg(&channel)
                    .arg(&data[..])
                    .arg(limits.size)
                    .arg(limits.ttl.as_millis() as u64)
                    .arg(command);
                if let Some((watch_key, watch_channels)) = &watched {
                    inv.key(watch_key).arg(watch_channels).arg(topic);
                }
                if let Some([all, level, first]) = &dir {
                    inv.key(all).key(level);
                    inv.arg(dir_window).arg(topic).arg(first);
                }
                c.eval::<redis::Value>(&inv).await
            })
            .await?;
        scripts::parse_position(value)
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        self.inner.subscribe(topic).await
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        self.inner.unsubscribe(topic).await
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        self.inner.subscribe_prefix(prefix).await
    }

    async fn unsubscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        self.inner.unsubscribe_prefix(prefix).await
    }

    async fn position(&self, topic: &str) -> Result<Position, BrokerError> {
        let (position, salt) = self.inner.position(topic).await?;
        self.inner.topics.hint(topic, &position, &salt);
        Ok(position)
    }

    async fn history(&self, topic: &str, read: HistoryRead<'_>) -> Result<Replay, BrokerError> {
        let name = self
            .inner
            .topics
            .name(topic)
            .unwrap_or_else(|| topic.into());
        let (page, salt) = self.inner.history(&name, read).await?;
        self.inner.topics.hint(topic, &page.position, &salt);
        Ok(page)
    }

    async fn clock(&self) -> Result<u64, BrokerError> {
        self.inner.clock().await
    }

    async fn directory(&self, prefix: &str, since_ms: u64) -> Result<Directory, BrokerError> {
        self.inner.directory(prefix, since_ms).await
    }

    async fn seek(&self, topic: &str, since_ms: u64, max: u64) -> Result<Seek, BrokerError> {
        self.inner.seek(topic, since_ms, max).await
    }

    fn is_ready(&self) -> bool {
        self.inner.health.is_ready()
    }
}
