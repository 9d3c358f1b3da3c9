//! Moves pubgate messages between gateway nodes.
//!
//! A gateway node owns exactly one [`Broker`]. The node publishes through it and tells it which topics
//! have local subscribers; the broker hands every message for those topics to the node's
//! [`MessageSink`], in per-topic offset order. The broker knows nothing about WebSockets or clients.
//!
//! Every topic has an [`Epoch`] and contiguous offsets starting at 1, on every broker implementation, so
//! the client protocol is the same whether a node runs alone ([`MemoryBroker`]) or with Redis.

mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use memory::{MemoryBroker, MemoryConfig};
pub use redis::{RedisBroker, RedisConfig};

/// A topic's offset: the number of messages ever published to it in the current epoch.
///
/// The first message of an epoch has offset 1; offset 0 means "nothing published yet".
pub type Offset = u64;

/// Identifies one continuous run of offsets for a topic.
///
/// When a broker loses a topic's sequence (history evicted, a Redis flush, a restarted in-memory node)
/// offsets start again under a new epoch, so a client holding an old `(epoch, offset)` pair can tell
/// that it cannot resume from it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// Wraps an epoch string as read from a broker.
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        Epoch(s.into())
    }

    /// Makes a new epoch that no other broker or earlier run is likely to have used.
    pub fn random() -> Self {
        let n: u64 = rand::random();
        Epoch(format!("{n:016x}").into())
    }

    /// The epoch as it appears on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a topic stands: its epoch and the offset of its latest message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The topic's current epoch.
    pub epoch: Epoch,
    /// The offset of the latest message (0 when none was published in this epoch).
    pub offset: Offset,
}

/// One message as it travels from a broker to a node.
#[derive(Clone, Debug)]
pub struct Message {
    /// The topic, without any broker channel prefix.
    pub topic: Arc<str>,
    /// Epoch and offset, when the message was published through a gateway. A raw publish straight
    /// into the broker (e.g. `redis-cli PUBLISH`) has none.
    pub position: Option<Position>,
    /// The JSON `data`, exactly as the publisher sent it.
    pub data: Bytes,
}

/// Receives the messages a broker carries for the topics the node subscribed to.
///
/// `deliver` is called in per-topic offset order and must not block: it runs on the broker's own
/// delivery path (for the memory broker, inside the publisher's call).
pub trait MessageSink: Send + Sync + 'static {
    /// Takes one message for local fan-out.
    fn deliver(&self, message: Message);
}

/// Hears what happens on a broker's connections, so the embedding node can export it (metrics, logs)
/// without the broker knowing how. Every method has a no-op default and must return quickly: they are
/// called from the broker's own tasks.
pub trait BrokerObserver: Send + Sync + 'static {
    /// The broker path turned usable (`true`) or unusable (`false`); see [`Broker::is_ready`].
    fn state_changed(&self, up: bool) {
        let _ = up;
    }

    /// The subscription connection was lost and is established again (every topic resubscribed).
    fn reconnected(&self) {}

    /// A canary the node sent to itself through the broker came back after `rtt`.
    fn canary_roundtrip(&self, rtt: Duration) {
        let _ = rtt;
    }

    /// After a reconnect, `topics` topics may have lost messages that history could not fill in.
    fn gap(&self, topics: usize) {
        let _ = topics;
    }
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl BrokerObserver for NoObserver {}

/// What went wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached right now; the operation did not take effect.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered, but with something this node cannot use.
    #[error("broker protocol error: {0}")]
    Protocol(String),
    /// The broker configuration is unusable (bad URL, unknown kind).
    #[error("broker configuration error: {0}")]
    Config(String),
}

/// The replay a subscriber asked for with `since`, as far as history could serve it.
#[derive(Clone, Debug)]
pub struct Replay {
    /// The topic's position when the replay was read.
    pub position: Position,
    /// Whether history covered everything after the requested offset.
    pub complete: bool,
    /// The messages after the requested offset, in order (empty when `complete` is false).
    pub messages: Vec<Message>,
}

/// The interface every broker implements: publish, node-level subscriptions, positions, history.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes `data` (a JSON value) to `topic`, assigning the topic's next offset.
    ///
    /// Returns only once the message is accepted by the broker; an error means it was not published.
    async fn publish(&self, topic: &str, data: Bytes) -> Result<Position, BrokerError>;

    /// Starts delivering `topic` to the sink. Called once per topic when its first local subscriber
    /// arrives; once it returns, every later publish to the topic reaches the sink.
    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError>;

    /// Stops delivering `topic`. Called when its last local subscriber leaves.
    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError>;

    /// The topic's current epoch and latest offset.
    async fn position(&self, topic: &str) -> Result<Position, BrokerError>;

    /// The messages after `since` in epoch `epoch`, up to `limit`, if history still holds them.
    async fn replay(
        &self,
        topic: &str,
        epoch: &str,
        since: Offset,
        limit: usize,
    ) -> Result<Replay, BrokerError>;

    /// Whether the broker path currently works end to end.
    fn is_ready(&self) -> bool;
}
