//! The node: what sessions and the HTTP API call to subscribe and publish.
//!
//! It joins the registry (local subscribers, and one broker subscription per topic they want) to
//! the broker (other nodes), and owns node-wide state: settings, metrics, the connection count and
//! the drain signal. Subscribing (the ack, a resume's replay) is in [`crate::subscribe`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use broker_bridge::{
    Broker, BrokerError, BrokerObserver, HistoryRead, MemoryBroker, MemoryConfig, MessageSink,
    Position, RedisBroker, RedisConfig, Replay,
};
use bytes::Bytes;

use crate::auth::{Access, Identity};
use crate::config::{BrokerKind, Settings};
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::namespace::Namespaces;
use crate::per_ip::{Cidr, PerIp};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::registry::{ConnId, Registry, RegistryLimits};
use crate::send_queue::{DirectWrite, SendQueue};

/// Shared state of one gateway node.
pub struct Node {
    /// The validated settings.
    pub settings: Settings,
    /// The options of each topic's namespace.
    pub namespaces: Arc<Namespaces>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Local subscribers.
    pub registry: Arc<Registry>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Who may do what.
    pub access: Access,
    /// WebSocket connections per client address (`server.max_connections_per_ip`).
    pub per_ip: Arc<PerIp>,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<Cidr>,
    /// Shutdown state.
    pub drain: Arc<Drain>,
    connections: AtomicUsize,
    next_conn: AtomicU64,
}

/// Turns a broker failure into the protocol error clients see.
pub(crate) fn broker_error(e: BrokerError) -> ProtocolError {
    if let BrokerError::Unsupported(what) = e {
        return ProtocolError::new(
            ErrorCode::Unsupported,
            format!("this node's broker does not support {what}"),
        );
    }
    tracing::warn!(error = %e, "broker operation failed");
    ProtocolError::new(ErrorCode::BrokerUnavailable, e.to_string())
}

impl Node {
    /// Builds a node and its broker from settings.
    pub fn new(settings: Settings) -> anyhow::Result<Arc<Node>> {
        let metrics = Arc::new(Metrics::new());
        let namespaces = Arc::new(Namespaces::new(
            &settings.namespaces,
            settings.limits.max_message_size,
            &metrics,
        ));
        let registry = Arc::new(Registry::new(
            metrics.clone(),
            RegistryLimits {
                max_held_frames: settings.limits.send_queue_frames,
                max_held_bytes: settings.limits.send_queue_bytes,
                max_json_depth: settings.limits.max_json_depth,
                unsubscribe_delay: settings.broker.unsubscribe_delay,
                compression: settings.compression.outbound(),
            },
            namespaces.clone(),
        ));
        let sink: Arc<dyn MessageSink> = registry.clone();
        let broker: Arc<dyn Broker> = match settings.broker.kind {
            BrokerKind::Memory => Arc::new(MemoryBroker::new(
                MemoryConfig {
                    history: settings.history.policy(&settings.namespaces),
                    directory_window: settings.history.directory_window,
                },
                sink,
            )),
            BrokerKind::Redis | BrokerKind::RedisCluster => {
                let b = &settings.broker;
                let mut config = RedisConfig::new(
                    b.url.clone().unwrap_or_default(),
                    b.kind == BrokerKind::RedisCluster,
                );
                config.prefix = b.prefix.clone();
                config.history = settings.history.policy(&settings.namespaces);
                config.directory_window = settings.history.directory_window;
                config.topic_idle_ttl = b.topic_idle_ttl;
                config.command_timeout = b.command_timeout;
                config.connect_timeout = b.command_timeout;
                config.canary_interval = b.canary_interval;
                config.canary_timeout = b.canary_timeout;
                config.watch_lease = b.watch_lease;
                config.watch_refresh = b.watch_refresh;
                // Never more distinct prefixes in the watch sets than patterns the node may serve.
                config.watch_limit = b.watch_prefixes.min(settings.limits.max_wildcard_patterns);
                config.backlog_messages = b.backlog_messages;
                config.backlog_bytes = b.backlog_bytes;
                // Half a send queue: a hole that fits is pushed to subscribers with the live
                // stream; a larger one becomes a gap frame they resume, paced, from history.
                let l = &settings.limits;
                config.fill_limit = ((l.send_queue_frames / 2).max(1), l.send_queue_bytes / 2);
                let observer: Arc<dyn BrokerObserver> = metrics.clone();
                let broker = RedisBroker::connect(config, sink, observer)
                    .map_err(|e| anyhow::anyhow!("broker.url: {e}"))?;
                tracing::info!(node = broker.node_id(), "Redis broker configured");
                Arc::new(broker)
            }
        };
        registry.attach_broker(&broker);
        let access = Access::from_settings(&settings)?;
        let per_ip = PerIp::new(settings.server.max_connections_per_ip);
        let trusted_proxies = settings
            .server
            .trusted_proxies
            .iter()
            .map(|p| Cidr::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        metrics.ready.set(1);
        metrics
            .max_connections
            .set(i64::try_from(settings.server.max_connections).unwrap_or(i64::MAX));
        metrics.broker_up.set(broker.is_ready() as i64);
        Ok(Arc::new(Node {
            settings,
            namespaces,
            metrics,
            registry,
            broker,
            access,
            per_ip,
            trusted_proxies,
            drain: Arc::new(Drain::default()),
            connections: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
        }))
    }

    /// Whether the node should receive traffic: not draining and the broker path works.
    pub fn is_ready(&self) -> bool {
        let broker_up = self.broker.is_ready();
        self.metrics.broker_up.set(broker_up as i64);
        !self.drain.is_draining() && broker_up
    }

    /// Whether draining started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Claims a connection slot; `None` when `server.max_connections` is reached.
    pub fn try_admit(self: &Arc<Self>) -> Option<Admission> {
        let max = self.settings.server.max_connections;
        let mut n = self.connections.load(Ordering::Relaxed);
        loop {
            if n >= max {
                self.metrics.connections_refused.inc();
                return None;
            }
            match self.connections.compare_exchange_weak(
                n,
                n + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => n = actual,
            }
        }
        self.metrics.connections.inc();
        self.metrics.connections_total.inc();
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        Some(Admission {
            node: self.clone(),
            id,
        })
    }

    /// Open WebSocket connections.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// A fresh send queue sized by the settings.
    pub fn new_queue(&self, direct: Option<Arc<dyn DirectWrite>>, deflate: bool) -> Arc<SendQueue> {
        let l = &self.settings.limits;
        Arc::new(
            SendQueue::with_direct(
                l.send_queue_frames,
                l.send_queue_bytes,
                l.slow_consumer,
                direct,
            )
            .with_deflate(deflate),
        )
    }

    /// Reads a page of a validated topic's history (`GET /v1/history`), through the same broker
    /// path as a resume's replay.
    pub async fn history(
        &self,
        topic: &str,
        read: HistoryRead<'_>,
    ) -> Result<Replay, ProtocolError> {
        self.broker.history(topic, read).await.map_err(broker_error)
    }

    /// What the topic's namespace says about a publish that `who` may otherwise make: whether
    /// clients (WebSocket, tokens) may publish there, and its `data` size limit.
    pub fn check_namespace(
        &self,
        who: &Identity,
        topic: &str,
        data_len: usize,
    ) -> Result<(), ProtocolError> {
        let ns = self.namespaces.of(topic);
        let client = matches!(who, Identity::Anonymous | Identity::Token(_));
        if client && !ns.client_publish {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!(
                    "clients may not publish to {topic} (namespace {}: client_publish = false)",
                    ns.name
                ),
            ));
        }
        if data_len > ns.max_message_size {
            return Err(ProtocolError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "data larger than {} bytes (namespace {})",
                    ns.max_message_size, ns.name
                ),
            ));
        }
        Ok(())
    }

    /// Publishes validated `data` (raw JSON) to a validated topic.
    pub async fn publish(
        &self,
        topic: &str,
        data: Bytes,
        transport: &str,
    ) -> Result<Position, ProtocolError> {
        let pos = self
            .broker
            .publish(topic, data)
            .await
            .map_err(broker_error)?;
        self.metrics.published.with_label_values(&[transport]).inc();
        self.namespaces.of(topic).published.inc();
        Ok(pos)
    }
}

/// A claimed connection slot; dropping it frees the slot.
pub struct Admission {
    node: Arc<Node>,
    /// The connection's id.
    pub id: ConnId,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
        self.node.metrics.connections.dec();
    }
}
