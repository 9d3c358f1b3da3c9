// The pubgate client's building blocks that hold no connection: options, timing (backoff, token
// refresh), errors, events and the optional resume store. Shared by pubgate.js, pubgate-shared.js and the
// SharedWorker, so each of them stays one job.

/** Default options; every one can be overridden in `new PubgateClient(url, options)`. */
export const DEFAULTS = Object.freeze({
  ackTimeout: 10000, // ms to wait for the reply to a subscribe, unsubscribe or publish
  backoffBase: 250, // ms: first reconnect delay cap
  backoffMax: 15000, // ms: reconnect delay cap
  stableAfter: 5000, // ms a connection must stay open before the backoff resets
  drainSpread: 5000, // ms: after a drain (close 1001) reconnect at a random moment within this
  refreshMargin: 30000, // ms before `exp` to refresh the token (at most a tenth of its lifetime earlier)
  connectTimeout: 10000, // ms to wait for the WebSocket to open
  tokenTimeout: 10000, // ms to wait for the token callback; a hung callback must not stall reconnects
  minRefreshInterval: 1000, // ms: refreshes never come closer than this, whatever tokens the callback returns
  pingInterval: 30000, // ms between the client's pings while open (0: none); no pong within ackTimeout reconnects
  maxFrameChars: 16 * 1024 * 1024, // larger server frames are refused unparsed (a broken or hostile server)
});

/** Close code a server uses when the connection's token expired or was refused. */
export const CLOSE_AUTH = 4001;
/** Close code of a draining node (and of an idle timeout). */
export const CLOSE_GOING_AWAY = 1001;

/**
 * Capped exponential backoff with full jitter: a random delay in [0, min(max, base * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 */
export function backoffDelay(attempt, base = DEFAULTS.backoffBase, max = DEFAULTS.backoffMax, random = Math.random) {
  const cap = Math.min(max, base * Math.pow(2, Math.min(attempt, 30)));
  return Math.floor(random() * cap);
}

/** The `exp` claim of a JWT in milliseconds since the epoch, or null when it has none (or is no JWT). */
export function tokenExpiry(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const json = typeof atob === 'function' ? atob(padded) : Buffer.from(padded, 'base64').toString('binary');
    const claims = JSON.parse(json);
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * When to refresh a token, in ms from `now`: `margin` before it expires, or halfway through its remaining
 * life when that is shorter than twice the margin; 0 when it has expired. Null when the token has no `exp`.
 */
export function refreshDelay(token, now = Date.now(), margin = DEFAULTS.refreshMargin) {
  const exp = tokenExpiry(token);
  if (exp === null) return null;
  const left = exp - now;
  if (left <= 0) return 0;
  return Math.floor(left - Math.min(margin, left / 2));
}

/** An error answered by the server (`code` from the protocol's list) or made by the client (`timeout`, `disconnected`, `closed`). */
export class PubgateError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = 'PubgateError';
    this.code = code;
  }
}

/** Refusals of a subscribe that a later retry may overcome. */
export const RETRYABLE = new Set(['rate_limited', 'broker_unavailable', 'internal']);

/** A minimal event emitter: a throwing listener becomes an `error` event, never an exception in the client. */
export class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }
  emit(event, arg) {
    for (const fn of [...(this._listeners.get(event) || [])]) {
      try {
        fn(arg);
      } catch (e) {
        if (event !== 'error') this.emit('error', e);
      }
    }
  }
}

/** A handler given as a plain function is the `onMessage` handler. */
export function normalizeHandlers(h) {
  if (typeof h === 'function') return { onMessage: h };
  return h || {};
}

/** True for what the protocol calls an offset: a non-negative safe integer. */
export function isOffset(v) {
  return Number.isSafeInteger(v) && v >= 0;
}

/**
 * Runs the token callback with a time limit: a callback that throws, hangs or returns something other
 * than a string (or null for anonymous) becomes a typed `token` error the caller retries with backoff.
 */
export async function fetchToken(getToken, timeoutMs, setTimer = setTimeout, clearTimer = clearTimeout) {
  let timer = null;
  const timeout = new Promise((_, reject) => {
    timer = setTimer(() => reject(new PubgateError('token', `the token callback did not answer within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    const token = await Promise.race([Promise.resolve().then(getToken), timeout]);
    if (token !== null && token !== undefined && typeof token !== 'string') throw new PubgateError('token', 'the token callback returned something other than a string');
    return token || null;
  } catch (e) {
    throw e instanceof PubgateError ? e : new PubgateError('token', `the token callback failed: ${(e && e.message) || e}`);
  } finally {
    clearTimer(timer);
  }
}

/**
 * Where `persist: 'session'` keeps each topic's resume position ({epoch, offset}), so a page reload
 * resumes where the page left off. A storage that throws (quota, privacy mode) only costs the resume.
 */
export class PositionStore {
  /** @param {Storage|null} storage sessionStorage or a stand-in; null stores nothing */
  constructor(storage, url) {
    this.storage = storage;
    this.prefix = 'pubgate:' + url.split('?')[0] + ':';
  }
  load(topic) {
    if (!this.storage) return null;
    try {
      const v = JSON.parse(this.storage.getItem(this.prefix + topic));
      return v && typeof v.epoch === 'string' && isOffset(v.offset) ? { epoch: v.epoch, offset: v.offset } : null;
    } catch {
      return null;
    }
  }
  save(topic, epoch, offset) {
    if (!this.storage || epoch === null || offset === null) return;
    try {
      this.storage.setItem(this.prefix + topic, JSON.stringify({ epoch, offset }));
    } catch {
      /* full or forbidden: this topic resumes from its ack after a reload */
    }
  }
  remove(topic) {
    try {
      if (this.storage) this.storage.removeItem(this.prefix + topic);
    } catch {
      /* as above */
    }
  }
}

/** sessionStorage for `persist: 'session'` (or `options.storage`); null where there is none or it is forbidden. */
export function sessionStore(options) {
  if (options.storage !== undefined) return options.storage;
  try {
    return globalThis.sessionStorage || null;
  } catch {
    return null;
  }
}

/** Whether `topic` is a wildcard pattern (`scores.*`, `scores.>`) rather than one topic. */
export function isWildcard(topic) {
  return /[*>]/.test(topic);
}

/** Whether the wildcard `pattern` matches the concrete `topic` (`*` one level, a last `>` one or more). */
export function patternMatches(pattern, topic) {
  const p = pattern.split('.');
  const t = topic.split('.');
  for (let i = 0; i < p.length; i++) {
    if (p[i] === '>') return i === p.length - 1 && t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== '*' && p[i] !== t[i]) return false;
  }
  return t.length === p.length;
}

/**
 * Delivers message `m` to every wildcard subscription in `subs` whose pattern matches its topic, each
 * `(topic, epoch, offset)` once (`seen` keeps each concrete topic's last). `call(sub, name, arg, msg)`
 * runs a handler.
 */
export function deliverToWildcards(subs, m, call) {
  for (const sub of subs) {
    if (!sub.wild || sub.resyncing || !patternMatches(sub.topic, m.topic)) continue;
    if (isOffset(m.offset) && m.offset > 0) {
      // The server sends each message once per subscription and offsets only go back after an
      // epoch change, which message 1 and gap frames name. So within the epoch last seen (known,
      // or unknown on both sides), an offset at or below the last one was delivered already: the
      // replay of a resumed wildcard resends those of topics whose epoch the client did not know.
      const last = sub.seen.get(m.topic);
      const epoch = typeof m.epoch === 'string' ? m.epoch : last ? last.epoch : null;
      if (last && epoch === last.epoch && m.offset <= last.offset) continue; // never twice
      sub.seen.set(m.topic, { epoch, offset: m.offset });
    }
    call(sub, 'onMessage', m.data, m);
  }
}

/** Tells every wildcard subscription whose pattern matches gap frame `g`'s topic (it cannot resume one topic). */
export function gapToWildcards(subs, g, call) {
  for (const sub of subs) {
    if (!sub.wild || sub.resyncing || typeof g.topic !== 'string' || !patternMatches(sub.topic, g.topic)) continue;
    sub.seen.set(g.topic, { epoch: g.epoch, offset: g.offset });
    call(sub, 'onGap', { topic: g.topic, epoch: g.epoch, offset: g.offset, last: null });
  }
}
