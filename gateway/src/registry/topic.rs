//! One topic's node-level life: its table entry (the local subscribers) and its broker
//! subscription, owned together.
//!
//! * The first [`Registry::join`] creates the entry; [`Subscription::link_broker`] subscribes the
//!   topic in the broker if the node does not hold that subscription yet.
//! * Dropping a [`Subscription`] leaves the topic at once (so nothing more is queued for it). When
//!   the last local subscriber left, the topic cools down for `broker.unsubscribe_delay`: its broker
//!   subscription stays, so a subscriber coming back meanwhile costs the broker nothing. After the
//!   delay, if nobody came back, the node unsubscribes in the broker and forgets the topic.
//!
//! Broker calls for a topic are serialized by its [`Link`], an async lock held across them, so a
//! subscribe never races an unsubscribe of the same topic: a subscriber that joins while the
//! cool-down is unsubscribing waits for it, then subscribes again.

use std::collections::HashMap;
use std::sync::Arc;

use crate::send_queue::SendQueue;
use crate::topic::{Pattern, is_wildcard};

use super::delivery::SubState;
use super::{ConnId, Registry};

/// A topic's table entry.
pub(super) struct Entry {
    /// Its local subscribers.
    pub(super) subs: Vec<Subscriber>,
    /// Its broker subscription.
    pub(super) link: Arc<Link>,
    /// A pattern's: where its subscribers stand in each of its topics (empty for a topic).
    pub(super) cursors: super::wildcard::TopicCursors,
    /// Counts the times the topic lost its last local subscriber; a cool-down acts only while its
    /// count is still the latest and nobody joined.
    idle_round: u64,
}

/// A topic's broker subscription: whether the node holds it, behind the lock that serializes the
/// broker calls for the topic. For a wildcard pattern it is the subscription of its literal prefix.
pub(crate) struct Link {
    subscribed: tokio::sync::Mutex<bool>,
    /// The literal prefix, for a pattern's entry.
    prefix: Option<String>,
}

/// One local subscriber of a topic.
pub(super) struct Subscriber {
    pub(super) conn: ConnId,
    pub(super) queue: Arc<SendQueue>,
    pub(super) state: SubState,
}

/// A connection's subscription to one topic, from [`Registry::join`] until it is dropped.
///
/// Dropping it leaves the topic (the subscriber's queue gets nothing more of it) and, for the last
/// local subscriber, starts the topic's cool-down. A session keeps it from before its first await on
/// the subscribe path, so however the session ends (an error, a closed connection, its task
/// aborted mid-replay) the subscriber does not outlive it.
pub struct Subscription {
    registry: Arc<Registry>,
    topic: Arc<str>,
    conn: ConnId,
    queue: Arc<SendQueue>,
    link: Arc<Link>,
}

impl Subscription {
    /// The topic (the registry's shared name).
    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// The connection.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The connection's send queue.
    pub fn queue(&self) -> &Arc<SendQueue> {
        &self.queue
    }

    /// Whether it is a wildcard subscription (its topic is a pattern).
    pub fn is_wildcard(&self) -> bool {
        self.link.prefix.is_some()
    }

    pub(super) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Makes sure the broker delivers the topic to this node: subscribes it unless the node holds
    /// the subscription already (another local subscriber, or a topic cooling down). Once this
    /// returns `Ok`, every later publish to the topic reaches the registry.
    pub async fn link_broker(&self) -> Result<(), broker_bridge::BrokerError> {
        let mut subscribed = self.link.subscribed.lock().await;
        if *subscribed {
            return Ok(());
        }
        let Some(broker) = self.registry.broker() else {
            // No broker attached: a registry on its own (unit tests).
            return Ok(());
        };
        match &self.link.prefix {
            Some(prefix) => broker.subscribe_prefix(prefix).await?,
            None => {
                broker.subscribe(&self.topic).await?;
                self.registry.metrics.broker_topics.inc();
            }
        }
        *subscribed = true;
        Ok(())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.leave(&self.topic, self.conn, &self.link);
    }
}

impl Registry {
    /// Adds a pending subscriber to `topic` and returns its guard (see [`Subscription`]).
    pub fn join(
        self: &Arc<Self>,
        topic: &str,
        conn: ConnId,
        queue: Arc<SendQueue>,
    ) -> Subscription {
        let mut shard = self.shard(topic);
        let (name, entry) = match shard.get_key_value(topic) {
            Some((name, _)) => {
                let name = name.clone();
                let entry = shard.get_mut(topic).expect("present");
                (name, entry)
            }
            None => {
                let name: Arc<str> = topic.into();
                // A pattern (validated by the caller) is indexed by its literal prefix.
                let pattern = is_wildcard(topic)
                    .then(|| Pattern::parse(topic).ok())
                    .flatten();
                let prefix = pattern.as_ref().map(Pattern::literal_prefix);
                if let Some(pattern) = pattern {
                    self.wild.add(&name, pattern);
                }
                let entry = shard.entry(name.clone()).or_insert_with(|| Entry {
                    subs: Vec::new(),
                    link: Arc::new(Link {
                        subscribed: tokio::sync::Mutex::new(false),
                        prefix,
                    }),
                    cursors: Default::default(),
                    idle_round: 0,
                });
                (name, entry)
            }
        };
        if entry.subs.is_empty() {
            self.entries_gauge(&entry.link).inc();
        }
        // A wildcard subscriber holds its topics' messages back until its ack is queued.
        let state = if entry.link.prefix.is_some() {
            SubState::WildPending(Default::default())
        } else {
            SubState::Pending(Default::default())
        };
        entry.subs.push(Subscriber {
            conn,
            queue: queue.clone(),
            state,
        });
        self.metrics.subscriptions.inc();
        Subscription {
            registry: self.clone(),
            topic: name,
            conn,
            queue,
            link: entry.link.clone(),
        }
    }

    /// Removes a subscriber (see [`Subscription`]'s drop); the last one starts the cool-down.
    fn leave(self: &Arc<Self>, topic: &Arc<str>, conn: ConnId, link: &Arc<Link>) {
        let mut shard = self.shard(topic);
        let Some(entry) = shard.get_mut(&**topic) else {
            return;
        };
        if !Arc::ptr_eq(&entry.link, link) {
            return;
        }
        let Some(i) = entry.subs.iter().position(|s| s.conn == conn) else {
            return;
        };
        // Whatever it held back goes with it.
        entry.subs.swap_remove(i);
        self.metrics.subscriptions.dec();
        if !entry.subs.is_empty() {
            return;
        }
        self.entries_gauge(link).dec();
        entry.idle_round += 1;
        let round = entry.idle_round;
        let runtime = tokio::runtime::Handle::try_current();
        match (self.broker(), runtime) {
            (Some(_), Ok(rt)) => {
                drop(shard);
                let (registry, topic, link) = (self.clone(), topic.clone(), link.clone());
                rt.spawn(async move { registry.cool_down(topic, link, round).await });
            }
            // Nothing to unsubscribe from (a registry on its own), or no runtime to wait in
            // (process exit): forget the topic now.
            _ => {
                self.forget_entry(&mut shard, topic, link);
            }
        }
    }

    /// The gauge that counts entries like this one: topics, or wildcard patterns.
    fn entries_gauge(&self, link: &Link) -> &prometheus::IntGauge {
        match link.prefix {
            Some(_) => &self.metrics.wildcards,
            None => &self.metrics.topics,
        }
    }

    /// Removes an entry from the table (and a pattern's from the wildcard index).
    fn forget_entry(&self, shard: &mut HashMap<Arc<str>, Entry>, key: &str, link: &Link) {
        shard.remove(key);
        if let Some(prefix) = &link.prefix {
            self.wild.remove(key, prefix);
        }
    }

    /// Waits `broker.unsubscribe_delay`, then drops the topic's broker subscription and forgets
    /// it, unless a subscriber joined meanwhile (or a later cool-down took over).
    async fn cool_down(self: Arc<Self>, topic: Arc<str>, link: Arc<Link>, round: u64) {
        let delay = self.limits.unsubscribe_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut subscribed = link.subscribed.lock().await;
        if !self.is_idle(&topic, &link, Some(round)) {
            return;
        }
        if *subscribed {
            if let Some(broker) = self.broker() {
                let done = match &link.prefix {
                    Some(prefix) => broker.unsubscribe_prefix(prefix).await,
                    None => broker.unsubscribe(&topic).await,
                };
                if let Err(e) = done {
                    tracing::warn!(topic = %topic, error = %e, "broker unsubscribe failed");
                }
            }
            *subscribed = false;
            if link.prefix.is_none() {
                self.metrics.broker_topics.dec();
            }
        }
        // Still under the link's lock: a subscriber that joined during the unsubscribe waits for
        // it, finds the topic unsubscribed and subscribes again; the entry then stays.
        let mut shard = self.shard(&topic);
        if self.entry_is_idle(&shard, &topic, &link, None) {
            self.forget_entry(&mut shard, &topic, &link);
        }
    }

    /// Whether `topic`'s entry is still the one of `link`, without subscribers and, with `round`,
    /// in that idle round.
    fn is_idle(&self, topic: &str, link: &Arc<Link>, round: Option<u64>) -> bool {
        let shard = self.shard(topic);
        self.entry_is_idle(&shard, topic, link, round)
    }

    fn entry_is_idle(
        &self,
        shard: &HashMap<Arc<str>, Entry>,
        topic: &str,
        link: &Arc<Link>,
        round: Option<u64>,
    ) -> bool {
        shard.get(topic).is_some_and(|e| {
            Arc::ptr_eq(&e.link, link)
                && e.subs.is_empty()
                && round.is_none_or(|r| r == e.idle_round)
        })
    }
}
