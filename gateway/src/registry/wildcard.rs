//! Wildcard subscriptions (`scores.*`, `scores.>`): which patterns have local subscribers, and
//! fan-out of a topic's messages to them.
//!
//! A pattern has a table entry of its own, keyed by the pattern (no topic contains `*` or `>`, so
//! the keys never collide), with the same guard, cool-down and broker link as a topic; its broker
//! subscription is the pattern's literal prefix ([`Pattern::literal_prefix`]), which brings every
//! topic below it. The index here maps each prefix to its patterns, so a message looks up only the
//! prefixes of its own topic (one lookup per level, none at all while no pattern is subscribed).
//!
//! A wildcard subscriber has no cursor of its own: the broker hands each topic over in offset
//! order, once, and the subscriber gets every message after its ack. Messages of its topics that
//! arrive before the ack is queued (and during a resume's replay) are held back
//! ([`super::wild_hold`]) and released after it, under the entry's lock, so nothing slips in
//! between and nothing stamped after the ack's `time` is missed.
//!
//! The pattern's entry keeps one [`TopicCursors`] for all its subscribers: across an epoch change
//! (a Redis flush or rollback) the broker's order jumps, and as a wildcard's messages carry their
//! epoch only at offset 1, the gap frame in front of such a message is how its subscribers learn
//! the new epoch, as a topic's own subscribers do from their cursors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use broker_bridge::{Lost, Message, Position, strict_prefixes};
use bytes::Bytes;

use crate::protocol;
use crate::send_queue::{Flushes, SendQueue};
use crate::topic::Pattern;

use super::Registry;
use super::delivery::{Cursor, Held, How, Step, SubState, before};

/// The patterns of one literal prefix: each entry's key and its parsed pattern.
type PrefixPatterns = Vec<(Arc<str>, Pattern)>;

/// The patterns in the table, by literal prefix.
#[derive(Default)]
pub(super) struct WildIndex {
    by_prefix: RwLock<HashMap<String, PrefixPatterns>>,
    /// Patterns in the index: lets a node without any skip the lookups.
    len: AtomicUsize,
}

impl WildIndex {
    /// Adds a pattern whose entry was just created.
    pub(super) fn add(&self, key: &Arc<str>, pattern: Pattern) {
        let mut map = self.by_prefix.write().unwrap_or_else(|e| e.into_inner());
        map.entry(pattern.literal_prefix())
            .or_default()
            .push((key.clone(), pattern));
        self.len.fetch_add(1, Ordering::Release);
    }

    /// Removes a pattern whose entry is forgotten.
    pub(super) fn remove(&self, key: &str, prefix: &str) {
        let mut map = self.by_prefix.write().unwrap_or_else(|e| e.into_inner());
        let Some(list) = map.get_mut(prefix) else {
            return;
        };
        let before = list.len();
        list.retain(|(k, _)| &**k != key);
        if list.len() < before {
            self.len.fetch_sub(1, Ordering::Release);
        }
        if list.is_empty() {
            map.remove(prefix);
        }
    }

    /// The patterns that match `topic`.
    fn matching(&self, topic: &str) -> Vec<Arc<str>> {
        if self.len.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let map = self.by_prefix.read().unwrap_or_else(|e| e.into_inner());
        strict_prefixes(topic)
            .filter_map(|prefix| map.get(prefix))
            .flatten()
            .filter(|(_, p)| p.matches(topic))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Where subscribers stand in each topic of a pattern: the last position sent (or signalled by a
/// gap) per topic. A topic seen for the first time starts where its first message or gap is.
#[derive(Default)]
pub(super) struct TopicCursors(HashMap<Arc<str>, Cursor>);

impl TopicCursors {
    /// Cursors at the given positions (where a resume's replay left each topic).
    pub(super) fn at(positions: &HashMap<Arc<str>, Position>) -> Self {
        TopicCursors(
            positions
                .iter()
                .map(|(t, p)| (t.clone(), Cursor::at(p)))
                .collect(),
        )
    }

    /// What to do with a message of `topic` at `position` (see [`Cursor::step`]).
    pub(super) fn step(&mut self, topic: &Arc<str>, position: Option<&Position>) -> Step {
        let Some(p) = position else {
            return Step::Deliver;
        };
        match self.0.get_mut(&**topic) {
            Some(cursor) => cursor.step(Some(p)),
            None => {
                self.0.insert(topic.clone(), Cursor::at(p));
                Step::Deliver
            }
        }
    }

    /// The cursor of `topic`, if it was seen.
    pub(super) fn get(&self, topic: &str) -> Option<&Cursor> {
        self.0.get(topic)
    }

    /// Whether a gap signal of `topic` resuming at `resume` is news (see [`Cursor::gap`]).
    pub(super) fn gap(&mut self, topic: &str, resume: &Position, raw_after: bool) -> bool {
        match self.0.get_mut(topic) {
            Some(cursor) => cursor.gap(resume, raw_after),
            None => {
                self.0.insert(topic.into(), Cursor::at(resume));
                true
            }
        }
    }
}

impl IntoIterator for TopicCursors {
    type Item = (Arc<str>, Cursor);
    type IntoIter = std::collections::hash_map::IntoIter<Arc<str>, Cursor>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Registry {
    /// Whether the node may serve `pattern`: it does already, or it serves fewer than `max`
    /// patterns. Checked before joining, so concurrent subscribes may pass it by a few.
    pub fn has_room_for_pattern(&self, pattern: &str, max: usize) -> bool {
        self.wild.len.load(Ordering::Acquire) < max || self.shard(pattern).contains_key(pattern)
    }

    /// Queues `frame` (`message`, encoded once for the node) to the live subscribers of every
    /// pattern that matches its topic, after a gap frame where its epoch changed, and holds both
    /// for the pending ones. Returns how many got the message.
    pub(super) fn deliver_wild(
        &self,
        flushes: &mut Flushes,
        message: &Message,
        how: &How<'_>,
        frame: &mut dyn FnMut(&SendQueue) -> Bytes,
    ) -> u64 {
        let mut delivered = 0;
        let (max_frames, max_bytes) = (self.limits.max_held_frames, self.limits.max_held_bytes);
        let position = message.position.as_ref();
        let mut gap_frame = None;
        for key in self.wild.matching(&message.topic) {
            let mut shard = self.shard(&key);
            let Some(entry) = shard.get_mut(&*key) else {
                continue;
            };
            // Moved whether or not anyone subscribes now: a subscriber joining later holds what
            // comes after this.
            let step = entry.cursors.step(&message.topic, position);
            if step == Step::Skip {
                continue;
            }
            let mut gap_before = |p: &Position| {
                gap_frame
                    .get_or_insert_with(|| protocol::gap(&message.topic, &before(p)))
                    .clone()
            };
            for sub in &mut entry.subs {
                match &mut sub.state {
                    SubState::Wild(ahead) => {
                        let step = ahead
                            .step(&message.topic, position, &entry.cursors)
                            .unwrap_or(step);
                        if step == Step::GapThenDeliver
                            && let Some(p) = position
                        {
                            self.push_gap(flushes, &sub.queue, gap_before(p));
                        }
                        if step != Step::Skip {
                            delivered +=
                                u64::from(how.push(self, flushes, &sub.queue, frame(&sub.queue)));
                        }
                    }
                    SubState::WildPending(held) => {
                        if step == Step::GapThenDeliver
                            && let Some(p) = position
                        {
                            held.hold(
                                &message.topic,
                                Held::gap(before(p), gap_before(p)),
                                max_frames,
                                max_bytes,
                            );
                        }
                        held.hold(
                            &message.topic,
                            Held::message(message.position.clone(), frame(&sub.queue)),
                            max_frames,
                            max_bytes,
                        );
                    }
                    _ => {}
                }
            }
        }
        delivered
    }

    /// Queues a gap frame of `topic` to the live subscribers of the patterns that match it (and
    /// holds it for the pending ones), unless they are past it.
    pub(super) fn gap_wild(
        &self,
        flushes: &mut Flushes,
        topic: &str,
        resume: &Position,
        lost: Lost,
    ) {
        let mut frame = None;
        let (max_frames, max_bytes) = (self.limits.max_held_frames, self.limits.max_held_bytes);
        let mut name: Option<Arc<str>> = None;
        for key in self.wild.matching(topic) {
            let mut shard = self.shard(&key);
            let Some(entry) = shard.get_mut(&*key) else {
                continue;
            };
            let raw_after = lost == Lost::Raw;
            if !entry.cursors.gap(topic, resume, raw_after) {
                continue;
            }
            for sub in &mut entry.subs {
                let f = frame.get_or_insert_with(|| protocol::gap(topic, resume));
                match &mut sub.state {
                    SubState::Wild(ahead) => {
                        let news = ahead.gap(topic, resume, raw_after, &entry.cursors);
                        if news.unwrap_or(true) {
                            self.push_gap(flushes, &sub.queue, f.clone());
                        }
                    }
                    SubState::WildPending(held) => held.hold(
                        name.get_or_insert_with(|| topic.into()),
                        Held::gap(resume.clone(), f.clone()),
                        max_frames,
                        max_bytes,
                    ),
                    _ => {}
                }
            }
        }
    }
}
