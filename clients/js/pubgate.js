// pubgate JavaScript client: one WebSocket, automatic reconnects, resume with `since`, no duplicates.
// Dependency-free ES module for browsers, and for Node given a WebSocket implementation.
// Protocol: docs/protocol.md; the recovery algorithm it follows: docs/recovery.md. This file is the
// connection; pubgate-util.js holds its timing and errors, pubgate-shared.js the tab-sharing client.
import {
  DEFAULTS,
  CLOSE_AUTH,
  CLOSE_GOING_AWAY,
  RETRYABLE,
  Emitter,
  PositionStore,
  PubgateError,
  backoffDelay,
  fetchToken,
  deliverToWildcards,
  gapToWildcards,
  isOffset,
  isWildcard,
  normalizeHandlers,
  refreshDelay,
  sessionStore,
  tokenExpiry,
} from './pubgate-util.js';

/** The longest delay timers take (2^31 - 1 ms). */
const MAX_TIMER = 2147483647;

export { DEFAULTS, CLOSE_AUTH, CLOSE_GOING_AWAY, PubgateError, PositionStore, backoffDelay, refreshDelay, tokenExpiry } from './pubgate-util.js';
export { connect } from './pubgate-shared.js';

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
    this._pingTimer = null;
    this._opening = 0; // counts connection attempts (see _open)
    this._onOnline = () => this.reconnect();
    this._store = new PositionStore(options.persist === 'session' ? sessionStore(options) : null, url);
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

  /**
   * Reconnects at once if the client is waiting out a backoff (the network came back); otherwise
   * does nothing. The browser's `online` event calls it; a SharedWorker calls it for its tabs.
   */
  reconnect() {
    if (this._state === 'waiting') this._reconnectNow();
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
    this._opening++; // an attempt still fetching its token opens nothing
    this._failPending(new PubgateError('closed', 'client closed'), () => true);
    // A subscribe still waiting for its first ack (the server never answered) ends here too, and
    // is forgotten: its caller was told it failed, so a later connect() must not revive it.
    for (const [topic, sub] of [...this._subs]) {
      if (!sub.first) continue;
      sub.first.reject(new PubgateError('closed', 'client closed before the subscribe was acknowledged'));
      sub.first = null;
      this._subs.delete(topic);
      this._store.remove(topic);
    }
    this.emit('disconnected', { code: 1000, reason: 'client closed', willReconnect: false });
  }

  /**
   * Subscribes to `topic`. `handlers` is a function (each message's data, then the message) or
   * `{onMessage, onGap, onRecoverFailed}`. `options.since = {epoch, offset}` resumes from a known position.
   * Resolves with the first ack; rejects (and forgets the topic) on a refusal or a timeout.
   */
  subscribe(topic, handlers, options = {}) {
    if (this._subs.has(topic)) return Promise.reject(new PubgateError('already_subscribed', `already subscribed to ${topic}`));
    // With `persist: 'session'` a topic this page had before a reload resumes where it left off.
    // A wildcard resumes as a whole from the `time` of its last ack and the positions it saw
    // (docs/topics.md), when the server's ack offers a `time`.
    const wild = isWildcard(topic);
    const since = wild ? null : options.since || this._store.load(topic);
    const sub = {
      topic,
      wild, // a wildcard: `seen` holds each concrete topic's last (epoch, offset), for dedupe
      seen: wild ? new Map() : null,
      time: null, // a wildcard: the `time` of its last ack, to resume from
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
    this._store.remove(topic);
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
    for (const t of ['_retryTimer', '_refreshTimer', '_connectTimer', '_pingTimer']) {
      if (this[t] !== null) this._clearTimeout(this[t]);
      this[t] = null;
    }
  }

  async _currentToken() {
    // A token that expired while the client waited (a laptop asleep, a long outage) would only be
    // refused: fetch a fresh one instead.
    const exp = tokenExpiry(this._token);
    if (exp !== null && exp <= this._now() + 1000) this._tokenStale = true;
    if (this._getToken && (this._token === null || this._tokenStale)) {
      this._token = await fetchToken(this._getToken, this.opts.tokenTimeout, this._setTimeout, this._clearTimeout);
      this._tokenStale = false;
    }
    return this._token;
  }

  async _open() {
    // A close() and connect() while the token is fetched start another attempt: only the latest
    // one may open a socket (the other would be left open, unseen).
    const attempt = ++this._opening;
    let token;
    try {
      token = await this._currentToken();
    } catch (e) {
      if (attempt !== this._opening) return;
      this.emit('error', e);
      this._scheduleReconnect(backoffDelay(this._attempt++, this.opts.backoffBase, this.opts.backoffMax, this._random));
      return;
    }
    if (this._state !== 'connecting' || attempt !== this._opening) return;
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
    this._armPing(ws);
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
    if (this._pingTimer !== null) this._clearTimeout(this._pingTimer);
    this._pingTimer = null;
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
    // A browser cannot see why a handshake failed: a 401 for a revoked or rotated token looks like a
    // network error. With a callback, the next attempt asks for a new token rather than repeat this one.
    if (!wasOpen && this._getToken) this._tokenStale = true;
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
    // The floor keeps a callback that hands out nearly expired tokens from turning this into a busy loop.
    this._armRefresh(Math.max(delay, this.opts.minRefreshInterval));
  }

  /**
   * Pings every `pingInterval` while open: a connection whose peer went silent (a frozen node, a
   * partition that drops packets) sends the client nothing, and TCP alone would keep it "open" for
   * a long time. No pong within `ackTimeout` drops it, so the client reconnects and resumes.
   */
  _armPing(ws) {
    if (!(this.opts.pingInterval > 0)) return;
    this._pingTimer = this._setTimeout(() => {
      this._pingTimer = null;
      if (this._ws !== ws || this._state !== 'open') return;
      this._request({ op: 'ping' }, 'ping', { internal: true }).then(
        () => {
          if (this._ws === ws) this._armPing(ws);
        },
        (e) => {
          if (this._ws === ws && e.code === 'timeout') this._abandon(new PubgateError('timeout', 'no pong from the server: reconnecting'));
        },
      );
    }, this.opts.pingInterval);
  }

  _armRefresh(delay) {
    const ws = this._ws;
    if (this._refreshTimer !== null) this._clearTimeout(this._refreshTimer);
    // Timers fire at once past 2^31 - 1 ms (24.8 days): a long-lived token waits in steps.
    const step = Math.min(delay, MAX_TIMER);
    this._refreshTimer = this._setTimeout(() => {
      this._refreshTimer = null;
      if (delay > step) this._armRefresh(delay - step);
      else this._refresh(ws);
    }, step);
  }

  /** Fetches a token and sends `refresh` on `ws`; a failed fetch is retried while the old token lasts. */
  async _refresh(ws) {
    const retry = (e) => {
      this.emit('error', e);
      // At the old token's expiry the server closes with 4001 and the reconnect fetches a token anyway.
      if (this._ws === ws && this._state === 'open') this._armRefresh(Math.max(this.opts.minRefreshInterval, backoffDelay(2, this.opts.backoffBase, this.opts.backoffMax, this._random)));
    };
    let token;
    try {
      token = await fetchToken(this._getToken, this.opts.tokenTimeout, this._setTimeout, this._clearTimeout);
    } catch (e) {
      return retry(e);
    }
    const exp = tokenExpiry(token);
    if (token === null || (exp !== null && exp <= this._now())) return retry(new PubgateError('token', 'the token callback returned no token or an expired one'));
    this._token = token;
    this._tokenStale = false;
    if (this._ws !== ws || this._state !== 'open') return; // the next connection opens with it
    // A gateway without the refresh op answers unknown_op: the new token is used at the next connect.
    this._request({ op: 'refresh', token }, 'refresh', { internal: true }).catch((e) => {
      if (!['unknown_op', 'disconnected', 'closed'].includes(e.code)) this.emit('error', e);
    });
    this._scheduleRefresh();
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
    const since = sub.wild ? wildcardSince(sub) : sub.offset !== null ? { epoch: sub.epoch, offset: sub.offset } : null;
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
      this._abandon(err);
      return;
    }
    this._subs.delete(sub.topic);
    if (sub.first) sub.first.reject(err);
    else this.emit('error', err);
    sub.first = null;
  }

  /** Drops the current connection after a timeout or a protocol violation; the usual backoff applies. */
  _abandon(err) {
    this.emit('error', err);
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.close(4000, err.code);
    } catch {
      /* already closing */
    }
    this._onClose(ws, { code: 4000, reason: err.code });
  }

  _onSubscribeAck(sub, ack, since) {
    if (sub.wild) {
      sub.inflight = false;
      sub.active = true;
      sub.resyncing = false;
      sub.time = isOffset(ack.time) ? ack.time : null;
      if (since && ack.recovered !== false) {
        // Resumed: what each topic missed follows, after the positions sent; keep them for dedupe.
        this.emit('resumed', { topic: sub.topic, since, recovered: true });
      } else {
        // Live from this ack: what the last connection saw says nothing about the topics now.
        sub.seen.clear();
        if (since) {
          this._call(sub, 'onRecoverFailed', { topic: sub.topic, since });
          this.emit('resumed', { topic: sub.topic, since, recovered: false });
        }
      }
      if (sub.first) sub.first.resolve(sub.time === null ? { topic: sub.topic } : { topic: sub.topic, time: sub.time });
      sub.first = null;
      return;
    }
    if (typeof ack.epoch !== 'string' || !isOffset(ack.offset)) {
      this._abandon(new PubgateError('bad_frame', `subscribe ack for ${sub.topic} without a valid epoch and offset`));
      return;
    }
    sub.inflight = false;
    sub.active = true;
    sub.resyncing = false;
    const info = { topic: sub.topic, epoch: ack.epoch, offset: ack.offset, since };
    if (since && ack.recovered === false) {
      // History could not cover what was missed: the handler reloads; go on live from the ack.
      sub.epoch = ack.epoch;
      sub.offset = ack.offset;
      this._store.save(sub.topic, sub.epoch, sub.offset);
      this._call(sub, 'onRecoverFailed', info);
    } else if (!since) {
      sub.epoch = ack.epoch;
      sub.offset = ack.offset;
      this._store.save(sub.topic, sub.epoch, sub.offset);
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
    // The protocol is JSON text frames; anything else comes from a broken or hostile server.
    if (typeof raw !== 'string' || raw.length > this.opts.maxFrameChars) {
      this.emit('error', new PubgateError('bad_frame', typeof raw === 'string' ? `a frame of ${raw.length} characters` : 'a binary frame'));
      return;
    }
    let f;
    try {
      f = JSON.parse(raw);
    } catch {
      f = null;
    }
    if (!f || typeof f !== 'object' || Array.isArray(f)) {
      this.emit('error', new PubgateError('bad_frame', 'a frame that is not a JSON object'));
      return;
    }
    switch (f.op) {
      case 'message':
        this._onMessage(f);
        break;
      case 'gap':
        this._onGap(f);
        break;
      case 'unsubscribed':
        this._onUnsubscribed(f);
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
    if (typeof m.topic !== 'string') return;
    deliverToWildcards(this._subs.values(), m, (...a) => this._call(...a));
    const sub = this._subs.get(m.topic);
    if (!sub || sub.resyncing) return;
    if (m.offset === undefined) {
      // A raw broker publish: no offset, delivered as is, the state does not move.
      this._call(sub, 'onMessage', m.data, m);
      return;
    }
    if (!isOffset(m.offset) || m.offset === 0 || (m.epoch !== undefined && typeof m.epoch !== 'string')) {
      this.emit('error', new PubgateError('bad_frame', `a message on ${m.topic} with an invalid offset or epoch`));
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
    this._store.save(sub.topic, sub.epoch, sub.offset);
    this._call(sub, 'onMessage', m.data, m);
  }

  /** The server ended a subscription (a refreshed token no longer allows it): forget it for good. */
  _onUnsubscribed(f) {
    const sub = this._subs.get(f.topic);
    if (!sub) return;
    this._subs.delete(f.topic);
    this._store.remove(f.topic);
    const err = new PubgateError(typeof f.reason === 'string' ? f.reason : 'unsubscribed', `the server ended the subscription to ${f.topic}`);
    if (sub.first) sub.first.reject(err);
    sub.first = null;
    this._call(sub, 'onUnsubscribed', { topic: f.topic, reason: f.reason });
    this.emit('unsubscribed', { topic: f.topic, reason: f.reason });
  }

  _onGap(g) {
    gapToWildcards(this._subs.values(), g, (...a) => this._call(...a));
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

/** Most topics a wildcard resume may name (the server refuses more). */
/** What a wildcard resume lists at most: the server takes 10,000 entries, but the whole frame must
 * also fit the server's `limits.max_message_size` (64 KiB by default), so the client stops adding
 * positions at about 48 KB; the topics left out are replayed from `time` and deduplicated. */
const MAX_RESUME_TOPICS = 10000;
const MAX_RESUME_BYTES = 48 * 1024;

/**
 * A wildcard's `since`: the time of its last ack and the last position of each topic seen whose
 * epoch is known (the others are replayed from that time and deduplicated by offset), or null when
 * the server offered no time (an older server: the wildcard goes on live).
 */
function wildcardSince(sub) {
  if (sub.time === null) return null;
  const topics = {};
  let n = 0;
  let bytes = 0;
  for (const [topic, p] of sub.seen) {
    if (typeof p.epoch !== 'string' || !isOffset(p.offset)) continue;
    // Roughly what the entry adds to the JSON: `"topic":{"epoch":"…","offset":N},`.
    bytes += topic.length + p.epoch.length + String(p.offset).length + 32;
    if (++n > MAX_RESUME_TOPICS || bytes > MAX_RESUME_BYTES) break;
    topics[topic] = { epoch: p.epoch, offset: p.offset };
  }
  return { time: sub.time, topics };
}
