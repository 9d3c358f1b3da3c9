//! The Lua scripts that keep a topic's epoch, offset and history consistent in Redis.
//!
//! Each script runs atomically and touches only the topic's three keys (one hash slot on a cluster).
//! Keys, in order: `KEYS[1]` epoch, `KEYS[2]` offset, `KEYS[3]` history stream. `ARGV[1]` is a
//! candidate `"<epoch> <salt>"` made by the caller, used when a new epoch must start; `ARGV[2]` is how
//! long, in ms, the epoch and offset keys live after the topic was last used.
//!
//! The epoch key holds `"<epoch> <run> <salt>"`:
//! * `run` is the Redis server's `run_id` followed by its `master_replid` when the epoch was
//!   written. The first changes on every restart, the second when the server is promoted or
//!   resyncs its data from another master; those are exactly the moments a topic's offset can go
//!   back (a restart from an older RDB snapshot, AOF `everysec` losing its last second, an
//!   asynchronous replica taking over, a failback to a master that was partitioned away). A script
//!   that finds another `run` starts a new epoch, so clients that saw the lost future get
//!   `recovered:false` or a gap frame, never a silently reused offset. The price is that a clean
//!   restart or failover also starts new epochs (see `docs/recovery.md`).
//! * `salt` is a random secret of the epoch. Messages carry a tag made from it, so a raw publisher,
//!   who can `PUBLISH` but not read keys, cannot forge a gateway message ([`super::wire`]).
//!
//! Reads (position, history) never create keys: a topic that was never published to answers the
//! empty position (epoch [`EMPTY_EPOCH`], offset 0), so scanning made-up topic names cannot fill
//! Redis. A read does rotate an existing topic whose `run_id` changed.

use std::sync::Arc;

use bytes::Bytes;
use redis::{Script, Value};

use crate::{BrokerError, EMPTY_EPOCH, Epoch, HistoryRead, Position, Replay};

/// A Lua helper for the scripts that read the server's identity: `info_field(section, name, class,
/// last)` is the run of `class` characters after a line that starts with `name` in `INFO <section>`
/// (`''` if none): the first such line, or the last one when `last` is true. Where the field is
/// matters: `INFO replication` lists a master's replicas (`slave0:ip=<announced ip>,…`) before its
/// own `master_replid:`, and a replica can announce any text, `master_replid:0` and line breaks
/// included (hostile review), so `master_replid` is the last such line; `run_id` comes before any
/// field a client can set in `INFO server`, so it is the first. A plain `find` rather than a
/// pattern search from the start of the text, which cost as much as the rest of the lookup.
pub(super) const INFO_FIELD: &str = r#"
local function info_field(section, name, class, last)
  local text = redis.call('INFO', section)
  local key = '\n' .. name
  local at = string.find(text, key, 1, true)
  while last and at do
    local later = string.find(text, key, at + 1, true)
    if not later then break end
    at = later
  end
  return at and string.match(text, '^' .. class .. '+', at + #key) or ''
end
"#;

/// The part every script starts with (after [`INFO_FIELD`]). `WRITER` is replaced by `true` in the
/// publish script: only a publish creates a topic that does not exist.
///
/// Numbers that Redis takes as arguments are passed as the strings they came in (`ARGV[2]`) or
/// formatted with `%d`: Redis turns a Lua number argument into a string with `%.17g`, the C
/// library's floating-point printer, which cost a few percent of the publish script.
const PREAMBLE: &str = r#"
-- The server run and its replication history: a restart changes run_id; a promotion or a full
-- resync from another master (a failback) changes master_replid, even within one run.
local run = info_field('server', 'run_id:', '%x', false)
  .. info_field('replication', 'master_replid:', '%x', true)
local stored = redis.call('GET', KEYS[1])
local last = redis.call('GET', KEYS[2])
local epoch, owner, salt
if stored then
  epoch, owner, salt = string.match(stored, '^(%w+) ?(%x*) ?(%x*)$')
end
local fresh = (not epoch) or (not last)
local rolled = (not fresh) and owner ~= '' and owner ~= run
local empty = fresh and not WRITER
if empty then
  -- A read of a topic that does not exist: answer the empty position, write nothing.
  epoch, last, salt = EMPTY, 0, ''
elseif fresh or rolled then
  epoch, salt = string.match(ARGV[1], '^(%w+) (%x+)$')
  last = 0
  redis.call('SET', KEYS[1], epoch .. ' ' .. run .. ' ' .. salt)
  redis.call('SET', KEYS[2], 0)
  redis.call('DEL', KEYS[3])
else
  last = tonumber(last)
  if owner == '' or salt == '' then
    -- Written by an older pubgate: adopt the epoch (its offsets are still valid).
    if salt == '' then salt = string.match(ARGV[1], ' (%x+)$') end
    redis.call('SET', KEYS[1], epoch .. ' ' .. run .. ' ' .. salt)
  end
end
local idle = tonumber(ARGV[2])
if idle > 0 and not empty then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
-- Redis's clock in ms, read once per script: every part of one call stamps the same moment.
local clock_ms
local function now_ms()
  if not clock_ms then
    local t = redis.call('TIME')
    clock_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock_ms
end
local function field(entry, name)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end
"#;

/// Publish. `ARGV[3]` channel, `ARGV[4]` data, `ARGV[5]` history size, `ARGV[6]` history TTL in ms
/// (0: none), `ARGV[7]` `PUBLISH` or `SPUBLISH`; on a cluster also [`WATCHED`]'s. Returns
/// `{epoch, offset}`.
const PUBLISH: &str = r#"
-- BEFORE_PUBLISH
local offset = redis.call('INCR', KEYS[2])
local size = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
if size > 0 then
  local now = now_ms()
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[5], string.format('%d-0', offset), 'd', ARGV[4], 't',
    string.format('%d', now))
  if ttl > 0 then
    -- Drop entries older than the TTL from the head, a bounded number per publish. Only the
    -- oldest entry is read first: it is usually still fresh, and reading 64 entries on every
    -- publish was most of Redis's CPU time per message.
    local oldest = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)[1]
    if oldest and tonumber(field(oldest, 't') or '0') < now - ttl then
      local head = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 64)
      local expired = nil
      for _, e in ipairs(head) do
        local t = tonumber(field(e, 't') or '0')
        if t >= now - ttl then break end
        expired = tonumber(string.match(e[1], '^(%d+)'))
      end
      redis.call('XTRIM', KEYS[3], 'MINID', string.format('%d-0', expired + 1))
    end
    redis.call('PEXPIRE', KEYS[3], ARGV[6])
  end
end
local off = string.format('%d', offset)
local tag = string.sub(redis.sha1hex(salt .. ' ' .. off .. '\n' .. ARGV[4]), 1, 16)
local payload = 'pg1 ' .. epoch .. ' ' .. off .. ' ' .. tag .. '\n' .. ARGV[4]
redis.call(ARGV[7], ARGV[3], payload)
WATCHED
return {epoch, offset}
"#;

/// The cluster-only check of the publish script (wildcards; [`super::watch`]), first in it, before
/// anything is written. `KEYS[4]` the watch set of the topic's slot, `ARGV[8]` the watch channels'
/// prefix (`{prefix}~w:`), `ARGV[9]` the topic. When a strict prefix of the topic (`""`, `a`,
/// `a.b` for `a.b.c`) has a live lease there, [`WATCHED`] sends the message on the watch channel
/// too, a classic `PUBLISH` the cluster bus carries to every node.
const WATCH_CHECK: &str = r#"
local watch_now = now_ms()
local function watched(p)
  local until_ms = redis.call('ZSCORE', KEYS[4], p)
  return until_ms and tonumber(until_ms) > watch_now
end
local topic = ARGV[9]
local hit = watched('')
local dot = string.find(topic, '.', 1, true)
while (not hit) and dot do
  hit = watched(string.sub(topic, 1, dot - 1))
  dot = string.find(topic, '.', dot + 1, true)
end
"#;

/// The copy of a watched topic's message (after [`WATCH_CHECK`], which runs before anything is
/// written, so that a watch set Redis cannot read fails the publish without side effects).
const WATCHED: &str = r#"
if hit then
  redis.call('PUBLISH', ARGV[8] .. topic, payload)
end
"#;

/// Position. Returns `{epoch, offset, salt}`.
const POSITION: &str = r#"
return {epoch, last, salt}
"#;

/// History (a resume's replay, `GET /v1/history`). `ARGV[3]` the epoch the reader's `since`
/// belongs to (empty: the current one), `ARGV[4]` `since` (negative: the newest `ARGV[5]`
/// messages), `ARGV[5]` most messages to return, `ARGV[6]` history TTL in ms (0: none), `ARGV[7]`
/// `1` for an all-or-nothing read. Returns `{epoch, offset, start, salt, offset₁, data₁, offset₂, …}`:
/// the effective start (messages after it are wanted) and the stream entries after it that are not
/// older than the TTL, oldest first, at most `ARGV[5]`. Whether that is complete is decided by the
/// caller (`HistoryRead::page`), which computes the same start.
const HISTORY: &str = r#"
local since = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
-- A reader acknowledged on a topic that did not exist yet resumes from its first message.
local epoch_ok = ARGV[3] == '' or ARGV[3] == epoch or (ARGV[3] == EMPTY and since == 0)
if since < 0 then
  since = math.max(0, last - limit)
elseif not epoch_ok then
  since = 0
end
if since >= last or limit <= 0 then
  return {epoch, last, since, salt}
end
if ARGV[7] == '1' and ((not epoch_ok) or last - since > limit) then
  -- A resume that cannot be served whole: do not read what would be thrown away.
  return {epoch, last, since, salt}
end
local entries = redis.call('XRANGE', KEYS[3], string.format('%d-0', since + 1), '+', 'COUNT', math.min(limit, last - since))
local ttl = tonumber(ARGV[6])
local cutoff = 0
if ttl > 0 then cutoff = now_ms() - ttl end
local out = {epoch, last, since, salt}
for _, e in ipairs(entries) do
  if tonumber(field(e, 't') or '0') >= cutoff then
    out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
    out[#out + 1] = field(e, 'd') or 'null'
  end
end
return out
"#;

/// The scripts, hashed once.
pub struct Scripts {
    /// See [`PUBLISH`].
    pub publish: Script,
    /// See [`POSITION`].
    pub position: Script,
    /// See [`HISTORY`].
    pub history: Script,
    /// See [`super::directory`].
    pub directory: Script,
    /// See [`super::directory`].
    pub seek: Script,
    /// See [`super::directory`].
    pub clock: Script,
}

impl Scripts {
    /// Prepares the scripts; `cluster` adds the wildcard watch check to the publish script.
    pub fn new(cluster: bool) -> Self {
        let preamble = |writer: bool| {
            format!("{INFO_FIELD}{PREAMBLE}")
                .replace("WRITER", if writer { "true" } else { "false" })
                .replace("EMPTY", &format!("'{EMPTY_EPOCH}'"))
        };
        let empty = format!("'{EMPTY_EPOCH}'");
        Scripts {
            publish: Script::new(&format!(
                "{}{}",
                preamble(true),
                PUBLISH
                    // Reads and writes that can fail on a key of the wrong type come before the
                    // offset is taken, so a failed publish leaves nothing behind (a retry would
                    // otherwise publish the message twice).
                    .replace(
                        "-- BEFORE_PUBLISH",
                        if cluster {
                            WATCH_CHECK
                        } else {
                            super::directory::PUBLISH_BLOCK
                        },
                    )
                    .replace("WATCHED", if cluster { WATCHED } else { "" })
            )),
            directory: super::directory::directory_script(),
            clock: super::directory::clock_script(),
            seek: Script::new(&format!("{}{}", preamble(false), super::directory::SEEK)),
            position: Script::new(&format!("{}{POSITION}", preamble(false))),
            history: Script::new(&format!(
                "{}{}",
                preamble(false),
                HISTORY.replace("EMPTY", &empty)
            )),
        }
    }
}

pub(super) fn protocol(what: &str) -> BrokerError {
    BrokerError::Protocol(format!("unexpected script reply: {what}"))
}

pub(super) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(super) fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

pub(super) fn items(v: Value) -> Result<Vec<Value>, BrokerError> {
    match v {
        Value::Array(items) => Ok(items),
        _ => Err(protocol("not an array")),
    }
}

fn position_of(items: &[Value]) -> Result<Position, BrokerError> {
    let epoch = items
        .first()
        .and_then(as_bytes)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| protocol("no epoch"))?;
    let offset = items
        .get(1)
        .and_then(as_u64)
        .ok_or_else(|| protocol("no offset"))?;
    Ok(Position {
        epoch: Epoch::new(epoch),
        offset,
    })
}

/// Reads the `{epoch, offset}` reply of the publish script.
pub fn parse_position(v: Value) -> Result<Position, BrokerError> {
    position_of(&items(v)?)
}

/// Reads the `{epoch, offset, salt}` reply of the position script.
pub fn parse_head(v: Value) -> Result<(Position, Salt), BrokerError> {
    let items = items(v)?;
    Ok((position_of(&items)?, salt_of(items.get(2))?))
}

/// The secret of a topic's epoch that message tags are made with (empty for the empty position).
pub type Salt = Arc<str>;

fn salt_of(v: Option<&Value>) -> Result<Salt, BrokerError> {
    v.and_then(as_bytes)
        .and_then(|b| std::str::from_utf8(b).ok())
        .map(Arc::from)
        .ok_or_else(|| protocol("no salt"))
}

/// Reads the reply of the history script and builds the page.
pub fn parse_history(
    v: Value,
    topic: &Arc<str>,
    read: &HistoryRead<'_>,
) -> Result<(Replay, Salt), BrokerError> {
    let items = items(v)?;
    let position = position_of(&items)?;
    let start = items
        .get(2)
        .and_then(as_u64)
        .ok_or_else(|| protocol("no start"))?;
    if start != read.start(&position).0 {
        return Err(protocol("history start differs from the request"));
    }
    let salt = salt_of(items.get(3))?;
    let mut held = Vec::with_capacity(items.len().saturating_sub(4) / 2);
    let mut rest = items.into_iter().skip(4);
    while let Some(offset) = rest.next() {
        let offset = as_u64(&offset).ok_or_else(|| protocol("entry offset"))?;
        let data = match rest.next() {
            Some(Value::BulkString(b)) => Bytes::from(b),
            Some(other) => {
                Bytes::copy_from_slice(as_bytes(&other).ok_or_else(|| protocol("entry data"))?)
            }
            None => return Err(protocol("entry without data")),
        };
        held.push((offset, data));
    }
    Ok((read.page(topic, position, held), salt))
}
