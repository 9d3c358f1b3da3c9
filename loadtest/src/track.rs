//! Per-subscriber ordering check: which offsets (or sequence numbers) arrived, which are missing,
//! which came twice or late.
//!
//! The common case — the next offset — is one compare and one store. Offsets skipped by a jump are
//! remembered as holes (a sorted list, bounded) so a late arrival can be told from a duplicate.

/// Holes remembered per subscriber at most; past that, skipped offsets are counted as missing but a
/// late arrival for one of them counts as a duplicate.
const MAX_HOLES: usize = 4096;

/// How one arrival relates to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next one expected.
    InOrder,
    /// Arrived after a jump that skipped this many.
    Gap(u64),
    /// Arrived after a later one, filling a hole (out of order).
    Late,
    /// Already seen (or at or below the starting point).
    Duplicate,
}

/// Tracks one subscriber's stream of offsets.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// The highest offset seen (initially the subscribe ack's offset).
    last: u64,
    /// Missing offsets below `last`, ascending.
    holes: Vec<u64>,
    /// Missing offsets that did not fit in `holes`.
    untracked: u64,
    /// Arrivals seen, in total.
    pub received: u64,
    /// Duplicates seen.
    pub duplicates: u64,
    /// Late (out-of-order) arrivals.
    pub late: u64,
}

impl Tracker {
    /// Starts after `start` (the ack's offset: the first message expected is `start + 1`).
    pub fn new(start: u64) -> Self {
        Tracker {
            last: start,
            holes: Vec::new(),
            untracked: 0,
            received: 0,
            duplicates: 0,
            late: 0,
        }
    }

    /// The highest offset seen so far.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Records one arrival.
    #[inline]
    pub fn observe(&mut self, offset: u64) -> Seen {
        self.received += 1;
        if offset == self.last + 1 {
            self.last = offset;
            return Seen::InOrder;
        }
        if offset > self.last {
            let skipped = offset - self.last - 1;
            let room = MAX_HOLES.saturating_sub(self.holes.len()) as u64;
            let keep = skipped.min(room);
            self.holes.extend(self.last + 1..self.last + 1 + keep);
            self.untracked += skipped - keep;
            self.last = offset;
            return Seen::Gap(skipped);
        }
        match self.holes.binary_search(&offset) {
            Ok(i) => {
                self.holes.remove(i);
                self.late += 1;
                Seen::Late
            }
            Err(_) => {
                self.duplicates += 1;
                Seen::Duplicate
            }
        }
    }

    /// Offsets up to `final_offset` that never arrived.
    pub fn missing(&self, final_offset: u64) -> u64 {
        self.holes.len() as u64 + self.untracked + final_offset.saturating_sub(self.last)
    }

    /// Offsets skipped so far (holes not filled, below the last one seen).
    pub fn holes(&self) -> u64 {
        self.holes.len() as u64 + self.untracked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_nothing_missing() {
        let mut t = Tracker::new(10);
        for o in 11..=20 {
            assert_eq!(t.observe(o), Seen::InOrder);
        }
        assert_eq!(t.missing(20), 0);
        assert_eq!(t.missing(25), 5);
        assert_eq!((t.received, t.duplicates, t.late), (10, 0, 0));
    }

    #[test]
    fn gaps_late_and_duplicates() {
        let mut t = Tracker::new(0);
        assert_eq!(t.observe(1), Seen::InOrder);
        assert_eq!(t.observe(4), Seen::Gap(2));
        assert_eq!(t.holes(), 2);
        assert_eq!(t.observe(3), Seen::Late);
        assert_eq!(t.observe(3), Seen::Duplicate);
        assert_eq!(t.observe(4), Seen::Duplicate);
        assert_eq!(t.observe(1), Seen::Duplicate);
        assert_eq!(t.observe(0), Seen::Duplicate);
        assert_eq!(t.observe(5), Seen::InOrder);
        assert_eq!(t.missing(5), 1); // offset 2 never came
        assert_eq!((t.received, t.duplicates, t.late), (8, 4, 1));
    }

    #[test]
    fn huge_gap_is_bounded() {
        let mut t = Tracker::new(0);
        assert_eq!(t.observe(1_000_001), Seen::Gap(1_000_000));
        assert_eq!(t.holes.len(), MAX_HOLES);
        assert_eq!(t.missing(1_000_001), 1_000_000);
        // A late arrival for a remembered hole is late; one past the remembered ones is counted as
        // a duplicate (documented limit).
        assert_eq!(t.observe(1), Seen::Late);
        assert_eq!(t.missing(1_000_001), 999_999);
    }
}
