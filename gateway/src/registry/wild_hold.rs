//! What a wildcard subscriber holds back until it turns live: the messages (and gap signals) of
//! its topics that arrive while its ack is prepared and while a resume's replay is sent.
//!
//! Like a topic's pending subscriber, the held list is bounded (frames and bytes). When it would
//! overflow, it is dropped and only the newest position dropped *per topic* is kept: at activation
//! each such topic gets a gap frame (the client reloads it), never a silent hole. That map is
//! bounded too; a subscriber whose live traffic overflows even that is closed as a slow consumer.

use std::collections::HashMap;
use std::sync::Arc;

use broker_bridge::{EMPTY_EPOCH, Epoch, MAX_DIRECTORY_TOPICS, Position};
use bytes::Bytes;

use crate::protocol;
use crate::send_queue::{CloseReason, Flushes, SendQueue};

use super::Registry;
use super::delivery::{Cursor, Held, Step, SubState, before};
use super::wild_ahead::Ahead;
use super::wildcard::TopicCursors;

/// What a pending wildcard subscriber holds back.
#[derive(Default)]
pub(super) struct WildHeld {
    held: Vec<(Arc<str>, Held)>,
    bytes: usize,
    /// Set once the held list overflowed: each topic whose messages were dropped since, with what
    /// was dropped.
    dropped: Option<HashMap<Arc<str>, Dropped>>,
    /// More topics were dropped than [`MAX_DIRECTORY_TOPICS`]: the subscriber cannot be told which.
    lost: bool,
}

impl WildHeld {
    /// Holds a message or gap signal of `topic`, or records it as dropped (see the module doc).
    pub(super) fn hold(
        &mut self,
        topic: &Arc<str>,
        held: Held,
        max_frames: usize,
        max_bytes: usize,
    ) {
        if self.dropped.is_none() {
            if self.held.len() < max_frames && self.bytes + held.frame.len() <= max_bytes {
                self.bytes += held.frame.len();
                self.held.push((topic.clone(), held));
                return;
            }
            let mut dropped = HashMap::new();
            for (t, h) in std::mem::take(&mut self.held) {
                note(&mut dropped, t, h.position);
            }
            self.bytes = 0;
            self.dropped = Some(dropped);
        }
        if let Some(dropped) = &mut self.dropped {
            note(dropped, topic.clone(), held.position);
            if dropped.len() > MAX_DIRECTORY_TOPICS {
                self.lost = true;
                dropped.clear();
            }
        }
    }
}

/// What an overflowed held list dropped of one topic.
#[derive(Default)]
struct Dropped {
    /// The newest position dropped (`None` when only raw messages were).
    newest: Option<Position>,
    /// Raw messages were dropped after it (history never has them).
    raw_after: bool,
}

/// Records that `topic` dropped something at `p` (`None`: a raw message).
fn note(dropped: &mut HashMap<Arc<str>, Dropped>, topic: Arc<str>, p: Option<Position>) {
    let d = dropped.entry(topic).or_default();
    match p {
        Some(p) => {
            d.newest = Some(p);
            d.raw_after = false;
        }
        None => d.raw_after = true,
    }
}

impl Registry {
    /// Turns a wildcard subscriber live: queues `ack` (a plain subscribe's; a resume queued its
    /// own before the replay), then what it held back, skipping per topic what the replay sent
    /// already (`sent`: where the replay left each topic), all under the entry's lock so nothing
    /// slips in between. From then on it gets every message of its topics.
    pub fn activate_wildcard(
        &self,
        sub: &super::Subscription,
        ack: Option<Bytes>,
        sent: HashMap<Arc<str>, Position>,
    ) {
        let mut flushes = Flushes::new();
        self.with_subscriber(sub, |s, cursors, reg| {
            if let Some(ack) = ack {
                reg.push(&mut flushes, &s.queue, ack);
            }
            let SubState::WildPending(held) = &mut s.state else {
                return;
            };
            let held = std::mem::take(held);
            let own = reg.release_wild(&mut flushes, &s.queue, held, sent, cursors);
            s.state = SubState::Wild(Ahead::of(own, cursors));
        });
        flushes.run();
    }

    /// Queues what a wildcard subscriber held, and returns where that left it in each topic.
    fn release_wild(
        &self,
        flushes: &mut Flushes,
        queue: &Arc<SendQueue>,
        held: WildHeld,
        sent: HashMap<Arc<str>, Position>,
        entry: &TopicCursors,
    ) -> TopicCursors {
        // Per topic, from where the replay left it, or from the first thing held.
        let mut cursors = TopicCursors::at(&sent);
        if held.lost {
            self.metrics.slow_consumer_disconnects.inc();
            queue.close(CloseReason::SLOW_CONSUMER);
            return cursors;
        }
        if let Some(dropped) = held.dropped {
            for (topic, d) in dropped {
                let mut told = false;
                if let Some(newest) = &d.newest
                    && cursors.gap(&topic, newest, false)
                {
                    self.push_gap(flushes, queue, protocol::gap(&topic, newest));
                    told = true;
                }
                if d.raw_after && !told {
                    // Raw messages after the newest offset dropped (or of a topic that has none):
                    // lost wherever the subscriber stands in the topic.
                    let at = cursors
                        .get(&topic)
                        .or_else(|| entry.get(&topic))
                        .map(Cursor::position)
                        .unwrap_or_else(|| Position {
                            epoch: Epoch::new(EMPTY_EPOCH),
                            offset: 0,
                        });
                    cursors.gap(&topic, &at, true);
                    self.push_gap(flushes, queue, protocol::gap(&topic, &at));
                }
            }
            return cursors;
        }
        let stale = stale_before_replay(&held.held, &sent);
        for (i, (topic, h)) in held.held.into_iter().enumerate() {
            if stale.get(&topic).is_some_and(|&(first, ref epoch)| {
                i < first && h.position.as_ref().is_some_and(|p| p.epoch != *epoch)
            }) {
                continue;
            }
            if h.gap {
                let tell = h
                    .position
                    .as_ref()
                    .is_none_or(|resume| cursors.gap(&topic, resume, false));
                if tell {
                    self.push_gap(flushes, queue, h.frame);
                }
                continue;
            }
            let step = cursors.step(&topic, h.position.as_ref());
            if step == Step::GapThenDeliver
                && let Some(p) = &h.position
            {
                self.push_gap(flushes, queue, protocol::gap(&topic, &before(p)));
            }
            if step != Step::Skip && self.push(flushes, queue, h.frame) {
                self.metrics.delivered.inc();
                self.namespaces.of(&topic).delivered.inc();
            }
        }
        cursors
    }
}

/// Per topic the replay left in an epoch that a held item names too: the index of the first such
/// item, and the epoch. Held items of that topic in other epochs before it were routed before the
/// node saw the epoch the replay read: stale, and past for the subscriber. (When no held item names
/// the replay's epoch, the held ones cannot be told apart from a later epoch's; they are released
/// as usual, behind a gap frame.)
fn stale_before_replay(
    held: &[(Arc<str>, Held)],
    sent: &HashMap<Arc<str>, Position>,
) -> HashMap<Arc<str>, (usize, Epoch)> {
    let mut first = HashMap::new();
    for (i, (topic, h)) in held.iter().enumerate() {
        let (Some(p), Some(end)) = (&h.position, sent.get(topic)) else {
            continue;
        };
        if p.epoch == end.epoch && !first.contains_key(topic) {
            first.insert(topic.clone(), (i, end.epoch.clone()));
        }
    }
    first
}

impl Registry {
    /// Queues a gap frame of `topic` resuming at `resume` (a wildcard resume's topic that history
    /// cannot cover).
    pub fn queue_gap(&self, queue: &Arc<SendQueue>, topic: &str, resume: &Position) {
        let mut flushes = Flushes::new();
        self.push_gap(&mut flushes, queue, protocol::gap(topic, resume));
        flushes.run();
    }
}
