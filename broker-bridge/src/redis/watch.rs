//! Wildcard subscriptions on Redis Cluster: the per-slot *watch sets*.
//!
//! Sharded pub/sub has no pattern form, and subscribing every topic's shard channel to find the
//! ones below a prefix would bring a node every message of the cluster. Instead, publishers are
//! told which prefixes someone watches:
//!
//! * Every hash slot `s` has one small ZSET `{prefix}~watch:{TAG_s}` (`TAG_s` is a short string
//!   whose CRC16 slot is `s`; [`SlotTags`]): member = the literal prefix of a watched wildcard
//!   (`""` for root patterns), score = when the watch's lease ends, in that Redis node's own time
//!   (ms). A node that starts watching a prefix writes it into all 16,384 keys before it
//!   acknowledges the wildcard, and renews the leases of all its prefixes every
//!   [`RedisConfig::watch_refresh`](super::RedisConfig) (one command per slot carrying all of
//!   them), which also trims expired members.
//! * The publish script, which may only touch keys of its topic's slot, checks the topic's strict
//!   prefixes in that slot's set and, when one is live, also `PUBLISH`es (classic, broadcast on the
//!   cluster bus) the same message on `{prefix}~w:<topic>`, which nodes `PSUBSCRIBE` per prefix.
//!   Only watched topics cost a broadcast; a node receives only the topics below its prefixes.
//!
//! A watch lost in some slot (a master restarted without data, a failover to a replica that never
//! had it, an operator's `DEL`) shows at the next renewal: a member the node had written comes back
//! as *added*. A master that lost its data is usually noticed sooner: every second the node probes
//! a spread of 64 slots' sets, and renews at once when its watch is missing from one. The node then fills the topics it tracks below that prefix from history (a gap
//! frame where history cannot), as after a reconnect; so does a node whose renewals failed until a
//! lease ran out. Unwatching never removes a member (another node may watch the same prefix): it
//! just stops being renewed and expires.
//!
//! Writing a prefix costs 16,384 commands, and a written prefix stays in every slot for a lease, so
//! a client churning through made-up prefixes must not make a node write without end: a prefix whose
//! lease from this node is still long enough is watched again without writing, writes are one at a
//! time per node, and at most [`RedisConfig::watch_limit`](super::RedisConfig) distinct prefixes
//! may hold a lease from this node at once (past that a new one is refused until leases end).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use redis::Script;

use super::link::lock;
use super::{Inner, fill};
use crate::BrokerError;

/// Hash slots in a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// Slot commands in flight at once while writing every slot's watch set.
const IN_FLIGHT: usize = 256;

/// The CRC16 (XMODEM) Redis Cluster hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a hash tag (the text between `{` and `}` of a key name).
pub fn slot_of(tag: &str) -> usize {
    usize::from(crc16(tag.as_bytes())) % SLOTS
}

/// One short hash tag per slot: `tags[s]` hashes to slot `s`. Found once, by counting in base 36
/// until every slot has one (about 150,000 strings of at most four characters).
pub struct SlotTags {
    tags: Vec<String>,
}

impl SlotTags {
    /// Computes the table.
    pub fn new() -> Self {
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut tags: Vec<Option<String>> = vec![None; SLOTS];
        let mut missing = SLOTS;
        let mut n: u64 = 0;
        while missing > 0 {
            let mut s = Vec::with_capacity(4);
            let mut k = n;
            loop {
                s.push(DIGITS[(k % 36) as usize]);
                k /= 36;
                if k == 0 {
                    break;
                }
            }
            let slot = usize::from(crc16(&s)) % SLOTS;
            if tags[slot].is_none() {
                tags[slot] = Some(String::from_utf8_lossy(&s).into_owned());
                missing -= 1;
            }
            n += 1;
        }
        SlotTags {
            tags: tags.into_iter().map(Option::unwrap_or_default).collect(),
        }
    }

    /// The tag of slot `slot`.
    pub fn tag(&self, slot: usize) -> &str {
        &self.tags[slot % SLOTS]
    }
}

impl Default for SlotTags {
    fn default() -> Self {
        Self::new()
    }
}

/// Renews (or adds) prefixes in one slot's watch set, in that node's own clock: trims expired
/// members first, so a member that lapsed counts as added again. `KEYS[1]` the watch key,
/// `ARGV[1]` the lease in ms, `ARGV[2..]` the prefixes. Returns how many were added.
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local until_ms = now + tonumber(ARGV[1])
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = until_ms
  args[#args + 1] = ARGV[i]
end
local added = redis.call('ZADD', KEYS[1], 'GT', unpack(args))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return added
"#;

/// The node's watches: what it has written, and the script that writes them.
pub(super) struct Watches {
    tags: SlotTags,
    renew: Script,
    /// Prefixes written into every slot (and so renewed by the refresh task).
    written: Mutex<HashSet<String>>,
    /// When each prefix this node wrote stops being watched unless renewed, by the node's clock
    /// (from the start of the write: never later than Redis's lease end).
    leased: Mutex<HashMap<String, Instant>>,
    /// New prefixes waiting for their first write. Whoever gets `writing` next writes all of
    /// them in one pass over the slots, so wildcards that arrive together wait for one pass, not
    /// for one pass each.
    pending: Mutex<HashSet<String>>,
    /// Held while writing, so a refresh and a new prefix's first write do not interleave with a
    /// rewrite after a reconnect.
    writing: tokio::sync::Mutex<()>,
}

impl Watches {
    pub(super) fn new() -> Self {
        Watches {
            tags: SlotTags::new(),
            renew: Script::new(RENEW),
            written: Mutex::default(),
            leased: Mutex::default(),
            pending: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// The tag table.
    pub(super) fn tags(&self) -> &SlotTags {
        &self.tags
    }

    /// Whether `prefix` was written into every slot (and is being renewed).
    pub(super) fn is_written(&self, prefix: &str) -> bool {
        lock(&self.written).contains(prefix)
    }

    /// Forgets a prefix: it is no longer renewed (its members expire with their lease).
    pub(super) fn forget(&self, prefix: &str) {
        lock(&self.written).remove(prefix);
    }
}

impl Inner {
    /// Writes `prefixes` into every slot's watch set; returns, per slot, how many were added
    /// (members that were missing). All slots, a bounded number in flight; fails when any slot
    /// fails, within the command timeout per slot.
    async fn write_watches(&self, prefixes: &[String]) -> Result<Vec<u64>, BrokerError> {
        if prefixes.is_empty() {
            return Ok(Vec::new());
        }
        let lease = self.config.watch_lease.as_millis() as u64;
        let watches = &self.watches;
        let writes = (0..SLOTS).map(|slot| {
            let key = self.names.watch_key(watches.tags.tag(slot));
            async move {
                self.with_cmd(|mut c| async move {
                    let mut inv = watches.renew.prepare_invoke();
                    inv.key(&key).arg(lease);
                    for p in prefixes {
                        inv.arg(p);
                    }
                    c.eval::<u64>(&inv).await
                })
                .await
            }
        });
        futures_util::stream::iter(writes)
            .buffered(IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Starts watching `prefix`: writes it into every slot before the wildcard is acknowledged.
    /// Prefixes asked for while a write is under way are written together by the next one.
    pub(super) async fn watch(&self, prefix: &str) -> Result<(), BrokerError> {
        {
            let now = Instant::now();
            let mut leased = lock(&self.watches.leased);
            leased.retain(|_, until| *until > now);
            if leased
                .get(prefix)
                .is_some_and(|until| *until > now + self.config.watch_refresh * 2)
            {
                // Written a moment ago (a wildcard that comes and goes): the lease outlasts the
                // next renewal, which carries it on.
                lock(&self.watches.written).insert(prefix.to_string());
                return Ok(());
            }
            let mut pending = lock(&self.watches.pending);
            let new = !leased.contains_key(prefix) && !pending.contains(prefix);
            if new && leased.len() + pending.len() >= self.config.watch_limit {
                return Err(BrokerError::Unavailable(format!(
                    "this node holds watches for {} wildcard prefixes already (including recently \
                     unsubscribed ones, until their lease ends); try again later",
                    leased.len() + pending.len()
                )));
            }
            pending.insert(prefix.to_string());
        }
        let _writing = self.watches.writing.lock().await;
        let batch: Vec<String> = {
            let mut pending = lock(&self.watches.pending);
            if !pending.contains(prefix) {
                // An earlier writer took it along; it either wrote it or failed.
                drop(pending);
                return if self.watches.is_written(prefix) {
                    Ok(())
                } else {
                    Err(BrokerError::Unavailable(
                        "the wildcard's watch could not be written".into(),
                    ))
                };
            }
            pending.drain().collect()
        };
        let started = Instant::now();
        self.write_watches(&batch).await?;
        let until = started + self.config.watch_lease;
        let mut leased = lock(&self.watches.leased);
        let mut written = lock(&self.watches.written);
        for p in &batch {
            written.insert(p.clone());
            leased.insert(p.clone(), until);
        }
        tracing::debug!(prefixes = batch.len(), elapsed = ?started.elapsed(), "wildcard watches written into every slot");
        Ok(())
    }

    /// Counts a prefix subscription; the first one pattern-subscribes its channels (and on a
    /// cluster then writes its watch into every slot, [`super::watch`]).
    pub(super) async fn subscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        let first = self.psubscribe_prefix(prefix).await?;
        // A second subscription of the prefix may come while the first one's watch is written.
        if self.names.is_cluster() && (first || !self.watches.is_written(prefix)) {
            self.watch_or_undo(prefix).await?;
        }
        Ok(())
    }

    /// [`Inner::watch`] for a prefix just pattern-subscribed; when the watch cannot be written,
    /// the prefix subscription is taken back and the wildcard refused (a subscriber acknowledged
    /// without a watch would silently receive nothing).
    async fn watch_or_undo(&self, prefix: &str) -> Result<(), BrokerError> {
        let Err(e) = self.watch(prefix).await else {
            return Ok(());
        };
        tracing::warn!(error = %e, prefix, "a wildcard watch could not be written; refused");
        if let Err(undo) = self.unsubscribe_prefix(prefix).await {
            tracing::debug!(error = %undo, "pattern unsubscribe after a failed watch");
        }
        Err(e)
    }

    /// Renews every wanted prefix's lease in every slot. Prefixes that were written before and
    /// came back as added in some slot were lost there (or lapsed): their topics may have missed
    /// messages, so the tracked ones are filled from history. Returns false when the write failed.
    pub(super) async fn renew_watches(self: &Arc<Self>) -> bool {
        let _writing = self.watches.writing.lock().await;
        let wanted = self.topics.prefixes();
        if wanted.is_empty() {
            lock(&self.watches.written).clear();
            return true;
        }
        let known: Vec<bool> = {
            let written = lock(&self.watches.written);
            wanted.iter().map(|p| written.contains(p)).collect()
        };
        let started = Instant::now();
        let added = match self.write_watches(&wanted).await {
            Ok(added) => added,
            Err(e) => {
                tracing::warn!(error = %e, "renewing the wildcard watches failed");
                return false;
            }
        };
        // Which prefix a slot re-added is not told, only how many: a slot that added more than the
        // prefixes new to this node lost some of the known ones.
        let new = known.iter().filter(|k| !**k).count() as u64;
        let lost = added.iter().filter(|&&n| n > new).count();
        *lock(&self.watches.written) = wanted.iter().cloned().collect();
        {
            let until = started + self.config.watch_lease;
            let mut leased = lock(&self.watches.leased);
            for p in &wanted {
                leased.insert(p.clone(), until);
            }
        }
        if lost > 0 && known.iter().any(|k| *k) {
            let lost_prefixes: Vec<String> = wanted
                .iter()
                .zip(&known)
                .filter(|(_, k)| **k)
                .map(|(p, _)| p.clone())
                .collect();
            tracing::warn!(
                slots = lost,
                "wildcard watches were missing in Redis (restart, failover or deletion); rewritten, filling their topics"
            );
            let start = self.topics.fill_below(&lost_prefixes);
            fill::spawn(self, start);
        }
        true
    }

    /// Writes every wanted prefix again after a new subscription connection (a reconnect may
    /// mean a Redis restart that lost them). Failures are left to the refresh task's retries.
    pub(super) async fn rewrite_watches(self: &Arc<Self>) {
        if !self.topics.prefixes().is_empty() && !self.renew_watches().await {
            tracing::warn!("wildcard watches not rewritten after the reconnect; retrying");
        }
    }
}

/// Slots probed every second for a lost watch: one every `SLOTS / PROBES`, so every master that
/// owns a run of at least that many slots (any usual layout of up to 64 masters) is probed.
const PROBES: usize = 64;

impl Inner {
    /// Whether a watch this node wrote is missing from one of the probed slots' sets: a master
    /// restarted without data, or a failover lost it. A renewal would find it too, but only at
    /// the next `watch_refresh`; meanwhile that master's topics would not reach the node.
    async fn watch_missing(&self) -> bool {
        let Some(prefix) = lock(&self.watches.written).iter().next().cloned() else {
            return false;
        };
        let prefix = &prefix;
        let probes = (0..PROBES).map(|i| {
            let key = self
                .names
                .watch_key(self.watches.tags.tag(i * (SLOTS / PROBES)));
            async move {
                self.with_cmd(|mut c| async move {
                    c.query::<Option<f64>>(redis::cmd("ZSCORE").arg(&key).arg(prefix))
                        .await
                })
                .await
            }
        });
        let found: Result<Vec<Option<f64>>, BrokerError> = futures_util::stream::iter(probes)
            .buffered(PROBES)
            .try_collect()
            .await;
        // A failed probe proves nothing; the renewal's own retries cover an unreachable Redis.
        found.is_ok_and(|scores| scores.iter().any(Option::is_none))
    }
}

/// Renews the watches every `watch_refresh`, sooner after a failure, and at once when a probe
/// finds one missing. A node whose renewals kept failing until its leases ran out fills its
/// wildcard topics when renewal works again: its members then come back as added.
pub(super) async fn run(inner: Arc<Inner>) {
    let every = inner.config.watch_refresh;
    let tick = Duration::from_secs(1).min(every);
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep(tick).await;
        if inner.health.is_closed() {
            return;
        }
        let due = Instant::now() >= next;
        if !due && !inner.watch_missing().await {
            continue;
        }
        if !due {
            tracing::warn!("a wildcard watch is missing in Redis; rewriting the watches now");
        }
        next = Instant::now()
            + if inner.renew_watches().await {
                every
            } else {
                tick
            };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis_keyslot() {
        // `CLUSTER KEYSLOT` answers on Redis 7.0.
        assert_eq!(slot_of("123456789"), 12739);
        assert_eq!(slot_of("x"), 16287);
        assert_eq!(slot_of(""), 0);
    }

    #[test]
    fn every_slot_has_a_short_tag() {
        let tags = SlotTags::new();
        for slot in 0..SLOTS {
            let tag = tags.tag(slot);
            assert!(!tag.is_empty() && tag.len() <= 4, "{slot}: {tag:?}");
            assert_eq!(slot_of(tag), slot);
        }
    }
}
