//! The node: what sessions and the HTTP API call to subscribe and publish.
//!
//! It joins the registry (local subscribers) to the broker (other nodes), keeping exactly one broker
//! subscription per topic that has local subscribers, and owns node-wide state: settings, metrics,
//! the connection count and the drain signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use broker_bridge::{
    Broker, BrokerError, BrokerObserver, HistoryRead, MemoryBroker, MemoryConfig, Message,
    MessageSink, Position, RedisBroker, RedisConfig, Replay,
};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::auth::Access;
use crate::config::{BrokerKind, Settings};
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, ProtocolError, Since};
use crate::registry::{ConnId, Registry};
use crate::send_queue::{DirectWrite, SendQueue};

/// Messages a resume may replay at most.
const MAX_REPLAY: usize = 10_000;

/// Shared state of one gateway node.
pub struct Node {
    /// The validated settings.
    pub settings: Settings,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Local subscribers.
    pub registry: Arc<Registry>,
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// Who may do what.
    pub access: Access,
    /// Shutdown state.
    pub drain: Arc<Drain>,
    connections: AtomicUsize,
    next_conn: AtomicU64,
}

/// Turns a broker failure into the protocol error clients see.
fn broker_error(e: BrokerError) -> ProtocolError {
    tracing::warn!(error = %e, "broker operation failed");
    ProtocolError::new(ErrorCode::BrokerUnavailable, e.to_string())
}

impl Node {
    /// Builds a node and its broker from settings.
    pub fn new(settings: Settings) -> anyhow::Result<Arc<Node>> {
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::new(
            metrics.clone(),
            settings.limits.send_queue_frames,
        ));
        let sink: Arc<dyn MessageSink> = registry.clone();
        let broker: Arc<dyn Broker> = match settings.broker.kind {
            BrokerKind::Memory => Arc::new(MemoryBroker::new(
                MemoryConfig {
                    history: settings.history.policy(),
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
                config.history = settings.history.policy();
                config.topic_idle_ttl = b.topic_idle_ttl;
                config.command_timeout = b.command_timeout;
                config.connect_timeout = b.command_timeout;
                config.canary_interval = b.canary_interval;
                config.canary_timeout = b.canary_timeout;
                config.backlog_messages = b.backlog_messages;
                config.backlog_bytes = b.backlog_bytes;
                let observer: Arc<dyn BrokerObserver> = metrics.clone();
                let broker = RedisBroker::connect(config, sink, observer)
                    .map_err(|e| anyhow::anyhow!("broker.url: {e}"))?;
                tracing::info!(node = broker.node_id(), "Redis broker configured");
                Arc::new(broker)
            }
        };
        let access = Access::from_settings(&settings)?;
        metrics.ready.set(1);
        metrics.broker_up.set(broker.is_ready() as i64);
        Ok(Arc::new(Node {
            settings,
            metrics,
            registry,
            broker,
            access,
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
    pub fn new_queue(&self, direct: Option<Arc<dyn DirectWrite>>) -> Arc<SendQueue> {
        let l = &self.settings.limits;
        Arc::new(SendQueue::with_direct(
            l.send_queue_frames,
            l.send_queue_bytes,
            l.slow_consumer,
            direct,
        ))
    }

    /// Subscribes a connection: joins the registry, makes sure the broker delivers the topic, and
    /// queues the ack (plus any replay) on the connection's queue.
    pub async fn subscribe(
        &self,
        conn: ConnId,
        queue: &Arc<SendQueue>,
        topic: &str,
        id: Option<&RawValue>,
        since: Option<Since>,
    ) -> Result<Arc<str>, ProtocolError> {
        let (name, gate) = self.registry.join(topic, conn, queue.clone());
        let result = async {
            {
                let mut subscribed = gate.lock().await;
                if !*subscribed {
                    self.broker.subscribe(topic).await.map_err(broker_error)?;
                    *subscribed = true;
                }
            }
            match since {
                None => {
                    let pos = self.broker.position(topic).await.map_err(broker_error)?;
                    let ack = protocol::ack(id, topic, &pos, None);
                    self.registry.activate(topic, conn, Some(ack), &[], &pos);
                }
                Some(since) => {
                    let replay = self
                        .broker
                        .replay(topic, &since.epoch, since.offset, MAX_REPLAY)
                        .await
                        .map_err(broker_error)?;
                    if replay.complete {
                        self.metrics.resumes.with_label_values(&["recovered"]).inc();
                        self.metrics.replayed.inc_by(replay.messages.len() as u64);
                        let resumed = Position {
                            epoch: replay.position.epoch.clone(),
                            offset: since.offset,
                        };
                        let ack = protocol::ack(id, topic, &resumed, Some(true));
                        self.activate_paced(topic, conn, queue, ack, &replay.messages, &resumed)
                            .await;
                    } else {
                        self.metrics
                            .resumes
                            .with_label_values(&["not_recovered"])
                            .inc();
                        let ack = protocol::ack(id, topic, &replay.position, Some(false));
                        self.registry
                            .activate(topic, conn, Some(ack), &[], &replay.position);
                    }
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(name),
            Err(e) => {
                self.unsubscribe(topic, conn).await;
                Err(e)
            }
        }
    }

    /// Queues a resume's ack and replay, then turns the subscriber live.
    ///
    /// A replay larger than a quarter of the send queue goes out in slices, each one after the
    /// queue drained below half (`SendQueue::room`, the client reading at its own pace), while live
    /// messages for the topic are held back. Queued whole, a replay longer than
    /// `limits.send_queue_frames` (1024 by default, while up to `MAX_REPLAY` may be replayed)
    /// overflowed the queue and closed a healthy client as a slow consumer — which then resumed,
    /// overflowed again, and never caught up (under `drop_oldest`, the start of the replay was lost
    /// instead).
    async fn activate_paced(
        &self,
        topic: &str,
        conn: ConnId,
        queue: &Arc<SendQueue>,
        ack: Bytes,
        replay: &[Message],
        floor: &Position,
    ) {
        let limits = &self.settings.limits;
        let max_frames = (limits.send_queue_frames / 4).max(1);
        let max_bytes = limits.send_queue_bytes / 4;
        let mut ack = Some(ack);
        let mut rest = replay;
        loop {
            let (mut n, mut bytes) = (0, 0);
            while n < rest.len() && n < max_frames {
                // The frame is the data plus the topic and a few dozen bytes of envelope.
                bytes += rest[n].data.len() + rest[n].topic.len() + 64;
                if n > 0 && bytes > max_bytes {
                    break;
                }
                n += 1;
            }
            if n == rest.len() {
                self.registry.activate(topic, conn, ack.take(), rest, floor);
                return;
            }
            self.registry.queue_replay(queue, ack.take(), &rest[..n]);
            rest = &rest[n..];
            queue.room().await;
            if queue.is_closing() {
                // The connection is going away; its subscriptions are dropped with it.
                return;
            }
        }
    }

    /// Removes a connection from a topic, and drops the broker subscription when it was the last.
    pub async fn unsubscribe(&self, topic: &str, conn: ConnId) {
        let Some(gate) = self.registry.leave(topic, conn) else {
            return;
        };
        let mut subscribed = gate.lock().await;
        if !self.registry.is_idle(topic) {
            return;
        }
        if *subscribed {
            if let Err(e) = self.broker.unsubscribe(topic).await {
                tracing::warn!(topic, error = %e, "broker unsubscribe failed");
            }
            *subscribed = false;
        }
        self.registry.remove_if_idle(topic, &gate);
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
