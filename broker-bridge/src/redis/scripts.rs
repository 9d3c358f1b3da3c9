//! The Lua scripts that keep a topic's epoch, offset and history consistent in Redis.
//!
//! Each script runs atomically and touches only the topic's three keys (one hash slot on a cluster).
//! Keys, in order: `KEYS[1]` epoch, `KEYS[2]` offset, `KEYS[3]` history stream. All three begin with
//! the same preamble: if the epoch or the offset key is missing (first use, `FLUSHALL`, expiry,
//! eviction), a new epoch (`ARGV[1]`, made by the caller) starts at offset 0 with empty history.
//! `ARGV[2]` is how long, in ms, the epoch and offset keys live after the topic was last used.

use std::sync::Arc;

use bytes::Bytes;
use redis::{Script, Value};

use crate::{BrokerError, Epoch, HistoryRead, Position, Replay};

const PREAMBLE: &str = r#"
local epoch = redis.call('GET', KEYS[1])
local last = redis.call('GET', KEYS[2])
if (not epoch) or (not last) then
  epoch = ARGV[1]
  last = 0
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[2], 0)
  redis.call('DEL', KEYS[3])
else
  last = tonumber(last)
end
local idle = tonumber(ARGV[2])
if idle > 0 then
  redis.call('PEXPIRE', KEYS[1], idle)
  redis.call('PEXPIRE', KEYS[2], idle)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
/// (0: none), `ARGV[7]` `PUBLISH` or `SPUBLISH`. Returns `{epoch, offset}`.
const PUBLISH: &str = r#"
local offset = redis.call('INCR', KEYS[2])
local size = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
if size > 0 then
  local now = now_ms()
  redis.call('XADD', KEYS[3], 'MAXLEN', size, string.format('%d-0', offset), 'd', ARGV[4], 't', now)
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
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
redis.call(ARGV[7], ARGV[3], 'pg1 ' .. epoch .. ' ' .. string.format('%d', offset) .. '\n' .. ARGV[4])
return {epoch, offset}
"#;

/// Position. Returns `{epoch, offset}`.
const POSITION: &str = r#"
return {epoch, last}
"#;

/// History (a resume's replay, `GET /v1/history`). `ARGV[3]` the epoch the reader's `since`
/// belongs to (empty: the current one), `ARGV[4]` `since` (negative: the newest `ARGV[5]`
/// messages), `ARGV[5]` most messages to return, `ARGV[6]` history TTL in ms (0: none), `ARGV[7]`
/// `1` for an all-or-nothing read. Returns `{epoch, offset, start, offset₁, data₁, offset₂, …}`: the
/// effective start (messages after it are wanted) and the stream entries after it that are not
/// older than the TTL, oldest first, at most `ARGV[5]`. Whether that is complete is decided by the
/// caller (`HistoryRead::page`), which computes the same start.
const HISTORY: &str = r#"
local since = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local epoch_ok = ARGV[3] == '' or ARGV[3] == epoch
if since < 0 then
  since = math.max(0, last - limit)
elseif not epoch_ok then
  since = 0
end
if since >= last or limit <= 0 then
  return {epoch, last, since}
end
if ARGV[7] == '1' and ((not epoch_ok) or last - since > limit) then
  -- A resume that cannot be served whole: do not read what would be thrown away.
  return {epoch, last, since}
end
local entries = redis.call('XRANGE', KEYS[3], string.format('%d-0', since + 1), '+', 'COUNT', math.min(limit, last - since))
local ttl = tonumber(ARGV[6])
local cutoff = 0
if ttl > 0 then cutoff = now_ms() - ttl end
local out = {epoch, last, since}
for _, e in ipairs(entries) do
  if tonumber(field(e, 't') or '0') >= cutoff then
    out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
    out[#out + 1] = field(e, 'd') or 'null'
  end
end
return out
"#;

/// The three scripts, hashed once.
pub struct Scripts {
    /// See [`PUBLISH`].
    pub publish: Script,
    /// See [`POSITION`].
    pub position: Script,
    /// See [`HISTORY`].
    pub history: Script,
}

impl Scripts {
    /// Prepares the scripts.
    pub fn new() -> Self {
        Scripts {
            publish: Script::new(&format!("{PREAMBLE}{PUBLISH}")),
            position: Script::new(&format!("{PREAMBLE}{POSITION}")),
            history: Script::new(&format!("{PREAMBLE}{HISTORY}")),
        }
    }
}

fn protocol(what: &str) -> BrokerError {
    BrokerError::Protocol(format!("unexpected script reply: {what}"))
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => std::str::from_utf8(as_bytes(other)?).ok()?.parse().ok(),
    }
}

fn items(v: Value) -> Result<Vec<Value>, BrokerError> {
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

/// Reads the `{epoch, offset}` reply of the publish and position scripts.
pub fn parse_position(v: Value) -> Result<Position, BrokerError> {
    position_of(&items(v)?)
}

/// Reads the reply of the history script and builds the page.
pub fn parse_history(
    v: Value,
    topic: &Arc<str>,
    read: &HistoryRead<'_>,
) -> Result<Replay, BrokerError> {
    let items = items(v)?;
    let position = position_of(&items)?;
    let start = items
        .get(2)
        .and_then(as_u64)
        .ok_or_else(|| protocol("no start"))?;
    if start != read.start(&position).0 {
        return Err(protocol("history start differs from the request"));
    }
    let mut held = Vec::with_capacity(items.len().saturating_sub(3) / 2);
    let mut rest = items.into_iter().skip(3);
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
    Ok(read.page(topic, position, held))
}
