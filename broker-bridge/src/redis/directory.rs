//! The topic directory on Redis standalone and Sentinel: which topics below a prefix were
//! published to since a moment, for wildcard resumes ([`crate::Directory`]).
//!
//! Keys (the channel prefix `P`, default `pubgate:`; `~` never occurs in a topic, so they never
//! collide with a topic's keys):
//! * `P~dir`: a sorted set of first levels (`scores` for `scores.nba.live`), scored by the last
//!   publish below each, in ms on Redis `TIME`;
//! * `P~dir:<first level>`: a sorted set of the topics below that first level, scored the same way;
//! * `P~dir~run`: `"<run>/<evicted> <ms>"`, the server run (as in the epoch key, see
//!   [`super::scripts`]) and its count of evicted keys (`INFO stats`), and since when both are so.
//!   A restart, promotion or resync changes the run, and an eviction (under a `volatile-*` or
//!   `allkeys-*` policy the sets, which carry a TTL, may go) changes the count: the directory may
//!   have lost entries, so it only answers for moments after the change was seen.
//!
//! The publish script maintains the sets (the block below), dropping members older than the window
//! and letting a set expire a window after its last publish. The run key is written by the clock
//! a wildcard ack reads ([`CLOCK`]), which every resume reads before the directory: a resume across
//! a restart finds it rewritten after its `time`. Redis Cluster has no directory: the
//! sets would span every slot, which no script there may touch.

use std::sync::Arc;

use redis::Value;

use super::Inner;
use super::scripts::{INFO_FIELD, as_bytes, as_u64, items, protocol};
use crate::{BrokerError, Directory, EMPTY_EPOCH, Epoch, MAX_DIRECTORY_TOPICS, Position, Seek};

/// First in the publish script, before the offset is taken (so a set Redis cannot write fails
/// the publish without side effects), standalone and Sentinel only (`KEYS[4]` `P~dir`, `KEYS[5]`
/// `P~dir:<first level>`; `ARGV[8]` the window in ms, `ARGV[9]` the topic, `ARGV[10]` its first
/// level). Without a numeric `ARGV[8]` (Redis Cluster) it does nothing. The run key is not touched here: the
/// ack's clock ([`CLOCK`]) keeps it, so a publish pays only for the two sets.
pub(super) const PUBLISH_BLOCK: &str = r#"
local dir_window = tonumber(ARGV[8] or '0') or 0
if dir_window > 0 then
  local t = now_ms()
  local ts = string.format('%d', t)
  redis.call('ZADD', KEYS[5], ts, ARGV[9])
  redis.call('PEXPIRE', KEYS[5], ARGV[8])
  redis.call('ZADD', KEYS[4], ts, ARGV[10])
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
  -- Members older than the window are dropped by one publish in 16 (by its ms): reads skip them
  -- anyway (they ask for scores within the window), so this only bounds the sets' size, and
  -- doing it every time cost a fifth of the script.
  if t % 16 == 0 then
    local old = '(' .. string.format('%d', t - dir_window)
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', old)
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', old)
  end
end
"#;

/// What the directory belongs to, first in [`CLOCK`] and [`DIRECTORY`]: the server run (as in
/// the epoch key) and its count of evicted keys.
const RUN: &str = r#"
local run = info_field('server', 'run_id:', '%x', false)
  .. info_field('replication', 'master_replid:', '%x', true)
  .. '/' .. info_field('stats', 'evicted_keys:', '%d', false)
"#;

/// The clock of a wildcard ack: Redis `TIME` in ms, after making sure `P~dir~run` names this
/// run (`KEYS[1]`), so every ack's time is covered by the directory of the run that gave it, and
/// none given before a restart is.
const CLOCK: &str = r#"
local tm = redis.call('TIME')
local now = string.format('%d', tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000))
local meta = redis.call('GET', KEYS[1])
if (not meta) or string.match(meta, '^(%S*) ') ~= run then
  redis.call('SET', KEYS[1], run .. ' ' .. now)
end
return now
"#;

/// The directory read. `KEYS[1]` `P~dir`, `KEYS[2]` `P~dir~run`, `KEYS[3]` `P~dir:<first level>`
/// (absent for the empty prefix); `ARGV[1]` since (ms), `ARGV[2]` the window (ms), `ARGV[3]` the
/// most topics, `ARGV[4]` `P~dir:` (the level keys for the empty prefix, standalone only).
/// Returns `{"ok", topic₁, …}` or `{reason}`.
const DIRECTORY: &str = r#"
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local since = tonumber(ARGV[1])
local cap = tonumber(ARGV[3])
if since < now - tonumber(ARGV[2]) then return {'window'} end
local meta = redis.call('GET', KEYS[2])
if not meta then return {'reset'} end
local mrun, mstart = string.match(meta, '^(%S*) (%d+)$')
if mrun ~= run or since < tonumber(mstart) then return {'reset'} end
local levels = {}
if KEYS[3] then
  levels = {KEYS[3]}
else
  local firsts = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, cap + 1)
  if #firsts > cap then return {'cap'} end
  for i, l in ipairs(firsts) do levels[i] = ARGV[4] .. l end
end
local out = {'ok'}
for _, key in ipairs(levels) do
  local found = redis.call('ZRANGEBYSCORE', key, ARGV[1], '+inf', 'LIMIT', 0, cap + 1)
  if #out - 1 + #found > cap then return {'cap'} end
  for _, topic in ipairs(found) do out[#out + 1] = topic end
end
return out
"#;

/// The seek: after the shared preamble (a topic's keys, `ARGV[1]` candidate epoch, `ARGV[2]` idle
/// ms), `ARGV[3]` since (ms), `ARGV[4]` the most messages to look back. Walks the history stream
/// from its newest entry back to the first one stamped before `since`. Returns
/// `{epoch, offset, after, covered}`.
pub(super) const SEEK: &str = r#"
local since = tonumber(ARGV[3])
local max = tonumber(ARGV[4])
if last == 0 then return {epoch, last, 0, 0} end
local cursor = '+'
local seen = 0
while seen < max do
  local page = redis.call('XREVRANGE', KEYS[3], cursor, '-', 'COUNT', math.min(100, max - seen))
  if #page == 0 then break end
  for _, e in ipairs(page) do
    local off = tonumber(string.match(e[1], '^(%d+)'))
    if tonumber(field(e, 't') or '0') < since then return {epoch, last, off, 1} end
    if off == 1 then return {epoch, last, 0, 1} end
    seen = seen + 1
    cursor = '(' .. e[1]
  end
end
return {epoch, last, last, 0}
"#;

/// The directory read script (see [`DIRECTORY`]).
pub(super) fn directory_script() -> redis::Script {
    redis::Script::new(&format!("{INFO_FIELD}{RUN}{DIRECTORY}"))
}

/// The clock script (see [`CLOCK`]).
pub(super) fn clock_script() -> redis::Script {
    redis::Script::new(&format!("{INFO_FIELD}{RUN}{CLOCK}"))
}

/// The directory keys of a topic's publish, `P~dir` and `P~dir:<first level>`, and the first
/// level.
pub(super) fn publish_keys(prefix: &str, topic: &str) -> [String; 3] {
    let first = topic.split('.').next().unwrap_or(topic);
    [
        format!("{prefix}~dir"),
        format!("{prefix}~dir:{first}"),
        first.to_string(),
    ]
}

impl Inner {
    /// Redis `TIME` in ms (see [`CLOCK`]; plain `TIME` on a cluster, which has no directory).
    pub(super) async fn clock(&self) -> Result<u64, BrokerError> {
        if self.names.is_cluster() {
            let (secs, micros): (u64, u64) = self
                .with_cmd(|mut c| async move { c.query(&redis::cmd("TIME")).await })
                .await?;
            return Ok(secs * 1000 + micros / 1000);
        }
        let run = format!("{}~dir~run", self.names.prefix());
        let value = self
            .with_cmd(|mut c| {
                let mut inv = self.scripts.clock.prepare_invoke();
                inv.key(&run);
                async move { c.eval::<Value>(&inv).await }
            })
            .await?;
        as_u64(&value).ok_or_else(|| protocol("clock"))
    }

    /// Lists the topics below `prefix` published since `since_ms` (see [`DIRECTORY`]).
    pub(super) async fn directory(
        &self,
        prefix: &str,
        since_ms: u64,
    ) -> Result<Directory, BrokerError> {
        if self.names.is_cluster() {
            return Ok(Directory::Unknown("Redis Cluster keeps no topic directory"));
        }
        let p = self.names.prefix();
        let (all, run) = (format!("{p}~dir"), format!("{p}~dir~run"));
        let level = (!prefix.is_empty()).then(|| {
            let first = prefix.split('.').next().unwrap_or(prefix);
            format!("{p}~dir:{first}")
        });
        let window = self.config.directory_window.as_millis() as u64;
        let levels = format!("{p}~dir:");
        let value = self
            .on_reads(|mut c| {
                let mut inv = self.scripts.directory.prepare_invoke();
                inv.key(&all).key(&run);
                if let Some(level) = &level {
                    inv.key(level);
                }
                inv.arg(since_ms)
                    .arg(window)
                    .arg(MAX_DIRECTORY_TOPICS)
                    .arg(&levels);
                async move { c.eval::<Value>(&inv).await }
            })
            .await?;
        parse_directory(value, prefix)
    }

    /// Finds where `topic`'s messages since `since_ms` start (see [`SEEK`]).
    pub(super) async fn seek(
        &self,
        topic: &str,
        since_ms: u64,
        max: u64,
    ) -> Result<Seek, BrokerError> {
        let keys = self.names.keys(topic);
        let candidate = Self::candidate();
        let (keys, candidate) = (&keys, &candidate);
        let value = self
            .on_reads(|mut c| async move {
                let mut inv = self.scripts.seek.prepare_invoke();
                inv.key(&keys.epoch)
                    .key(&keys.offset)
                    .key(&keys.history)
                    .arg(candidate)
                    .arg(self.idle_ms())
                    .arg(since_ms)
                    .arg(max);
                c.eval::<Value>(&inv).await
            })
            .await?;
        parse_seek(value)
    }
}

/// Reads the directory script's reply, keeping the topics below `prefix`.
fn parse_directory(v: Value, prefix: &str) -> Result<Directory, BrokerError> {
    let mut items = items(v)?.into_iter();
    let status = items.next().ok_or_else(|| protocol("empty directory"))?;
    match as_bytes(&status) {
        Some(b"ok") => {}
        Some(b"window") => return Ok(Directory::Unknown("older than history.directory_window")),
        Some(b"cap") => return Ok(Directory::Unknown("too many topics changed")),
        Some(b"reset") => {
            return Ok(Directory::Unknown(
                "Redis restarted, failed over or lost the directory since",
            ));
        }
        _ => return Err(protocol("directory status")),
    }
    let mut topics = Vec::new();
    for item in items {
        let name = as_bytes(&item)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| protocol("directory topic"))?;
        let below = prefix.is_empty()
            || (name.len() > prefix.len()
                && name.starts_with(prefix)
                && name.as_bytes()[prefix.len()] == b'.');
        if below {
            topics.push(Arc::from(name));
        }
    }
    Ok(Directory::Topics(topics))
}

/// Reads the seek script's reply.
fn parse_seek(v: Value) -> Result<Seek, BrokerError> {
    let items = items(v)?;
    let epoch = items
        .first()
        .and_then(as_bytes)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| protocol("no epoch"))?;
    let num = |i: usize, what: &str| items.get(i).and_then(as_u64).ok_or_else(|| protocol(what));
    let (offset, after, covered) = (num(1, "offset")?, num(2, "after")?, num(3, "covered")?);
    Ok(Seek {
        position: Position {
            epoch: Epoch::new(if offset == 0 && epoch.is_empty() {
                EMPTY_EPOCH
            } else {
                epoch
            }),
            offset,
        },
        after: after.min(offset),
        covered: covered == 1,
    })
}
