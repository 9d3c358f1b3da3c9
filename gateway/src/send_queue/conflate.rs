//! Conflation: frames that may replace each other, kept one per key while the connection is behind.
//!
//! While a connection is behind (frames queued, or its writer busy), a conflating frame (a message
//! of a `conflate` namespace) goes to the *tail*: an ordered list behind the queue where a newer
//! frame of the same key (its topic, and the value of the namespace's `conflate_key` in `data`)
//! replaces the waiting one and takes its place at the end. Every other frame pushed meanwhile
//! (replies, gap frames, messages of other namespaces) joins the tail too, unkeyed, so nothing
//! overtakes anything and the waiting keyed frames stay replaceable: a topic's offsets only grow
//! (the client sees them jump where values were skipped) and a subscriber that reads slowly ends on
//! the latest value of each key. The tail moves into the queue when the queue has been written.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// The frames behind the queue while the connection is behind, in push order.
#[derive(Debug, Default)]
pub(super) struct Slots {
    /// `(key, frame)`; `None` where a newer frame of the key replaced it.
    entries: VecDeque<Option<(Option<Bytes>, Bytes)>>,
    /// Where each key's frame is: its sequence number (`entries[seq - base]`).
    index: HashMap<Bytes, u64>,
    /// The sequence number of `entries[0]`.
    base: u64,
    /// Entries that hold a frame.
    live: usize,
}

/// Capacity kept after the tail drains; more is given back (a connection that was far behind
/// once should not hold its peak for its whole life).
const KEEP_CAPACITY: usize = 64;

impl Slots {
    /// How many frames wait.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The size of the frame waiting for `key`, if one does.
    pub(super) fn waiting(&self, key: &Bytes) -> Option<usize> {
        let at = *self.index.get(key)?;
        self.entries[(at - self.base) as usize]
            .as_ref()
            .map(|(_, f)| f.len())
    }

    /// Puts `frame` at the end under `key`, replacing the key's waiting frame, which is returned.
    pub(super) fn put(&mut self, key: &Bytes, frame: Bytes) -> Option<Bytes> {
        let seq = self.base + self.entries.len() as u64;
        let old = match self.index.insert(key.clone(), seq) {
            Some(at) => self.entries[(at - self.base) as usize]
                .take()
                .map(|(_, f)| f),
            None => None,
        };
        if old.is_none() {
            self.live += 1;
        }
        self.entries.push_back(Some((Some(key.clone()), frame)));
        self.compact();
        old
    }

    /// Puts a frame that replaces nothing at the end.
    pub(super) fn push(&mut self, frame: Bytes) {
        self.entries.push_back(Some((None, frame)));
        self.live += 1;
    }

    /// Drops the oldest waiting frame (for `drop_oldest`), returning it.
    pub(super) fn pop_oldest(&mut self) -> Option<Bytes> {
        while let Some(entry) = self.entries.pop_front() {
            self.base += 1;
            if let Some((key, frame)) = entry {
                if let Some(key) = key {
                    self.index.remove(&key);
                }
                self.live -= 1;
                return Some(frame);
            }
        }
        None
    }

    /// Drops the holes left by replaced frames once they outnumber the frames, so a connection
    /// that stays behind for long holds at most about twice as many entries as frames.
    fn compact(&mut self) {
        if self.entries.len() <= 2 * self.live + 16 {
            return;
        }
        self.entries.retain(Option::is_some);
        self.base = 0;
        for (seq, entry) in self.entries.iter().enumerate() {
            if let Some((Some(key), _)) = entry {
                self.index.insert(key.clone(), seq as u64);
            }
        }
    }

    /// Moves every waiting frame to the end of `queue`, in order.
    pub(super) fn drain_into(&mut self, queue: &mut VecDeque<Bytes>) {
        if self.entries.is_empty() {
            return;
        }
        queue.extend(self.entries.drain(..).flatten().map(|(_, frame)| frame));
        self.clear();
    }

    /// Drops every waiting frame.
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
        self.base = 0;
        self.live = 0;
        if self.entries.capacity() > KEEP_CAPACITY {
            self.entries.shrink_to(KEEP_CAPACITY);
        }
        if self.index.capacity() > KEEP_CAPACITY {
            self.index.shrink_to(KEEP_CAPACITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn a_replaced_frame_moves_to_the_end_and_holes_are_compacted() {
        let mut slots = Slots::default();
        assert_eq!(slots.put(&b("a"), b("a1")), None);
        slots.push(b("pong"));
        assert_eq!(slots.put(&b("b"), b("b1")), None);
        assert_eq!(slots.put(&b("a"), b("a2")), Some(b("a1")));
        for i in 3..1000 {
            assert!(slots.put(&b("a"), b(&format!("a{i}"))).is_some());
            assert!(slots.entries.len() <= 2 * slots.len() + 17);
        }
        assert_eq!(slots.len(), 3);
        assert_eq!(slots.waiting(&b("a")), Some(4));
        let mut out = VecDeque::new();
        slots.drain_into(&mut out);
        assert_eq!(Vec::from(out), [b("pong"), b("b1"), b("a999")]);
        assert!(slots.is_empty());
    }

    #[test]
    fn the_oldest_frame_goes_first() {
        let mut slots = Slots::default();
        slots.put(&b("a"), b("a1"));
        slots.push(b("x"));
        slots.put(&b("a"), b("a2"));
        assert_eq!(slots.pop_oldest(), Some(b("x")));
        assert_eq!(slots.pop_oldest(), Some(b("a2")));
        assert_eq!(slots.pop_oldest(), None);
        assert_eq!(slots.waiting(&b("a")), None);
    }
}
