//! Moves pubgate messages between gateway nodes.
//!
//! A gateway node owns exactly one [`Broker`]. The node publishes through it and tells it which topics
//! have local subscribers; the broker hands every message for those topics to the node's
//! [`MessageSink`], in per-topic offset order. The broker knows nothing about WebSockets or clients.
//!
//! Every topic has an [`Epoch`] and contiguous offsets starting at 1, on every broker implementation, so
//! the client protocol is the same whether a node runs alone ([`MemoryBroker`]) or with Redis.

mod directory;
mod memory;
mod prefixes;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use directory::{Directory, MAX_DIRECTORY_TOPICS, Seek};
pub use memory::{MemoryBroker, MemoryConfig};
pub use prefixes::{PrefixSet, strict_prefixes};
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

/// The epoch of a topic that holds no state at all yet (never published to, or forgotten after
/// being idle): reading a topic never creates it, so every such topic answers this epoch with
/// offset 0. A subscriber acknowledged at `(EMPTY_EPOCH, 0)` resumes from the first message of
/// whatever epoch the topic has later.
pub const EMPTY_EPOCH: &str = "0";

/// The largest offset that Redis's Lua scripts (whose numbers are doubles) hold exactly, 2^53 - 1.
/// No topic gets near it; a larger `since` is read as this one, which is still beyond any real
/// topic's latest offset, so the answer (not recovered) stays right.
pub const MAX_OFFSET: Offset = (1 << 53) - 1;

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

    /// Messages of `topic` may never reach this node, as `lost` says: live delivery of the topic
    /// continues after `resume`. Called in order with `deliver` for the same topic.
    fn gap(&self, topic: &str, resume: &Position, lost: Lost);
}

/// What a gap signal ([`MessageSink::gap`]) reports lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Messages of epoch `resume.epoch` published before `resume.offset + 1` (history could not
    /// fill a hole, or the topic's stream was rolled back and started a new epoch). Whoever is at
    /// `resume` already has everything it says.
    Offsets,
    /// Raw messages (published without an offset) after `resume`, the last offset delivered: even
    /// a subscriber exactly at `resume` missed them.
    Raw,
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

    /// `topics` topics lost messages that history could not fill in (their subscribers were told).
    fn gap(&self, topics: usize) {
        let _ = topics;
    }

    /// A message from the broker was not delivered: `reason` is `forged` (its tag does not
    /// verify), `header` (a malformed gateway header), `data` (gateway data that is not JSON) or
    /// `topic` (a channel below a subscribed prefix whose name is not a valid topic).
    fn rejected(&self, reason: &'static str) {
        let _ = reason;
    }

    /// A message arrived from the broker's subscription connection (before any check): what a
    /// node's subscriptions cost it on the wire.
    fn received(&self) {}

    /// Messages waiting between the broker and the node: how many, and their payload bytes.
    fn backlog(&self, messages: usize, bytes: usize) {
        let _ = (messages, bytes);
    }

    /// The backlog was full and messages of `topics` topics were dropped (they are refilled from
    /// history).
    fn backlog_overflow(&self, topics: usize) {
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
    /// This broker cannot do what was asked (e.g. prefix subscriptions on a broker without them).
    #[error("not supported by this broker: {0}")]
    Unsupported(String),
}

/// How much history one topic keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Messages kept (0: the topic has no history, so a resume can never be served).
    pub size: usize,
    /// How long a message stays in history.
    pub ttl: Duration,
}

impl HistoryLimits {
    /// No history at all.
    pub const NONE: HistoryLimits = HistoryLimits {
        size: 0,
        ttl: Duration::from_secs(300),
    };
}

/// Decides how much history each topic keeps. The broker asks it per topic (the memory broker once
/// per topic, the Redis broker on every publish and history read), so it must be cheap and must
/// give the same answer for the same topic for the life of the process.
///
/// A fixed [`HistoryLimits`] is a policy that gives every topic the same limits, and so is any
/// `Fn(&str) -> HistoryLimits`; the gateway passes its `history.rules` as a closure, which keeps this
/// crate free of the gateway's topic patterns.
pub trait HistoryPolicy: Send + Sync + 'static {
    /// The limits of `topic`.
    fn limits(&self, topic: &str) -> HistoryLimits;
}

impl HistoryPolicy for HistoryLimits {
    fn limits(&self, _topic: &str) -> HistoryLimits {
        *self
    }
}

impl<F> HistoryPolicy for F
where
    F: Fn(&str) -> HistoryLimits + Send + Sync + 'static,
{
    fn limits(&self, topic: &str) -> HistoryLimits {
        self(topic)
    }
}

impl fmt::Debug for dyn HistoryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HistoryPolicy")
    }
}

/// What to read from a topic's history (see [`Broker::history`]).
#[derive(Clone, Copy, Debug)]
pub struct HistoryRead<'a> {
    /// The epoch `since` belongs to. Another epoch than the topic's current one makes `since`
    /// meaningless: it is read as 0 and the page is never complete. `None` takes `since` in the
    /// current epoch.
    pub epoch: Option<&'a str>,
    /// Read the messages after this offset; `None` reads the newest `limit` messages (as if `since`
    /// were `latest - limit`).
    pub since: Option<Offset>,
    /// Messages returned at most.
    pub limit: usize,
    /// All or nothing, as a resume needs it: messages only when history holds every one of them
    /// from `since + 1` to the latest offset and they fit in `limit`; otherwise none, and the page
    /// is not complete.
    pub whole: bool,
}

/// A page of a topic's history: a resume's replay, or an answer to `GET /v1/history`.
#[derive(Clone, Debug)]
pub struct Replay {
    /// The topic's position when the page was read.
    pub position: Position,
    /// Whether history holds every message from `since + 1` on (so `messages` starts there and has
    /// no hole), in the requested epoch. With [`HistoryRead::whole`] it also means `messages` runs
    /// up to `position.offset`.
    pub complete: bool,
    /// The messages after `since` that history still holds, oldest first, at most `limit` (always
    /// empty for an incomplete whole read).
    pub messages: Vec<Message>,
}

impl HistoryRead<'_> {
    /// Where the page starts in a topic at `position`: the effective `since` (messages after it are
    /// read), and whether the request can be complete at all (epoch matches, `since` not beyond
    /// the latest offset). The Redis history script computes the same start.
    pub(crate) fn start(&self, position: &Position) -> (Offset, bool) {
        let last = position.offset;
        let epoch_ok = self.epoch.is_none_or(|e| {
            e == position.epoch.as_str() || (e == EMPTY_EPOCH && self.since == Some(0))
        });
        match self.since.map(|s| s.min(MAX_OFFSET)) {
            None => (last.saturating_sub(self.limit as u64), epoch_ok),
            Some(_) if !epoch_ok => (0, false),
            Some(since) => (since, since <= last),
        }
    }

    /// Builds the page from what history holds after the start (oldest first, expired entries
    /// already left out), the one place that decides `complete` for every broker.
    pub(crate) fn page(
        &self,
        topic: &Arc<str>,
        position: Position,
        held: impl IntoIterator<Item = (Offset, Bytes)>,
    ) -> Replay {
        let (start, possible) = self.start(&position);
        let last = position.offset;
        let mut messages = Vec::new();
        let mut contiguous = true;
        let mut expect = start + 1;
        for (offset, data) in held {
            if offset <= start || offset > last {
                continue;
            }
            if messages.len() >= self.limit {
                break;
            }
            contiguous &= offset == expect;
            expect = offset + 1;
            messages.push(Message {
                topic: topic.clone(),
                position: Some(Position {
                    epoch: position.epoch.clone(),
                    offset,
                }),
                data,
            });
        }
        let mut complete = possible
            && contiguous
            && if start >= last {
                start == last
            } else {
                !messages.is_empty()
            };
        if self.whole {
            complete &= last - start.min(last) == messages.len() as u64;
            if !complete {
                messages.clear();
            }
        }
        Replay {
            position,
            complete,
            messages,
        }
    }
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

    /// Starts delivering every topic below `prefix` (the topics whose name starts with `prefix.`;
    /// every topic for the empty prefix) to the sink, each in its own offset order, as if each
    /// were subscribed: what wildcard subscriptions need. Calls are counted: a prefix subscribed
    /// twice needs two [`Broker::unsubscribe_prefix`]. Once this returns, every later publish below
    /// the prefix reaches the sink.
    async fn subscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        Err(BrokerError::Unsupported(format!(
            "wildcard subscriptions (below {prefix:?}) need the memory broker or Redis (standalone or Sentinel)"
        )))
    }

    /// Undoes one [`Broker::subscribe_prefix`].
    async fn unsubscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        let _ = prefix;
        Ok(())
    }

    /// The topic's current epoch and latest offset.
    async fn position(&self, topic: &str) -> Result<Position, BrokerError>;

    /// Reads a page of the topic's history (see [`HistoryRead`] and [`Replay`]).
    async fn history(&self, topic: &str, read: HistoryRead<'_>) -> Result<Replay, BrokerError>;

    /// The messages after `since` in epoch `epoch`, all of them (at most `limit`), if history still
    /// holds them: what a subscriber resuming with `since` gets. The same code path as
    /// [`Broker::history`], read whole.
    async fn replay(
        &self,
        topic: &str,
        epoch: &str,
        since: Offset,
        limit: usize,
    ) -> Result<Replay, BrokerError> {
        self.history(
            topic,
            HistoryRead {
                epoch: Some(epoch),
                since: Some(since),
                limit,
                whole: true,
            },
        )
        .await
    }

    /// The broker's clock, in ms since the Unix epoch: the time the history entries and the
    /// directory are stamped with. A wildcard ack carries it, read after the pattern subscription
    /// is in place, so every message stamped at or after it reaches the node live.
    async fn clock(&self) -> Result<u64, BrokerError> {
        Err(BrokerError::Unsupported("a broker clock".into()))
    }

    /// The topics below `prefix` (every topic for the empty prefix) published to at or after
    /// `since_ms` on [`Broker::clock`], if the broker can tell: what a wildcard resume replays.
    /// [`Directory::Unknown`] when it cannot (more than [`MAX_DIRECTORY_TOPICS`], a window older
    /// than the directory keeps, a directory lost or restarted since, a broker without one).
    async fn directory(&self, prefix: &str, since_ms: u64) -> Result<Directory, BrokerError> {
        let _ = (prefix, since_ms);
        Ok(Directory::Unknown("this broker keeps no topic directory"))
    }

    /// Where a topic's messages stamped at or after `since_ms` start in its history, looking at
    /// most `max` messages back (see [`Seek`]): a wildcard resume's replay of a topic the client
    /// never saw.
    async fn seek(&self, topic: &str, since_ms: u64, max: u64) -> Result<Seek, BrokerError> {
        let _ = (topic, since_ms, max);
        Err(BrokerError::Unsupported("seeking history by time".into()))
    }

    /// Whether the broker path currently works end to end.
    fn is_ready(&self) -> bool;
}
