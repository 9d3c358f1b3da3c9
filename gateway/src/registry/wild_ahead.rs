//! A live wildcard subscriber that stands elsewhere than its pattern's entry in some topics.
//!
//! The entry's [`TopicCursors`] follow what the node routed. A resume's replay is read from history
//! instead, and may get ahead of that: further in a topic than the node has routed yet (its
//! subscription connection lags, or holds messages while it fills a hole), or into an epoch the
//! node has not seen yet (Redis was flushed during the replay). For those topics the subscriber
//! keeps a cursor of its own until the entry's catches up, so that it gets nothing twice and
//! nothing of an epoch its replay moved it past.

use std::collections::HashMap;
use std::sync::Arc;

use broker_bridge::{Epoch, Position};

use super::delivery::{Cursor, Step};
use super::wildcard::TopicCursors;

/// The topics where a live wildcard subscriber is ahead of its entry (usually none: an empty map,
/// which allocates nothing and is skipped without hashing).
#[derive(Default)]
pub(super) struct Ahead(HashMap<Arc<str>, AheadIn>);

/// Where the subscriber stands in one such topic.
struct AheadIn {
    cursor: Cursor,
    /// The entry's epoch when the subscriber went live, when it is not the cursor's: what still
    /// comes of it was published before the subscriber's replay was read, which is past it.
    stale: Option<Epoch>,
}

impl Ahead {
    /// The topics where `own` (the subscriber's cursors after its replay and held messages) is
    /// not where `entry`'s cursors are.
    pub(super) fn of(own: TopicCursors, entry: &TopicCursors) -> Self {
        let map: HashMap<Arc<str>, AheadIn> = own
            .into_iter()
            .filter_map(|(topic, cursor)| {
                let at = entry.get(&topic);
                if at == Some(&cursor) {
                    return None;
                }
                let stale = at
                    .map(Cursor::epoch)
                    .filter(|e| *e != cursor.epoch())
                    .cloned();
                Some((topic, AheadIn { cursor, stale }))
            })
            .collect();
        Ahead(map)
    }

    /// The subscriber's own step for a message of `topic` at `position`, or `None` when it
    /// follows the entry's. `entry`: the entry's cursors, moved past the message.
    pub(super) fn step(
        &mut self,
        topic: &str,
        position: Option<&Position>,
        entry: &TopicCursors,
    ) -> Option<Step> {
        let p = position?;
        if self.0.is_empty() {
            return None;
        }
        let own = self.0.get_mut(topic)?;
        let step = if own.stale.as_ref() == Some(&p.epoch) {
            Step::Skip
        } else {
            own.cursor.step(Some(p))
        };
        self.settle(topic, entry);
        Some(step)
    }

    /// Whether a gap signal of `topic` is news to the subscriber, or `None` when it follows the
    /// entry's answer (see [`Cursor::gap`]).
    pub(super) fn gap(
        &mut self,
        topic: &str,
        resume: &Position,
        raw_after: bool,
        entry: &TopicCursors,
    ) -> Option<bool> {
        if self.0.is_empty() {
            return None;
        }
        let own = self.0.get_mut(topic)?;
        let news = own.stale.as_ref() != Some(&resume.epoch) && own.cursor.gap(resume, raw_after);
        self.settle(topic, entry);
        Some(news)
    }

    /// Forgets `topic` once the entry's cursor stands where the subscriber's does.
    fn settle(&mut self, topic: &str, entry: &TopicCursors) {
        if self
            .0
            .get(topic)
            .is_some_and(|own| Some(&own.cursor) == entry.get(topic))
        {
            self.0.remove(topic);
            if self.0.is_empty() {
                // Frees the table: most subscribers never need one again.
                self.0 = HashMap::new();
            }
        }
    }
}
