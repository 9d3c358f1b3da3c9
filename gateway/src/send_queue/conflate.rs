//! Conflation: frames that may replace each other, kept one per key while the connection is behind.
//!
//! A conflating frame (a message of a `conflate` namespace) that arrives while the queue still
//! holds frames, or while the writer is busy, waits in a slot of its key (its topic, and the value
//! of the namespace's `conflate_key` in `data`) instead of the queue. A newer frame of the same key
//! replaces it, and takes its place at the end: slots stay in the order their frames were
//! published, so a topic's offsets only grow (the client sees them jump where values were skipped)
//! and a subscriber that reads slowly ends on the latest value of each key, with memory bounded by
//! the number of keys. Slots are written after the queued frames; a frame of any other kind moves
//! them into the queue first, so nothing overtakes them.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

/// The conflating frames waiting for the writer, one per key, oldest first.
#[derive(Debug, Default)]
pub(super) struct Slots {
    /// `(key, frame)` in publish order; `None` where a newer frame of the key replaced it.
    entries: VecDeque<Option<(Bytes, Bytes)>>,
    /// Where each key's frame is: its sequence number (`entries[seq - base]`).
    index: HashMap<Bytes, u64>,
    /// The sequence number of `entries[0]`.
    base: u64,
}

impl Slots {
    /// How many frames wait.
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing waits.
    pub(super) fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether `key` has a frame waiting.
    pub(super) fn contains(&self, key: &Bytes) -> bool {
        self.index.contains_key(key)
    }

    /// Puts `frame` in the slot of `key`, at the end. Returns the frame it replaced, or `None`
    /// when the key had none.
    pub(super) fn put(&mut self, key: &Bytes, frame: Bytes) -> Option<Bytes> {
        let seq = self.base + self.entries.len() as u64;
        let old = match self.index.insert(key.clone(), seq) {
            Some(at) => self.entries[(at - self.base) as usize]
                .take()
                .map(|(_, f)| f),
            None => None,
        };
        self.entries.push_back(Some((key.clone(), frame)));
        self.compact();
        old
    }

    /// Drops the holes left by replaced frames once they outnumber the frames, so a connection
    /// that stays behind for long holds at most about twice as many entries as keys.
    fn compact(&mut self) {
        if self.entries.len() <= 2 * self.index.len() + 16 {
            return;
        }
        self.entries.retain(Option::is_some);
        self.base = 0;
        for (seq, entry) in self.entries.iter().enumerate() {
            if let Some((key, _)) = entry {
                self.index.insert(key.clone(), seq as u64);
            }
        }
    }

    /// Moves every waiting frame to the end of `queue`, in order.
    pub(super) fn drain_into(&mut self, queue: &mut VecDeque<Bytes>) {
        if self.index.is_empty() {
            return;
        }
        queue.extend(self.entries.drain(..).flatten().map(|(_, frame)| frame));
        self.index.clear();
        self.base = 0;
    }

    /// Drops every waiting frame.
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
        self.base = 0;
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
        assert_eq!(slots.put(&b("b"), b("b1")), None);
        assert_eq!(slots.put(&b("a"), b("a2")), Some(b("a1")));
        for i in 3..1000 {
            assert!(slots.put(&b("a"), b(&format!("a{i}"))).is_some());
            assert!(slots.entries.len() <= 2 * slots.len() + 17);
        }
        assert_eq!(slots.len(), 2);
        let mut out = VecDeque::new();
        slots.drain_into(&mut out);
        assert_eq!(Vec::from(out), [b("b1"), b("a999")]);
        assert!(slots.is_empty());
    }
}
