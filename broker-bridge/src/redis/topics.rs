//! The topics this node wants delivered, and the one place that decides what of a topic reaches
//! the sink.
//!
//! Messages come from two places: the subscription connection (live, in order, but possibly
//! forged, duplicated after a reconnect, or with holes) and history reads that fill holes. Both go
//! through [`Topics`], under its lock, so each topic reaches the sink in offset order whichever task
//! delivers. A topic is either *live* (wire messages are checked and delivered) or *filling* (wire
//! messages are held back while a history read fills a hole; [`super::fill`]).
//!
//! What is checked on a wire message, in order:
//! * its tag, with the salt of its epoch (a raw publisher cannot make one);
//! * its offset against the last delivered: at or below is a duplicate, more than one above is a
//!   hole, which starts a fill instead of being delivered past.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::link::lock;
use super::scripts::Salt;
use super::wire::{self, Decoded, Rejected};
use crate::{
    BrokerObserver, EMPTY_EPOCH, Epoch, Lost, Message, MessageSink, Position, PrefixSet, Replay,
};

/// Messages a filling topic holds back at most before it gives up holding and reads them from
/// history instead.
const MAX_HELD: usize = 10_000;
/// Bytes a filling topic holds back at most.
const MAX_HELD_BYTES: usize = 16 << 20;

/// What the node knows about one wanted topic.
#[derive(Default)]
struct Track {
    /// Subscribed by name; otherwise only a subscribed prefix covers it (and it goes with it).
    exact: bool,
    /// The last gateway message delivered.
    last: Option<Position>,
    /// The topic's position as first read after subscribing: where delivery starts when nothing
    /// was delivered yet.
    hint: Option<Position>,
    /// The salt of an epoch, to check message tags with.
    salt: Option<(Epoch, Salt)>,
    /// Set while a history read fills a hole.
    fill: Option<Fill>,
}

/// Wire messages held back while a topic fills, and what happened meanwhile.
#[derive(Default)]
struct Fill {
    held: VecDeque<Decoded>,
    held_bytes: usize,
    /// Held messages were dropped (too many): the fill must read again from where it got to.
    overflowed: bool,
    /// A raw message (which history never has) was lost: subscribers are told of a gap.
    raw_lost: bool,
    /// Something happened after the fill's read began (a reconnect, a dropped push): read again.
    again: bool,
}

impl Fill {
    /// The lowest offset held back that comes after `from` in its epoch, if any.
    fn first_held_after(&self, from: &Position) -> Option<u64> {
        self.held
            .iter()
            .filter_map(|d| d.position.as_ref().map(|(p, _)| p))
            .filter(|p| p.epoch == from.epoch && p.offset > from.offset)
            .map(|p| p.offset)
            .min()
    }

    fn hold(&mut self, d: Decoded) {
        if self.held.len() >= MAX_HELD || self.held_bytes + d.data.len() > MAX_HELD_BYTES {
            self.raw_lost |= self.held.iter().any(|h| h.position.is_none()) || d.position.is_none();
            self.held.clear();
            self.held_bytes = 0;
            self.overflowed = true;
            return;
        }
        self.held_bytes += d.data.len();
        self.held.push_back(d);
    }
}

/// Where a fill reads from.
pub(super) enum FillFrom {
    /// The topic is no longer wanted: stop.
    Gone,
    /// After this position; `None`: nothing is known yet, only learn the position and salt.
    After(Option<Position>),
}

/// What handling a wire message asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Handled {
    /// Nothing more to do.
    Done,
    /// The topic started filling: run a fill for it.
    StartFill,
}

/// The most a fill hands the sink at once: `(messages, bytes)`. A larger hole would reach every
/// subscriber's send queue in one go and close them all as slow consumers; its subscribers get a
/// gap frame instead and read it themselves, paced, with a resume that history serves.
pub(super) type FillLimit = (usize, usize);

/// The wanted topics.
pub(super) struct Topics {
    map: Mutex<HashMap<Arc<str>, Track>>,
    /// Subscribed prefixes: a topic below one is tracked from its first message on.
    prefixes: PrefixSet,
    sink: Arc<dyn MessageSink>,
    observer: Arc<dyn BrokerObserver>,
    fill_limit: FillLimit,
}

impl Topics {
    pub(super) fn new(
        sink: Arc<dyn MessageSink>,
        observer: Arc<dyn BrokerObserver>,
        fill_limit: FillLimit,
    ) -> Self {
        Topics {
            map: Mutex::new(HashMap::new()),
            prefixes: PrefixSet::default(),
            sink,
            observer,
            fill_limit,
        }
    }

    /// Adds a topic (no-op when wanted already).
    pub(super) fn want(&self, topic: &str) {
        lock(&self.map).entry(topic.into()).or_default().exact = true;
    }

    /// Removes a topic, unless a subscribed prefix still covers it.
    pub(super) fn forget(&self, topic: &str) {
        let mut map = lock(&self.map);
        if self.prefixes.covers(topic) {
            if let Some(track) = map.get_mut(topic) {
                track.exact = false;
            }
        } else {
            map.remove(topic);
        }
    }

    /// Counts a subscription of `prefix`; true for its first (which the caller subscribes).
    pub(super) fn want_prefix(&self, prefix: &str) -> bool {
        // Under the map's lock, so `on_wire` never sees a half-added prefix.
        let _map = lock(&self.map);
        self.prefixes.add(prefix)
    }

    /// Counts a subscription of `prefix` less; true for its last (which the caller unsubscribes).
    /// The topics it alone covered are forgotten then.
    pub(super) fn forget_prefix(&self, prefix: &str) -> bool {
        let mut map = lock(&self.map);
        if !self.prefixes.remove(prefix) {
            return false;
        }
        map.retain(|topic, track| track.exact || self.prefixes.covers(topic));
        true
    }

    /// Every subscribed prefix.
    pub(super) fn prefixes(&self) -> Vec<String> {
        self.prefixes.all()
    }

    /// Whether the topic is wanted.
    pub(super) fn is_wanted(&self, topic: &str) -> bool {
        lock(&self.map).contains_key(topic)
    }

    /// The shared name of a wanted topic.
    pub(super) fn name(&self, topic: &str) -> Option<Arc<str>> {
        lock(&self.map).get_key_value(topic).map(|(k, _)| k.clone())
    }

    /// Every topic subscribed by name: the channels a new subscription connection subscribes
    /// (topics only a prefix covers come with the prefix's pattern).
    pub(super) fn exact(&self) -> Vec<Arc<str>> {
        lock(&self.map)
            .iter()
            .filter(|(_, t)| t.exact)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Remembers a freshly read position and salt of a wanted topic.
    ///
    /// The first position read after subscribing is kept (a later one only replaces it in a new
    /// epoch): a later read may come after messages that never arrived because the subscription
    /// connection broke unnoticed, and filling from there would skip them.
    pub(super) fn hint(&self, topic: &str, position: &Position, salt: &Salt) {
        let mut map = lock(&self.map);
        let Some(track) = map.get_mut(topic) else {
            return;
        };
        if track
            .hint
            .as_ref()
            .is_none_or(|h| h.epoch != position.epoch)
        {
            track.hint = Some(position.clone());
        }
        if !salt.is_empty() {
            track.salt = Some((position.epoch.clone(), salt.clone()));
        }
    }

    /// Puts every wanted topic into the filling state (a new subscription connection may have
    /// missed anything). Returns the topics whose fill must be started; those filling already
    /// read again when their current read is done.
    pub(super) fn fill_all(&self) -> Vec<Arc<str>> {
        let mut map = lock(&self.map);
        let mut start = Vec::new();
        for (topic, track) in map.iter_mut() {
            if Self::begin_fill(track) {
                start.push(topic.clone());
            }
        }
        start
    }

    /// Puts the wanted topics below any of `prefixes` into the filling state (a watch of theirs
    /// was lost, so they may have missed messages). Returns the topics whose fill must be started.
    pub(super) fn fill_below(&self, prefixes: &[String]) -> Vec<Arc<str>> {
        let mut map = lock(&self.map);
        let mut start = Vec::new();
        for (topic, track) in map.iter_mut() {
            let below = crate::strict_prefixes(topic).any(|p| prefixes.iter().any(|w| w == p));
            if below && Self::begin_fill(track) {
                start.push(topic.clone());
            }
        }
        start
    }

    /// Puts one topic into the filling state; `raw_lost` records that a raw message of it was
    /// dropped. Returns whether a fill must be started.
    pub(super) fn fill_one(&self, topic: &str, raw_lost: bool) -> bool {
        let mut map = lock(&self.map);
        let Some(track) = map.get_mut(topic) else {
            return false;
        };
        let start = Self::begin_fill(track);
        if let Some(fill) = &mut track.fill {
            fill.raw_lost |= raw_lost;
        }
        start
    }

    fn begin_fill(track: &mut Track) -> bool {
        match &mut track.fill {
            Some(fill) => {
                fill.again = true;
                false
            }
            None => {
                track.fill = Some(Fill::default());
                true
            }
        }
    }

    /// Handles one payload from the subscription connection.
    pub(super) fn on_wire(&self, topic: &str, payload: Bytes) -> Handled {
        let decoded = match wire::decode(payload) {
            Ok(d) => d,
            Err(rejected) => {
                self.reject(topic, rejected);
                return Handled::Done;
            }
        };
        let mut map = lock(&self.map);
        if !map.contains_key(topic) && self.prefixes.covers(topic) {
            // The first message of a topic below a subscribed prefix: tracked from now on. Its
            // salt is unknown, so it is checked against history before anything is delivered.
            map.insert(topic.into(), Track::default());
        }
        let Some((name, track)) = entry(&mut map, topic) else {
            return Handled::Done;
        };
        if let Some(fill) = &mut track.fill {
            fill.hold(decoded);
            return Handled::Done;
        }
        match self.apply(&name, track, decoded, false) {
            Applied::Done => Handled::Done,
            Applied::Hole(d) => {
                let mut fill = Fill::default();
                fill.hold(d);
                track.fill = Some(fill);
                Handled::StartFill
            }
        }
    }

    /// Where the fill of `topic` reads from.
    pub(super) fn fill_from(&self, topic: &str) -> FillFrom {
        match lock(&self.map).get(topic) {
            None => FillFrom::Gone,
            Some(t) => FillFrom::After(t.last.clone().or_else(|| t.hint.clone())),
        }
    }

    /// Applies a history read made for a fill from `from`: delivers what it holds, signals what
    /// is lost, then releases the held messages. Returns `false` when the fill must read again.
    pub(super) fn fill_read(
        &self,
        topic: &str,
        from: Option<&Position>,
        replay: Replay,
        salt: Salt,
    ) -> bool {
        let mut map = lock(&self.map);
        let Some((name, track)) = entry(&mut map, topic) else {
            return true;
        };
        if !salt.is_empty() {
            track.salt = Some((replay.position.epoch.clone(), salt));
        }
        // A read made without a start (`from` is `None`) only learns the salt. Its position is not
        // a hint: a subscriber's own ack may have read an earlier one, and the held messages in
        // between are exactly what it needs.
        let mut read_again = false;
        let bytes: usize = replay.messages.iter().map(|m| m.data.len()).sum();
        if replay.complete
            && (replay.messages.len() > self.fill_limit.0 || bytes > self.fill_limit.1)
        {
            // History holds the hole, but it is too big to push into every subscriber's queue at
            // once: they are told, and each resumes from history at its own pace.
            tracing::info!(
                topic = %name,
                messages = replay.messages.len(),
                bytes,
                "a filled gap is too large to push; subscribers resume it from history"
            );
            self.sink.gap(&name, &replay.position, Lost::Offsets);
            track.last = Some(replay.position.clone());
        } else if replay.complete {
            for m in replay.messages {
                if let Some(p) = &m.position
                    && Self::is_new(track.last.as_ref(), p)
                {
                    track.last = Some(p.clone());
                    self.sink.deliver(m);
                }
            }
        } else if let Some(from) = from
            && replay.position != *from
        {
            if replay.position.epoch != from.epoch {
                // A new epoch (Redis rolled back or lost the topic): what was after `from` is
                // gone, but the new epoch's messages may all be in history: read them next.
                let start = Position {
                    epoch: replay.position.epoch.clone(),
                    offset: 0,
                };
                if from.epoch.as_str() == EMPTY_EPOCH && from.offset == 0 {
                    // Subscribed before the topic existed: nothing came before its first epoch
                    // (with history on, the read returns that epoch from its first message).
                    track.last = Some(start);
                } else {
                    self.lost(&name, track, &start, from);
                }
                read_again = replay.position.offset > 0;
            } else {
                // Lost is only what comes before the first message held back: that one and the
                // ones after it are here (with history off, a read never returns any).
                let now = match track.fill.as_ref().and_then(|f| f.first_held_after(from)) {
                    Some(first) if first <= replay.position.offset => Position {
                        epoch: from.epoch.clone(),
                        offset: first - 1,
                    },
                    _ => replay.position.clone(),
                };
                if now.offset > from.offset {
                    self.lost(&name, track, &now, from);
                }
            }
        }
        let Some(mut fill) = track.fill.take() else {
            return true;
        };
        if fill.raw_lost {
            let at = track
                .last
                .clone()
                .unwrap_or_else(|| replay.position.clone());
            tracing::warn!(topic = %name, "raw messages were dropped; subscribers are told of a gap");
            self.observer.gap(1);
            self.sink.gap(&name, &at, Lost::Raw);
            fill.raw_lost = false;
        }
        if fill.overflowed || fill.again || read_again {
            // Held messages stay held: the next read delivers what is before them.
            fill.overflowed = false;
            fill.again = false;
            track.fill = Some(fill);
            return false;
        }
        while let Some(d) = fill.held.pop_front() {
            if let Applied::Hole(d) = self.apply(&name, track, d, true) {
                // Still a hole after a fill: read again, holding what is left.
                fill.held.push_front(d);
                fill.held_bytes = fill.held.iter().map(|d| d.data.len()).sum();
                track.fill = Some(fill);
                return false;
            }
        }
        true
    }

    /// Records that messages between `from` and `now` are lost for good, and tells the sink.
    fn lost(&self, name: &Arc<str>, track: &mut Track, now: &Position, from: &Position) {
        tracing::warn!(
            topic = %name,
            from_epoch = %from.epoch,
            from = from.offset,
            epoch = %now.epoch,
            now = now.offset,
            "messages were lost (history cannot fill the gap); subscribers are told"
        );
        self.observer.gap(1);
        self.sink.gap(name, now, Lost::Offsets);
        track.last = Some(now.clone());
    }

    /// Checks and delivers one message of a live topic. `after_fill`: the salt of the current
    /// epoch was just read, so a message of an epoch without a known salt is stale or forged.
    fn apply(&self, name: &Arc<str>, track: &mut Track, d: Decoded, after_fill: bool) -> Applied {
        let Some((position, tag)) = &d.position else {
            self.sink.deliver(Message {
                topic: name.clone(),
                position: None,
                data: d.data,
            });
            return Applied::Done;
        };
        match (&track.salt, tag) {
            (Some((epoch, salt)), Some(tag)) if *epoch == position.epoch => {
                if wire::tag(salt, position.offset, &d.data) != *tag {
                    self.reject(name, Rejected::Forged);
                    return Applied::Done;
                }
            }
            (_, None) if after_fill => {
                // History was read after it and did not vouch for it.
                self.reject(name, Rejected::Header);
                return Applied::Done;
            }
            _ if after_fill => {
                // Not the epoch history has now: a message of a replaced epoch, or a forgery.
                self.reject(name, Rejected::Forged);
                return Applied::Done;
            }
            // An epoch whose salt is unknown, or an untagged message (from a pubgate older than
            // tags, during a rolling upgrade): history says what it really holds.
            _ => return Applied::Hole(d),
        }
        let base = track.last.as_ref().or(track.hint.as_ref());
        if let Some(base) = base
            && base.epoch == position.epoch
        {
            if position.offset <= base.offset {
                return Applied::Done;
            }
            if position.offset > base.offset + 1 {
                return Applied::Hole(d);
            }
        }
        track.last = Some(position.clone());
        let position = position.clone();
        self.sink.deliver(Message {
            topic: name.clone(),
            position: Some(position),
            data: d.data,
        });
        Applied::Done
    }

    fn is_new(last: Option<&Position>, p: &Position) -> bool {
        last.is_none_or(|l| l.epoch != p.epoch || p.offset > l.offset)
    }

    fn reject(&self, topic: &str, why: Rejected) {
        self.observer.rejected(why.as_str());
        tracing::debug!(topic, reason = %why, "message from Redis rejected");
    }
}

/// A wanted topic's shared name and its track.
fn entry<'a>(
    map: &'a mut HashMap<Arc<str>, Track>,
    topic: &str,
) -> Option<(Arc<str>, &'a mut Track)> {
    let name = map.get_key_value(topic)?.0.clone();
    Some((name, map.get_mut(topic)?))
}

/// What checking a live message came to.
enum Applied {
    /// Delivered, or dropped (duplicate, forged).
    Done,
    /// A hole before it, or an epoch whose salt is unknown: fill first.
    Hole(Decoded),
}

#[cfg(test)]
#[path = "topics_tests.rs"]
mod tests;
