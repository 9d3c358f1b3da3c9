//! Which local connections want which topic, and fan-out of broker messages to them.
//!
//! The registry is the node's [`MessageSink`]: the broker hands it each message once, the registry
//! encodes it into one WebSocket frame and queues the same bytes to every local subscriber, without
//! waiting for any of them.
//!
//! A new subscriber starts *pending*: messages that arrive while its subscribe is being acknowledged
//! are held back, and released right after its `ack`, minus those at or below the acknowledged
//! offset. That keeps the promise that `message` offsets continue from the ack's offset, with no gap
//! and no duplicate, whatever the broker's delivery timing.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use broker_bridge::{Epoch, Message, MessageSink, Offset, Position};
use bytes::Bytes;

use crate::metrics::Metrics;
use crate::protocol;
use crate::send_queue::{Flushes, Pushed, SendQueue};

/// Identifies a connection on this node.
pub type ConnId = u64;

/// Serializes broker subscribe/unsubscribe calls for one topic; the flag says whether the node holds
/// a broker subscription for it.
pub type Gate = Arc<tokio::sync::Mutex<bool>>;

const SHARDS: usize = 16;

/// One shard of the table.
type Shard = Mutex<HashMap<Arc<str>, Entry>>;

/// The topic → local subscribers table.
pub struct Registry {
    shards: Box<[Shard]>,
    hasher: RandomState,
    metrics: Arc<Metrics>,
    /// Messages a pending subscriber may hold back before it counts as a slow consumer.
    max_pending: usize,
}

struct Entry {
    subs: Vec<Subscriber>,
    gate: Gate,
}

struct Subscriber {
    conn: ConnId,
    queue: Arc<SendQueue>,
    state: SubState,
}

enum SubState {
    /// Subscribe not yet acknowledged: frames held back, with their positions.
    Pending(Vec<(Option<Position>, Bytes)>),
    /// Acknowledged, or last delivered, at this position: later offsets (and offset-less raw
    /// messages) are delivered.
    Live(Cursor),
}

/// Where a live subscriber stands in its topic.
struct Cursor {
    epoch: Epoch,
    offset: Offset,
}

impl Cursor {
    /// Whether a message at `position` comes after the cursor; if so the cursor moves to it.
    ///
    /// A message of another epoch (the broker lost the topic's sequence, e.g. a Redis flush) starts
    /// the count again: offsets restart there, and dropping them as "old" would lose them.
    fn advance(&mut self, position: Option<&Position>) -> bool {
        let Some(p) = position else {
            return true;
        };
        if p.epoch != self.epoch {
            self.epoch = p.epoch.clone();
            self.offset = p.offset;
            return true;
        }
        if p.offset > self.offset {
            self.offset = p.offset;
            return true;
        }
        false
    }
}

impl Registry {
    /// Makes an empty registry.
    pub fn new(metrics: Arc<Metrics>, max_pending: usize) -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            metrics,
            max_pending,
        }
    }

    fn shard(&self, topic: &str) -> MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        let i = self.hasher.hash_one(topic) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a pending subscriber. Returns the topic's shared name and its gate.
    pub fn join(&self, topic: &str, conn: ConnId, queue: Arc<SendQueue>) -> (Arc<str>, Gate) {
        let mut shard = self.shard(topic);
        let (name, entry) = match shard.get_key_value(topic) {
            Some((name, _)) => {
                let name = name.clone();
                let entry = shard.get_mut(topic).expect("present");
                (name, entry)
            }
            None => {
                self.metrics.topics.inc();
                let name: Arc<str> = topic.into();
                let entry = shard.entry(name.clone()).or_insert_with(|| Entry {
                    subs: Vec::new(),
                    gate: Arc::new(tokio::sync::Mutex::new(false)),
                });
                (name, entry)
            }
        };
        entry.subs.push(Subscriber {
            conn,
            queue,
            state: SubState::Pending(Vec::new()),
        });
        self.metrics.subscriptions.inc();
        (name, entry.gate.clone())
    }

    /// Turns a pending subscriber live: queues `ack` (unless it was queued already), then `replay`,
    /// then whatever was held back with an offset above `floor` and the replay (in `floor`'s epoch),
    /// all under the topic's lock so no live message can slip in between.
    pub fn activate(
        &self,
        topic: &str,
        conn: ConnId,
        ack: Option<Bytes>,
        replay: &[Message],
        floor: &Position,
    ) {
        let mut shard = self.shard(topic);
        let Some(entry) = shard.get_mut(topic) else {
            return;
        };
        let Some(sub) = entry.subs.iter_mut().find(|s| s.conn == conn) else {
            return;
        };
        let mut cursor = Cursor {
            epoch: floor.epoch.clone(),
            offset: floor.offset,
        };
        let held = std::mem::replace(&mut sub.state, SubState::Pending(Vec::new()));
        let mut flushes = Flushes::new();
        if let Some(ack) = ack {
            flushes.push(&sub.queue, ack);
        }
        for m in replay {
            cursor.advance(m.position.as_ref());
            self.push(&mut flushes, &sub.queue, protocol::message(m));
        }
        if let SubState::Pending(held) = held {
            for (position, frame) in held {
                if cursor.advance(position.as_ref()) {
                    self.push(&mut flushes, &sub.queue, frame);
                }
            }
        }
        sub.state = SubState::Live(cursor);
        drop(shard);
        flushes.run();
    }

    /// Queues the first part of a long replay for a subscriber that stays pending meanwhile (live
    /// messages held back): `ack` first when given. [`Registry::activate`] queues the rest.
    pub fn queue_replay(&self, queue: &Arc<SendQueue>, ack: Option<Bytes>, replay: &[Message]) {
        let mut flushes = Flushes::new();
        if let Some(ack) = ack {
            flushes.push(queue, ack);
        }
        for m in replay {
            self.push(&mut flushes, queue, protocol::message(m));
        }
        flushes.run();
    }

    /// Removes a subscriber. Returns the topic's gate when no local subscriber is left, so the caller
    /// can drop the broker subscription (see [`Registry::remove_if_idle`]).
    pub fn leave(&self, topic: &str, conn: ConnId) -> Option<Gate> {
        let mut shard = self.shard(topic);
        let entry = shard.get_mut(topic)?;
        let before = entry.subs.len();
        entry.subs.retain(|s| s.conn != conn);
        if entry.subs.len() < before {
            self.metrics.subscriptions.dec();
        }
        entry.subs.is_empty().then(|| entry.gate.clone())
    }

    /// Whether the topic has no local subscriber (a topic not in the table has none).
    pub fn is_idle(&self, topic: &str) -> bool {
        self.shard(topic)
            .get(topic)
            .is_none_or(|e| e.subs.is_empty())
    }

    /// Forgets the topic if it still has no subscriber and `gate` is still its gate.
    pub fn remove_if_idle(&self, topic: &str, gate: &Gate) {
        let mut shard = self.shard(topic);
        if shard
            .get(topic)
            .is_some_and(|e| e.subs.is_empty() && Arc::ptr_eq(&e.gate, gate))
        {
            shard.remove(topic);
            self.metrics.topics.dec();
        }
    }

    fn push(&self, flushes: &mut Flushes, queue: &Arc<SendQueue>, frame: Bytes) -> bool {
        match flushes.push(queue, frame) {
            Pushed::Queued => true,
            Pushed::DroppedOldest(n) => {
                self.metrics
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc_by(n as u64);
                true
            }
            Pushed::Overflow => {
                self.metrics.slow_consumer_disconnects.inc();
                self.metrics
                    .dropped
                    .with_label_values(&["slow_consumer"])
                    .inc();
                false
            }
            Pushed::Closed => {
                self.metrics.dropped.with_label_values(&["closing"]).inc();
                false
            }
        }
    }
}

impl MessageSink for Registry {
    fn gap(&self, topic: &str, resume: &Position) {
        // Interim: the gap frame to clients lands with the registry rework (branch h2).
        tracing::warn!(topic, offset = resume.offset, "gap");
    }

    fn deliver(&self, message: Message) {
        let started = Instant::now();
        let mut shard = self.shard(&message.topic);
        let Some(entry) = shard.get_mut(&*message.topic) else {
            return;
        };
        let frame = protocol::message(&message);
        let mut delivered = 0u64;
        let mut flushes = Flushes::new();
        for sub in &mut entry.subs {
            match &mut sub.state {
                SubState::Live(cursor) => {
                    if cursor.advance(message.position.as_ref())
                        && self.push(&mut flushes, &sub.queue, frame.clone())
                    {
                        delivered += 1;
                    }
                }
                SubState::Pending(held) => {
                    if held.len() >= self.max_pending {
                        sub.queue
                            .close(crate::send_queue::CloseReason::SLOW_CONSUMER);
                        self.metrics.slow_consumer_disconnects.inc();
                    } else {
                        held.push((message.position.clone(), frame.clone()));
                    }
                }
            }
        }
        drop(shard);
        // Written in tasks of their own: the broker calls this under its topic's lock (memory) or
        // from its only subscription reader (Redis), and a big fan-out is spread over the workers.
        flushes.spawn();
        self.metrics.delivered.inc_by(delivered);
        self.metrics
            .fanout_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: Offset) -> Position {
        Position {
            epoch: Epoch::new(epoch),
            offset,
        }
    }

    #[test]
    fn cursor_skips_old_offsets_and_restarts_on_a_new_epoch() {
        let mut c = Cursor {
            epoch: Epoch::new("e1"),
            offset: 41,
        };
        assert!(!c.advance(Some(&at("e1", 41))), "already acknowledged");
        assert!(c.advance(Some(&at("e1", 42))));
        assert!(!c.advance(Some(&at("e1", 42))), "duplicate");
        assert!(c.advance(None), "raw messages always pass");
        // Redis lost the topic (flush, restart): offsets start again under a new epoch.
        assert!(c.advance(Some(&at("e2", 1))));
        assert!(c.advance(Some(&at("e2", 2))));
        assert!(!c.advance(Some(&at("e2", 1))));
    }
}
