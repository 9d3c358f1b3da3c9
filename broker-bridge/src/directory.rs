//! What a wildcard resume asks a broker: which topics below a prefix changed since a moment, and
//! where a topic's messages since that moment start.
//!
//! A client resuming `scores.*` knows the topics it saw; the ones that appeared while it was away
//! it cannot name. The broker keeps a directory of recently published topics (their last publish
//! time, on the broker's own clock) so the node can find them, and history entries carry that
//! time so the node knows where each unseen topic's missed messages start.

use std::sync::Arc;

use crate::{Offset, Position};

/// Topics a directory lists for one resume at most; past it the resume is not served
/// ([`Directory::Unknown`]): the client reloads, which is cheaper than replaying that many topics.
pub const MAX_DIRECTORY_TOPICS: usize = 10_000;

/// The answer of [`crate::Broker::directory`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Directory {
    /// Every topic below the prefix published to since the moment asked (maybe a few more: the
    /// caller filters by its pattern, and a listed topic may have nothing to replay).
    Topics(Vec<Arc<str>>),
    /// The broker cannot list them all; the reason, for logs.
    Unknown(&'static str),
}

/// The answer of [`crate::Broker::seek`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seek {
    /// The topic's position when it was read.
    pub position: Position,
    /// Messages after this offset (in `position.epoch`) are stamped at or after the moment.
    pub after: Offset,
    /// Whether history holds every message from `after + 1` on, so a replay from there misses
    /// nothing the client never got. False when history was trimmed or expired past the moment,
    /// holds no messages at all, or more than the `max` asked were published since.
    pub covered: bool,
}

/// The wall clock in ms since the Unix epoch (the memory broker's clock).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Finds where messages stamped at or after `since_ms` start in `held` (a topic's history from
/// oldest to newest as `(offset, stamp)`), looking at most `max` messages back from the newest.
pub(crate) fn seek_in(
    position: Position,
    held: impl DoubleEndedIterator<Item = (Offset, u64)>,
    since_ms: u64,
    max: u64,
) -> Seek {
    let last = position.offset;
    let mut seen = 0;
    let found = |after: Offset, covered: bool| Seek {
        position: position.clone(),
        after,
        covered,
    };
    if last == 0 {
        // Listed by the directory yet holding nothing: whatever was published is gone.
        return found(0, false);
    }
    for (offset, stamp) in held.rev() {
        if stamp < since_ms {
            return found(offset, true);
        }
        if offset == 1 {
            // The whole epoch was published since the moment, and history holds all of it.
            return found(0, true);
        }
        seen += 1;
        if seen >= max {
            break;
        }
    }
    found(last, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Epoch;

    fn at(offset: Offset) -> Position {
        Position {
            epoch: Epoch::new("e"),
            offset,
        }
    }

    #[test]
    fn seek_finds_the_first_message_at_or_after_the_moment() {
        let held = [(3, 10), (4, 20), (5, 30), (6, 30)];
        let s = seek_in(at(6), held.into_iter(), 30, 100);
        assert_eq!((s.after, s.covered), (4, true));
        let s = seek_in(at(6), held.into_iter(), 31, 100);
        assert_eq!((s.after, s.covered), (6, true), "nothing since");
        // Offsets 1 and 2 are gone and may have been stamped after 5.
        let s = seek_in(at(6), held.into_iter(), 5, 100);
        assert_eq!((s.after, s.covered), (6, false));
        // The whole epoch is held.
        let held = [(1, 10), (2, 20)];
        let s = seek_in(at(2), held.into_iter(), 5, 100);
        assert_eq!((s.after, s.covered), (0, true));
        // More than `max` since.
        let s = seek_in(at(2), held.into_iter(), 5, 1);
        assert!(!s.covered);
        // Nothing held at all.
        let s = seek_in(at(0), std::iter::empty(), 5, 100);
        assert!(!s.covered);
        let s = seek_in(at(9), std::iter::empty(), 5, 100);
        assert!(!s.covered);
    }
}
