//! Which local connections want which topic, and fan-out of broker messages to them.
//!
//! The registry is the node's [`MessageSink`](broker_bridge::MessageSink): the broker hands it each
//! message once, the registry encodes it into one WebSocket frame and queues the same bytes to every
//! local subscriber, without waiting for any of them ([`delivery`]).
//!
//! It also owns each topic's node-level life ([`topic`]): the table entry and the broker
//! subscription come and go together. A connection's [`Subscription`] is a guard: dropping it, at
//! any point (an unsubscribe, a closed connection, a session task aborted in the middle of a
//! subscribe), leaves the topic, and the last one to leave starts the topic's cool-down
//! (`broker.unsubscribe_delay`), after which the broker subscription is dropped unless someone came
//! back.
//!
//! A new subscriber starts *pending*: messages that arrive while its subscribe is being acknowledged
//! (and while a resume's replay is being sent) are held back, and released right after, minus those
//! at or below what it already got. That keeps the promise that `message` offsets continue from the
//! ack's offset (or the replay's last), with no gap and no duplicate, whatever the broker's delivery
//! timing. The held list is bounded; when it would overflow it is dropped and the subscriber reads
//! the rest from history before it turns live ([`Activation::Behind`]).

mod delivery;
mod topic;
mod wild_ahead;
mod wild_hold;
mod wildcard;

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use broker_bridge::{Broker, Message, Position};
use bytes::Bytes;

use crate::metrics::Metrics;
use crate::namespace::{Namespace, Namespaces};
use crate::protocol;
use crate::send_queue::{Flushes, Policy, Pushed, SendQueue};

use delivery::{Cursor, SubState, WarnLimiter};
use topic::Entry;
pub use topic::Subscription;

/// Identifies a connection on this node.
pub type ConnId = u64;

const SHARDS: usize = 16;

/// One shard of the table.
type Shard = Mutex<HashMap<Arc<str>, Entry>>;

/// The registry's limits, from the settings.
#[derive(Clone, Copy, Debug)]
pub struct RegistryLimits {
    /// Messages a pending subscriber may hold back before its held list is dropped (it then reads
    /// them from history): `limits.send_queue_frames`.
    pub max_held_frames: usize,
    /// Bytes of held frames a pending subscriber may keep: `limits.send_queue_bytes`.
    pub max_held_bytes: usize,
    /// Messages from the broker whose `data` nests deeper than this are dropped:
    /// `limits.max_json_depth`.
    pub max_json_depth: usize,
    /// How long a topic keeps its broker subscription after its last local subscriber left:
    /// `broker.unsubscribe_delay`.
    pub unsubscribe_delay: Duration,
    /// How messages are compressed for subscribers that negotiated permessage-deflate; `None`
    /// when `compression.enabled` is off.
    pub compression: Option<crate::deflate::Outbound>,
}

/// The topic → local subscribers table.
pub struct Registry {
    shards: Box<[Shard]>,
    hasher: RandomState,
    metrics: Arc<Metrics>,
    limits: RegistryLimits,
    /// The broker the topics are subscribed in; set once, right after the broker is built (it needs
    /// the registry as its sink first). Weak, so the two do not keep each other alive.
    broker: OnceLock<Weak<dyn Broker>>,
    /// Rate-limits the warnings about broker messages that are not deliverable.
    refused: WarnLimiter,
    /// The wildcard patterns in the table, by literal prefix.
    wild: wildcard::WildIndex,
    /// The options of each topic's namespace (message size, slow-consumer policy) and its metrics.
    namespaces: Arc<Namespaces>,
}

/// What [`Registry::try_activate`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Activation {
    /// The subscriber is live: what it held back is queued after what it was sent.
    Live,
    /// Its held list overflowed: messages up to this position were dropped from it and must be read
    /// from history first. It holds again from now on.
    Behind(Position),
    /// The subscriber is gone (its connection closed).
    Gone,
}

impl Registry {
    /// Makes an empty registry. The broker is attached later ([`Registry::attach_broker`]).
    pub fn new(metrics: Arc<Metrics>, limits: RegistryLimits, namespaces: Arc<Namespaces>) -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            metrics,
            limits,
            broker: OnceLock::new(),
            refused: WarnLimiter::default(),
            wild: Default::default(),
            namespaces,
        }
    }

    /// Tells the registry which broker its topics are subscribed in. Only the first call counts.
    pub fn attach_broker(&self, broker: &Arc<dyn Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }

    fn broker(&self) -> Option<Arc<dyn Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    fn shard(&self, topic: &str) -> MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        let i = self.hasher.hash_one(topic) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on a subscriber (under its topic's lock); `None` when it is gone.
    fn with_subscriber<T>(
        &self,
        sub: &Subscription,
        f: impl FnOnce(&mut topic::Subscriber, &wildcard::TopicCursors, &Registry) -> T,
    ) -> Option<T> {
        let mut shard = self.shard(sub.topic());
        let entry = shard.get_mut(&**sub.topic())?;
        if !Arc::ptr_eq(&entry.link, sub.link()) {
            return None;
        }
        let s = entry.subs.iter_mut().find(|s| s.conn == sub.conn())?;
        Some(f(s, &entry.cursors, self))
    }

    /// Turns a pending subscriber live once everything up to `cursor` was queued for it: queues what
    /// it held back after `cursor` (with a gap frame first where the epoch changed), all under the
    /// topic's lock so no live message can slip in between. When its held list had overflowed, it
    /// stays pending and says up to where it must read history first.
    pub fn try_activate(&self, sub: &Subscription, cursor: &Position) -> Activation {
        let mut flushes = Flushes::new();
        let done = self.with_subscriber(sub, |s, _, reg| {
            let SubState::Pending(pending) = &mut s.state else {
                return Activation::Live;
            };
            if let Some(newest) = pending.behind(cursor) {
                return Activation::Behind(newest);
            }
            let (held, raw_dropped) = std::mem::take(pending).into_held();
            let mut live = Cursor::at(cursor);
            if raw_dropped {
                // Raw messages went with the overflowed held list, after what history gave it.
                reg.push_gap(&mut flushes, &s.queue, protocol::gap(sub.topic(), cursor));
            }
            reg.release(&mut flushes, sub.topic(), &s.queue, &mut live, held);
            s.state = SubState::Live(live);
            Activation::Live
        });
        flushes.run();
        done.unwrap_or(Activation::Gone)
    }

    /// Turns a pending subscriber live after a hole it cannot be sent (history no longer holds it,
    /// or the broker failed mid-replay): queues a gap frame saying the live stream continues after
    /// `resume` (or after the newest message its overflowed held list dropped, if later), then what
    /// it held back after that.
    pub fn activate_after_gap(&self, sub: &Subscription, resume: &Position) {
        let mut flushes = Flushes::new();
        self.with_subscriber(sub, |s, _, reg| {
            let SubState::Pending(pending) = &mut s.state else {
                return;
            };
            let pending = std::mem::take(pending);
            let resume = pending.dropped_after(resume).unwrap_or(resume).clone();
            // Raw messages it dropped, if any, are covered by the gap frame too.
            let (held, _) = pending.into_held();
            let mut live = Cursor::at(&resume);
            reg.push_gap(&mut flushes, &s.queue, protocol::gap(sub.topic(), &resume));
            reg.release(&mut flushes, sub.topic(), &s.queue, &mut live, held);
            s.state = SubState::Live(live);
        });
        flushes.run();
    }

    /// Queues part of a resume's replay for a subscriber that stays pending meanwhile (live
    /// messages held back). Messages that are not deliverable (too large, too deep) are dropped,
    /// as live ones are. Returns how many were queued.
    pub fn queue_replay(&self, queue: &Arc<SendQueue>, replay: &[Message]) -> usize {
        let mut flushes = Flushes::new();
        let mut queued = 0;
        for m in replay {
            if !self.deliverable(m) {
                continue;
            }
            self.push(&mut flushes, queue, protocol::message(m));
            queued += 1;
        }
        flushes.run();
        queued
    }

    /// Queues a reply-like frame (an ack) on a subscriber's queue, counting what the queue did.
    pub fn queue_frame(&self, queue: &Arc<SendQueue>, frame: Bytes) {
        let mut flushes = Flushes::new();
        self.push(&mut flushes, queue, frame);
        flushes.run();
    }

    /// Queues a gap frame and counts it.
    fn push_gap(&self, flushes: &mut Flushes, queue: &Arc<SendQueue>, frame: Bytes) -> bool {
        let queued = self.push(flushes, queue, frame);
        if queued {
            self.metrics.gaps_signalled.inc();
        }
        queued
    }

    /// Queues one frame, applying the queue's slow-consumer policy and counting what it did.
    fn push(&self, flushes: &mut Flushes, queue: &Arc<SendQueue>, frame: Bytes) -> bool {
        self.push_as(flushes, queue, frame, Policy::Own, None)
    }

    /// Queues one frame with `policy`, counting what it did (conflations in `ns`'s metrics).
    /// Returns whether the frame is queued.
    fn push_as(
        &self,
        flushes: &mut Flushes,
        queue: &Arc<SendQueue>,
        frame: Bytes,
        policy: Policy<'_>,
        ns: Option<&Namespace>,
    ) -> bool {
        match flushes.push_as(queue, frame, policy) {
            Pushed::Queued => true,
            Pushed::Conflated => {
                if let Some(ns) = ns {
                    ns.conflated.inc();
                }
                true
            }
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

    /// Topics in the table, cooling down ones included (for tests).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod wild_tests;
