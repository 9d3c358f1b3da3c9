// pubgate JavaScript client: one WebSocket, automatic reconnects, resume with `since`, no duplicates.
// Dependency-free ES module for browsers, and for Node given a WebSocket implementation.
// Protocol: docs/protocol.md; the recovery algorithm it follows: docs/recovery.md.

/** Default options; every one can be overridden in `new PubgateClient(url, options)`. */
export const DEFAULTS = Object.freeze({
  ackTimeout: 10000, // ms to wait for the reply to a subscribe, unsubscribe or publish
  backoffBase: 250, // ms: first reconnect delay cap
  backoffMax: 15000, // ms: reconnect delay cap
  stableAfter: 5000, // ms a connection must stay open before the backoff resets
  drainSpread: 5000, // ms: after a drain (close 1001) reconnect at a random moment within this
  refreshMargin: 30000, // ms before `exp` to refresh the token (at most a tenth of its lifetime earlier)
  connectTimeout: 10000, // ms to wait for the WebSocket to open
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
const RETRYABLE = new Set(['rate_limited', 'broker_unavailable', 'internal']);

class Emitter {
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

function normalizeHandlers(h) {
  if (typeof h === 'function') return { onMessage: h };
  return h || {};
}

/**
 * One logical connection to pubgate that survives reconnects. Create it, subscribe, and call
 * `connect()` (or pass `{connect: true}`); it keeps itself connected until `close()`.
 */
export class PubgateClient extends Emitter {
  /**
   * @param {string} url ws:// or wss:// URL of the gateway's `/ws`
   * @param {object} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.opts = { ...DEFAULTS, ...options };
    this._WS = options.WebSocket || globalThis.WebSocket;
    if (!this._WS) throw new Error('pubgate: no WebSocket implementation: pass options.WebSocket');
    this._random = options.random || Math.random;
    this._now = options.now || (() => Date.now());
    this._setTimeout = options.setTimeout || ((f, ms) => setTimeout(f, ms));
    this._clearTimeout = options.clearTimeout || ((t) => clearTimeout(t));
    this._token = typeof options.token === 'string' ? options.token : null;
    this._getToken = typeof options.token === 'function' ? options.token : options.getToken || null;
    this._tokenStale = false;
    this._ws = null;
    this._state = 'idle'; // idle | connecting | open | waiting | closed
    this._attempt = 0;
    this._openedAt = 0;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer, kind, topic}
    this._subs = new Map(); // topic -> subscription state
    this._retryTimer = null;
    this._refreshTimer = null;
    this._connectTimer = null;
    this._onOnline = () => {
      if (this._state === 'waiting') this._reconnectNow();
    };
    const win = options.window !== undefined ? options.window : globalThis.window;
    this._window = win && typeof win.addEventListener === 'function' ? win : null;
    if (this._window) this._window.addEventListener('online', this._onOnline);
    if (options.connect) this.connect();
  }

  /** `idle`, `connecting`, `open`, `waiting` (to reconnect) or `closed`. Events: `connected`,
   * `disconnected`, `error`, and `resumed` ({topic, since, epoch, offset, recovered}) after each resume. */
  get state() {
    return this._state;
  }

  /** The (epoch, offset) the client would resume `topic` from, or null. */
  position(topic) {
    const s = this._subs.get(topic);
    if (!s || s.offset === null) return null;
    return { epoch: s.epoch, offset: s.offset };
  }

  /** Topics subscribed (wanted, whether or not the connection is up). */
  topics() {
    return [...this._subs.keys()];
  }

  /** Starts connecting (idempotent). */
  connect() {
    if (this._state === 'idle' || this._state === 'closed') {
      this._state = 'connecting';
      this._open();
    }
    return this;
  }

  /** Closes for good: no reconnect; pending requests are rejected. */
  close() {
    this._state = 'closed';
    this._clearTimers();
    if (this._window) this._window.removeEventListener('online', this._onOnline);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try {
        ws.close(1000, 'client closed');
      } catch {
        /* already closed */
      }
    }
    this._failPending(new PubgateError('closed', 'client closed'), () => true);
    this.emit('disconnected', { code: 1000, reason: 'client closed', willReconnect: false });
  }

  /**
   * Subscribes to `topic`. `handlers` is a function (each message's data, then the message) or
   * `{onMessage, onGap, onRecoverFailed}`. `options.since = {epoch, offset}` resumes from a known position.
   * Resolves with the first ack; rejects (and forgets the topic) on a refusal or a timeout.
   */
  subscribe(topic, handlers, options = {}) {
    if (this._subs.has(topic)) return Promise.reject(new PubgateError('already_subscribed', `already subscribed to ${topic}`));
    const since = options.since || null;
    const sub = {
      topic,
      handlers: normalizeHandlers(handlers),
      epoch: since ? String(since.epoch) : null,
      offset: since ? Number(since.offset) : null,
      active: false, // subscribed on the current connection (ack received)
      inflight: false, // a subscribe is on its way on the current connection
      resyncing: false, // dropping messages until the next subscribe ack
      first: null, // {resolve, reject} of the user's promise until the first ack
    };
    this._subs.set(topic, sub);
    const p = new Promise((resolve, reject) => {
      sub.first = { resolve, reject };
    });
    if (this._state === 'open') this._sendSubscribe(sub);
    return p;
  }

  /** Unsubscribes: no handler of `topic` is called after this returns. Resolves when the server acks (at once if disconnected). */
  unsubscribe(topic) {
    const sub = this._subs.get(topic);
    if (!sub) return Promise.reject(new PubgateError('not_subscribed', `not subscribed to ${topic}`));
    this._subs.delete(topic);
    if (sub.first) sub.first.reject(new PubgateError('closed', 'unsubscribed before the ack'));
    if (this._state === 'open' && (sub.active || sub.inflight)) {
      return this._request({ op: 'unsubscribe', topic }, 'unsubscribe').then(() => undefined);
    }
    return Promise.resolve();
  }

  /**
   * Publishes `data` (any JSON value) over the WebSocket (where the token allows it). Resolves with
   * `{epoch, offset}`. Waits for a connection up to `ackTimeout`; a publish whose connection closes
   * before its ack is rejected with `disconnected` (it may or may not have been published) and never re-sent.
   */
  publish(topic, data) {
    return this._request({ op: 'publish', topic, data }, 'publish', { queue: true }).then((ack) => ({
      epoch: ack.epoch,
      offset: ack.offset,
    }));
  }

  // --- internals ------------------------------------------------------------------------------

  _clearTimers() {
    for (const t of ['_retryTimer', '_refreshTimer', '_connectTimer']) {
      if (this[t] !== null) this._clearTimeout(this[t]);
      this[t] = null;
    }
  }

  async _currentToken() {
    if (this._getToken && (this._token === null || this._tokenStale)) {
      this._token = await this._getToken();
      this._tokenStale = false;
    }
    return this._token;
  }

  async _open() {
    let token;
    try {
      token = await this._currentToken();
    } catch (e) {
      this.emit('error', e);
      this._scheduleReconnect(backoffDelay(this._attempt++, this.opts.backoffBase, this.opts.backoffMax, this._random));
      return;
    }
    if (this._state !== 'connecting') return;
    let url = this.url;
    if (token) url += (url.includes('?') ? '&' : '?') + 'access_token=' + encodeURIComponent(token);
    let ws;
    try {
      ws = new this._WS(url);
    } catch (e) {
      this.emit('error', e);
      this._scheduleReconnect(backoffDelay(this._attempt++, this.opts.backoffBase, this.opts.backoffMax, this._random));
      return;
    }
    this._ws = ws;
    this._connectTimer = this._setTimeout(() => {
      this._connectTimer = null;
      if (this._ws === ws && this._state === 'connecting') {
        try {
          ws.close();
        } catch {
          /* ignore */
        }
        this._onClose(ws, { code: 1006, reason: 'connect timeout' });
      }
    }, this.opts.connectTimeout);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onerror = () => this.emit('error', new PubgateError('socket', 'WebSocket error'));
    ws.onclose = (ev) => this._onClose(ws, ev);
  }

  _onOpen(ws) {
    if (this._ws !== ws) return;
    if (this._connectTimer !== null) this._clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._state = 'open';
    this._openedAt = this._now();
    this._scheduleRefresh();
    this.emit('connected', { url: this.url });
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    for (const [id, p] of this._pending) {
      if (p.queued) {
        p.queued = false;
        this._send({ ...p.frame, id });
      }
    }
  }

  _onClose(ws, ev) {
    if (this._ws !== ws) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    if (this._refreshTimer !== null) this._clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (this._connectTimer !== null) this._clearTimeout(this._connectTimer);
    this._connectTimer = null;
    const wasOpen = this._state === 'open';
    if (this._state !== 'closed') this._state = 'waiting';
    for (const sub of this._subs.values()) {
      sub.active = false;
      sub.inflight = false;
      sub.resyncing = false;
    }
    // Requests sent on this connection are lost with it; queued ones wait for the next.
    this._failPending(new PubgateError('disconnected', 'connection closed before the reply'), (p) => !p.queued && !p.internal);
    this._failPending(new PubgateError('disconnected', 'connection closed before the reply'), (p) => p.internal);
    if (this._state === 'closed') return;
    if (wasOpen && this._now() - this._openedAt >= this.opts.stableAfter) this._attempt = 0;
    const code = ev && ev.code;
    let delay = backoffDelay(this._attempt++, this.opts.backoffBase, this.opts.backoffMax, this._random);
    if (code === CLOSE_AUTH) {
      // The token expired or was refused: fetch a new one rather than retry the old one.
      if (this._getToken) this._tokenStale = true;
      else {
        this._state = 'closed';
        this.emit('error', new PubgateError('token_expired', 'the server refused the token and there is no token callback'));
        this.emit('disconnected', { code, reason: ev.reason, willReconnect: false });
        return;
      }
    } else if (code === CLOSE_GOING_AWAY) {
      // A drain: every client of the node hears it at about the same time; spread the returns.
      delay = Math.max(delay, Math.floor(this._random() * this.opts.drainSpread));
    }
    this.emit('disconnected', { code, reason: ev && ev.reason, willReconnect: true, delay });
    this._scheduleReconnect(delay);
  }

  _scheduleReconnect(delay) {
    if (this._state === 'closed') return;
    this._state = 'waiting';
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      this._reconnectNow();
    }, delay);
  }

  _reconnectNow() {
    if (this._retryTimer !== null) this._clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this._state !== 'waiting') return;
    this._state = 'connecting';
    this._open();
  }

  _scheduleRefresh() {
    if (!this._getToken || !this._token) return;
    const delay = refreshDelay(this._token, this._now(), this.opts.refreshMargin);
    if (delay === null) return;
    this._refreshTimer = this._setTimeout(async () => {
      this._refreshTimer = null;
      try {
        this._token = await this._getToken();
        this._tokenStale = false;
        if (this._state === 'open') {
          // A gateway without the refresh op answers unknown_op: the new token is used at the next connect.
          this._request({ op: 'refresh', token: this._token }, 'refresh').catch((e) => {
            if (e.code !== 'unknown_op') this.emit('error', e);
          });
          this._scheduleRefresh();
        }
      } catch (e) {
        this.emit('error', e);
      }
    }, delay);
  }

  _send(frame) {
    if (!this._ws) return false;
    try {
      this._ws.send(JSON.stringify(frame));
      return true;
    } catch (e) {
      this.emit('error', e);
      return false;
    }
  }

  _request(frame, kind, { queue = false, internal = false, onReply = null, onError = null } = {}) {
    const id = this._nextId++;
    const promise = new Promise((res, rej) => {
      const resolve = onReply || res;
      const reject = onError || rej;
      const p = { resolve, reject, kind, frame, queued: false, internal, timer: null };
      p.timer = this._setTimeout(() => {
        if (this._pending.get(id) === p) {
          this._pending.delete(id);
          reject(new PubgateError('timeout', `no reply to ${kind} within ${this.opts.ackTimeout} ms`));
        }
      }, this.opts.ackTimeout);
      this._pending.set(id, p);
      if (this._state === 'open') this._send({ ...frame, id });
      else if (queue) p.queued = true;
      else {
        this._pending.delete(id);
        this._clearTimeout(p.timer);
        reject(new PubgateError('disconnected', 'not connected'));
      }
    });
    return promise;
  }

  _failPending(err, which) {
    for (const [id, p] of this._pending) {
      if (which(p)) {
        this._clearTimeout(p.timer);
        this._pending.delete(id);
        p.reject(err);
      }
    }
  }

  _sendSubscribe(sub) {
    const frame = { op: 'subscribe', topic: sub.topic };
    const since = sub.offset !== null ? { epoch: sub.epoch, offset: sub.offset } : null;
    if (since) frame.since = since;
    sub.inflight = true;
    sub.resyncing = true;
    // The reply is handled synchronously (not in a promise job): the messages right behind the ack
    // may be dispatched in the same task.
    this._request(frame, 'subscribe', {
      internal: true,
      onReply: (ack) => {
        if (this._subs.get(sub.topic) === sub) this._onSubscribeAck(sub, ack, since);
      },
      onError: (err) => {
        if (this._subs.get(sub.topic) === sub) this._onSubscribeError(sub, err);
      },
    });
  }

  _onSubscribeError(sub, err) {
    sub.inflight = false;
    if (err.code === 'disconnected' || err.code === 'closed') return; // resent on reconnect
    if (RETRYABLE.has(err.code)) {
      const ws = this._ws;
      this._setTimeout(() => {
        if (this._ws === ws && this._subs.get(sub.topic) === sub && !sub.active && !sub.inflight) this._sendSubscribe(sub);
      }, backoffDelay(1, this.opts.backoffBase, this.opts.backoffMax, this._random) + 50);
      return;
    }
    if (err.code === 'timeout' && this._ws) {
      // The connection is not answering: start over on a fresh one.
      this.emit('error', err);
      const ws = this._ws;
      try {
        ws.close(4000, 'ack timeout');
      } catch {
        /* ignore */
      }
      this._onClose(ws, { code: 4000, reason: 'ack timeout' });
      return;
    }
    this._subs.delete(sub.topic);
    if (sub.first) sub.first.reject(err);
    else this.emit('error', err);
    sub.first = null;
  }

  _onSubscribeAck(sub, ack, since) {
    sub.inflight = false;
    sub.active = true;
    sub.resyncing = false;
    const info = { topic: sub.topic, epoch: ack.epoch, offset: ack.offset, since };
    if (since && ack.recovered === false) {
      // History could not cover what was missed: the handler reloads; go on live from the ack.
      sub.epoch = ack.epoch;
      sub.offset = ack.offset;
      this._call(sub, 'onRecoverFailed', info);
    } else if (!since) {
      sub.epoch = ack.epoch;
      sub.offset = ack.offset;
    }
    // recovered:true: the missed messages follow from sub.offset + 1; the state stays where it was.
    if (since) this.emit('resumed', { ...info, recovered: ack.recovered !== false });
    if (sub.first) {
      sub.first.resolve({ topic: sub.topic, epoch: ack.epoch, offset: ack.offset, recovered: ack.recovered });
      sub.first = null;
    }
  }

  _call(sub, name, arg, msg) {
    const fn = sub.handlers[name];
    if (typeof fn !== 'function') return;
    try {
      fn(arg, msg);
    } catch (e) {
      this.emit('error', e);
    }
  }

  _onFrame(ws, raw) {
    if (this._ws !== ws) return;
    let f;
    try {
      f = JSON.parse(typeof raw === 'string' ? raw : String(raw));
    } catch {
      this.emit('error', new PubgateError('bad_frame', 'unparsable frame from the server'));
      return;
    }
    switch (f.op) {
      case 'message':
        this._onMessage(f);
        break;
      case 'gap':
        this._onGap(f);
        break;
      case 'ack':
      case 'pong':
      case 'error': {
        const p = this._pending.get(f.id);
        if (!p) {
          if (f.op === 'error') this.emit('error', new PubgateError(f.code, f.message));
          return;
        }
        this._pending.delete(f.id);
        this._clearTimeout(p.timer);
        if (f.op === 'error') p.reject(new PubgateError(f.code, f.message));
        else p.resolve(f);
        break;
      }
      default:
        break; // unknown server frames are ignored (newer servers)
    }
  }

  _onMessage(m) {
    const sub = this._subs.get(m.topic);
    if (!sub || sub.resyncing) return;
    if (typeof m.offset !== 'number') {
      // A raw broker publish: no offset, delivered as is, the state does not move.
      this._call(sub, 'onMessage', m.data, m);
      return;
    }
    if (typeof m.epoch === 'string' && m.epoch !== sub.epoch) {
      // Message 1 names its epoch: learn it (empty epoch "0", or a new epoch after a gap frame).
      if (m.offset === 1 && (sub.epoch === '0' || sub.epoch === null || sub.offset === 0)) {
        sub.epoch = m.epoch;
        sub.offset = 0;
      } else {
        this._resync(sub);
        return;
      }
    }
    if (sub.offset !== null && m.offset <= sub.offset) return; // already delivered: never twice
    if (sub.offset !== null && m.offset !== sub.offset + 1) {
      // Missed messages (dropped from a full send queue): ask history first.
      this._resync(sub);
      return;
    }
    sub.offset = m.offset;
    this._call(sub, 'onMessage', m.data, m);
  }

  _onGap(g) {
    const sub = this._subs.get(g.topic);
    if (!sub || sub.resyncing) return;
    this._call(sub, 'onGap', { topic: g.topic, epoch: g.epoch, offset: g.offset, last: this.position(g.topic) });
    this._resync(sub);
  }

  /** Unsubscribe, then subscribe with `since` = the last message processed: history fills the hole if it can. */
  _resync(sub) {
    if (this._state !== 'open' || sub.resyncing) return;
    sub.resyncing = true;
    sub.active = false;
    const again = () => {
      if (this._subs.get(sub.topic) === sub && this._state === 'open' && !sub.inflight) this._sendSubscribe(sub);
    };
    this._request({ op: 'unsubscribe', topic: sub.topic }, 'unsubscribe', { internal: true, onReply: again, onError: again });
  }
}

/**
 * A client whose connection is shared by all tabs of this origin through a SharedWorker
 * (`pubgate-worker.js`, next to this file unless `options.workerUrl` says otherwise). Where there is
 * no SharedWorker, or `options.share === false`, it is a plain `PubgateClient`. Same API either way.
 * The token, if any, must be a string or a callback; the worker asks a tab for it when it needs one.
 */
export function connect(url, options = {}) {
  const canShare = options.share !== false && typeof SharedWorker === 'function';
  if (!canShare) return new PubgateClient(url, { ...options, connect: true });
  return new SharedClient(url, options);
}

class SharedClient extends Emitter {
  constructor(url, options) {
    super();
    this.url = url;
    this.shared = true;
    this._opts = options;
    const workerUrl = options.workerUrl || new URL('./pubgate-worker.js', import.meta.url);
    const { token, getToken, WebSocket: _ws, window: _w, ...plain } = options;
    this._worker = new SharedWorker(workerUrl, { type: 'module', name: 'pubgate ' + url });
    this._port = this._worker.port;
    this._nextId = 1;
    this._calls = new Map();
    this._handlers = new Map();
    this._state = 'connecting';
    this._getToken = typeof token === 'function' ? token : getToken || (typeof token === 'string' ? () => token : null);
    this._port.onmessage = (ev) => this._onWorker(ev.data);
    this._port.start();
    const opts = {};
    for (const [k, v] of Object.entries(plain)) if (typeof v !== 'function' && k !== 'workerUrl') opts[k] = v;
    this._port.postMessage({ t: 'hello', url, options: opts, hasToken: !!this._getToken });
    const bye = () => this._port.postMessage({ t: 'bye' });
    if (typeof addEventListener === 'function') addEventListener('pagehide', bye);
  }

  get state() {
    return this._state;
  }

  _call(t, args) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._calls.set(id, { resolve, reject });
      this._port.postMessage({ t, id, ...args });
    });
  }

  subscribe(topic, handlers) {
    if (this._handlers.has(topic)) return Promise.reject(new PubgateError('already_subscribed', `already subscribed to ${topic}`));
    this._handlers.set(topic, normalizeHandlers(handlers));
    return this._call('subscribe', { topic }).catch((e) => {
      this._handlers.delete(topic);
      throw e;
    });
  }

  unsubscribe(topic) {
    if (!this._handlers.delete(topic)) return Promise.reject(new PubgateError('not_subscribed', `not subscribed to ${topic}`));
    return this._call('unsubscribe', { topic });
  }

  publish(topic, data) {
    return this._call('publish', { topic, data });
  }

  position(topic) {
    return this._call('position', { topic });
  }

  topics() {
    return [...this._handlers.keys()];
  }

  close() {
    this._port.postMessage({ t: 'bye' });
    this._port.close();
    this._state = 'closed';
  }

  async _onWorker(m) {
    switch (m.t) {
      case 'reply': {
        const c = this._calls.get(m.id);
        if (!c) return;
        this._calls.delete(m.id);
        if (m.error) c.reject(new PubgateError(m.error.code, m.error.message));
        else c.resolve(m.value);
        break;
      }
      case 'event':
        if (m.event === 'connected') this._state = 'open';
        if (m.event === 'disconnected') this._state = m.arg && m.arg.willReconnect === false ? 'closed' : 'waiting';
        this.emit(m.event, m.event === 'error' ? new PubgateError(m.arg.code || 'error', m.arg.message) : m.arg);
        break;
      case 'call': {
        const h = this._handlers.get(m.topic);
        const fn = h && h[m.name];
        if (typeof fn === 'function') fn(m.arg, m.msg);
        break;
      }
      case 'getToken':
        try {
          const token = this._getToken ? await this._getToken() : null;
          this._port.postMessage({ t: 'token', id: m.id, token });
        } catch (e) {
          this._port.postMessage({ t: 'token', id: m.id, error: String(e) });
        }
        break;
      default:
        break;
    }
  }
}
