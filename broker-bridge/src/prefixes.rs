//! Prefix subscriptions: the topics below a prefix, as wildcard subscriptions need them.
//!
//! A wildcard subscription (`scores.*`, `scores.>`) is served by subscribing its literal prefix
//! (`scores`) in the broker, which then delivers every topic below it; the gateway picks out the
//! topics each pattern matches. A prefix names whole levels, so `scores` covers `scores.nba` but not
//! `scoresheet`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The strict prefixes of a topic, shortest first: `""`, `"a"`, `"a.b"` for `"a.b.c"`. These are
/// the prefixes whose subscriptions cover the topic.
pub fn strict_prefixes(topic: &str) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(topic.match_indices('.').map(move |(i, _)| &topic[..i]))
}

/// A counted set of subscribed prefixes, cheap to ask when empty.
#[derive(Default)]
pub struct PrefixSet {
    map: Mutex<HashMap<String, usize>>,
    /// How many distinct prefixes are subscribed: lets [`PrefixSet::covers`] skip the lock on the
    /// publish path of a node without wildcard subscriptions.
    len: AtomicUsize,
}

impl PrefixSet {
    /// Counts one more subscription of `prefix`; true when it is the first.
    pub fn add(&self, prefix: &str) -> bool {
        let mut map = self.lock();
        let n = map.entry(prefix.to_string()).or_default();
        *n += 1;
        let first = *n == 1;
        self.len.store(map.len(), Ordering::Release);
        first
    }

    /// Counts one subscription of `prefix` less; true when it was the last.
    pub fn remove(&self, prefix: &str) -> bool {
        let mut map = self.lock();
        let Some(n) = map.get_mut(prefix) else {
            return false;
        };
        *n -= 1;
        let last = *n == 0;
        if last {
            map.remove(prefix);
        }
        self.len.store(map.len(), Ordering::Release);
        last
    }

    /// Whether a subscribed prefix covers `topic`.
    pub fn covers(&self, topic: &str) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let map = self.lock();
        strict_prefixes(topic).any(|p| map.contains_key(p))
    }

    /// The length of the shortest subscribed prefix that covers `topic` (the prefix is
    /// `&topic[..len]`), if any.
    pub fn shortest_covering(&self, topic: &str) -> Option<usize> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let map = self.lock();
        strict_prefixes(topic)
            .find(|p| map.contains_key(*p))
            .map(str::len)
    }

    /// Forgets every prefix.
    pub fn clear(&self) {
        let mut map = self.lock();
        map.clear();
        self.len.store(0, Ordering::Release);
    }

    /// The subscribed prefixes.
    pub fn all(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_prefixes_are_whole_levels() {
        assert_eq!(strict_prefixes("a").collect::<Vec<_>>(), [""]);
        assert_eq!(
            strict_prefixes("a.b.c").collect::<Vec<_>>(),
            ["", "a", "a.b"]
        );
    }

    #[test]
    fn the_set_counts_and_covers_by_level() {
        let set = PrefixSet::default();
        assert!(!set.covers("scores.nba"));
        assert!(set.add("scores"));
        assert!(!set.add("scores"));
        assert!(set.covers("scores.nba"));
        assert!(set.covers("scores.nba.live"));
        assert!(!set.covers("scores"));
        assert!(!set.covers("scoresheet.x"));
        assert!(!set.remove("scores"));
        assert!(set.covers("scores.nba"));
        assert!(set.remove("scores"));
        assert!(!set.covers("scores.nba"));
        assert!(!set.remove("scores"));
        assert!(set.add(""));
        assert!(set.covers("anything"));
        assert!(set.add("a.b"));
        assert_eq!(set.shortest_covering("a.b.c"), Some(0));
        assert!(set.remove(""));
        assert_eq!(set.shortest_covering("a.b.c"), Some(3));
        assert_eq!(set.shortest_covering("a.bc"), None);
    }
}
