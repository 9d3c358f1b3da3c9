// One connection for every tab of an origin: the tab side of the SharedWorker in pubgate-worker.js.
// `connect()` picks it where SharedWorker exists and falls back to a plain PubgateClient elsewhere.
import { PubgateClient } from './pubgate.js';
import { Emitter, PubgateError, normalizeHandlers } from './pubgate-util.js';

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

/** A random name for this tab's Web Lock: the worker learns of the tab's end when the lock is freed. */
function tabLockName() {
  const rnd = globalThis.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now();
  return 'pubgate-tab-' + rnd;
}

class SharedClient extends Emitter {
  constructor(url, options) {
    super();
    this.url = url;
    this.shared = true;
    this._workerUrl = options.workerUrl || new URL('./pubgate-worker.js', import.meta.url);
    const { token, getToken, WebSocket: _ws, window: _w, storage: _s, ...plain } = options;
    this._nextId = 1;
    this._calls = new Map();
    this._handlers = new Map();
    this._positions = new Map(); // topic -> {epoch, offset} this tab has seen: its resume point for a new worker
    this._state = 'connecting';
    this._getToken = typeof token === 'function' ? token : getToken || (typeof token === 'string' ? () => token : null);
    this._workerOptions = {};
    for (const [k, v] of Object.entries(plain)) if (typeof v !== 'function' && k !== 'workerUrl') this._workerOptions[k] = v;
    this._tabLock = null;
    this._start();
    if (typeof addEventListener === 'function') {
      // A page kept in the back/forward cache may come back: keep its subscriptions. A tab that is
      // killed or crashes never sees pagehide; its Web Lock tells the worker instead.
      this._onPagehide = (ev) => {
        if (!ev || !ev.persisted) this._port.postMessage({ t: 'bye' });
      };
      this._onOnline = () => this._port.postMessage({ t: 'online' });
      addEventListener('pagehide', this._onPagehide);
      addEventListener('online', this._onOnline);
    }
  }

  /** Starts (or joins) the worker and says hello on a fresh port. */
  _start() {
    this._worker = new SharedWorker(this._workerUrl, { type: 'module', name: 'pubgate ' + this.url });
    const port = (this._port = this._worker.port);
    port.onmessage = (ev) => this._port === port && this._onWorker(ev.data);
    port.start();
    port.postMessage({ t: 'hello', url: this.url, options: this._workerOptions, hasToken: !!this._getToken });
    this._holdTabLock(port);
  }

  /**
   * Holds a lock for this tab's whole life and tells the worker its name: the worker waits on it and
   * so learns of a tab killed without pagehide. One lock per tab, told to each worker it starts.
   */
  _holdTabLock(port) {
    const locks = globalThis.navigator && navigator.locks;
    if (!locks || typeof locks.request !== 'function') return; // pagehide only
    if (this._tabLock) {
      this._tabLock.then((name) => port.postMessage({ t: 'lock', name }));
      return;
    }
    const name = tabLockName();
    this._releaseLock = null;
    this._tabLock = new Promise((held) => {
      locks
        .request(name, () => {
          held(name);
          return new Promise((resolve) => (this._releaseLock = resolve));
        })
        .catch(() => undefined);
    });
    this._tabLock.then((n) => port.postMessage({ t: 'lock', name: n }));
  }

  /** Waits on the worker's own lock: granted when the worker dies (its process crashed or was killed). */
  _watchWorker(port, name) {
    const locks = globalThis.navigator && navigator.locks;
    if (!locks || typeof locks.request !== 'function') return;
    locks.request(String(name), () => this._port === port && this._workerGone()).catch(() => undefined);
  }

  /**
   * The worker died: start a new one and subscribe every topic again from the position this tab saw,
   * so its handlers get what was published meanwhile from history, once.
   */
  _workerGone() {
    if (this._state === 'closed') return;
    this._state = 'waiting';
    this.emit('disconnected', { code: 1006, reason: 'shared worker gone', willReconnect: true, delay: 0 });
    this._start();
    // Subscribes still waiting go to the new worker (same id, same promise); other calls may or may
    // not have been done, like a publish on a connection that closed: they fail.
    const waiting = new Set();
    for (const [id, call] of this._calls) {
      if (call.t === 'subscribe') {
        waiting.add(call.args.topic);
        this._port.postMessage({ t: 'subscribe', id, ...call.args });
      } else {
        this._calls.delete(id);
        call.reject(new PubgateError('disconnected', 'the shared worker went away'));
      }
    }
    for (const topic of this._handlers.keys()) {
      if (waiting.has(topic)) continue;
      const since = this._positions.get(topic) || null;
      this._call('subscribe', { topic, since }).then(
        (ack) => {
          if (since) this.emit('resumed', { topic, since, epoch: ack.epoch, offset: ack.offset, recovered: ack.recovered !== false });
        },
        (e) => this.emit('error', e),
      );
    }
  }

  /** Remembers the last position of `topic` this tab saw; false for a message it already had. */
  _advance(topic, name, arg, msg) {
    if (name === 'onRecoverFailed' && arg) this._positions.set(topic, { epoch: arg.epoch, offset: arg.offset });
    if (name !== 'onMessage' || !msg || !Number.isSafeInteger(msg.offset)) return true;
    const pos = this._positions.get(topic);
    const epoch = typeof msg.epoch === 'string' ? msg.epoch : pos && pos.epoch;
    if (pos && epoch === pos.epoch && msg.offset <= pos.offset) return false;
    this._positions.set(topic, { epoch, offset: msg.offset });
    return true;
  }

  get state() {
    return this._state;
  }

  _call(t, args) {
    if (this._state === 'closed') return Promise.reject(new PubgateError('closed', 'client closed'));
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._calls.set(id, { resolve, reject, t, args });
      this._port.postMessage({ t, id, ...args });
    });
  }

  /** As `PubgateClient.subscribe`; `options.since` resumes from a known position, from the worker's recent messages when another tab already has the topic. */
  subscribe(topic, handlers, options = {}) {
    if (/[*>]/.test(topic)) {
      return Promise.reject(new PubgateError('unsupported', 'wildcard subscriptions are not shared between tabs yet: use a PubgateClient of its own'));
    }
    if (this._handlers.has(topic)) return Promise.reject(new PubgateError('already_subscribed', `already subscribed to ${topic}`));
    this._handlers.set(topic, normalizeHandlers(handlers));
    const since = options.since ? { epoch: String(options.since.epoch), offset: Number(options.since.offset) } : null;
    return this._call('subscribe', { topic, since }).then(
      (ack) => {
        const pos = this._positions.get(topic);
        // Messages may have come before this reply; they know the offset, the ack knows the epoch.
        if (ack && typeof ack.epoch === 'string') {
          if (!pos || ack.recovered === false) this._positions.set(topic, { epoch: ack.epoch, offset: ack.offset });
          else if (pos.epoch == null) pos.epoch = ack.epoch;
        }
        return ack;
      },
      (e) => {
        this._handlers.delete(topic);
        throw e;
      },
    );
  }

  unsubscribe(topic) {
    if (!this._handlers.delete(topic)) return Promise.reject(new PubgateError('not_subscribed', `not subscribed to ${topic}`));
    this._positions.delete(topic);
    return this._call('unsubscribe', { topic });
  }

  publish(topic, data) {
    return this._call('publish', { topic, data });
  }

  /** Unlike `PubgateClient.position` this resolves asynchronously: the position lives in the worker. */
  position(topic) {
    return this._call('position', { topic });
  }

  /** Reconnects the shared connection at once if it is waiting out a backoff. */
  reconnect() {
    this._port.postMessage({ t: 'online' });
  }

  topics() {
    return [...this._handlers.keys()];
  }

  close() {
    if (this._state === 'closed') return;
    this._port.postMessage({ t: 'bye' });
    this._port.close();
    if (this._releaseLock) this._releaseLock();
    if (typeof removeEventListener === 'function') {
      removeEventListener('pagehide', this._onPagehide);
      removeEventListener('online', this._onOnline);
    }
    this._state = 'closed';
    for (const c of this._calls.values()) c.reject(new PubgateError('closed', 'client closed'));
    this._calls.clear();
  }

  _dispatch(topic, name, arg, msg) {
    const h = this._handlers.get(topic);
    const fn = h && h[name];
    if (typeof fn !== 'function') return;
    try {
      fn(arg, msg);
    } catch (e) {
      this.emit('error', e);
    }
  }

  async _onWorker(m) {
    if (!m || typeof m !== 'object') return;
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
        if (m.event === 'unsubscribed' && m.arg) this._handlers.delete(m.arg.topic);
        this.emit(m.event, m.event === 'error' ? new PubgateError(m.arg.code || 'error', m.arg.message) : m.arg);
        break;
      case 'call':
        if (this._handlers.has(m.topic) && this._advance(m.topic, m.name, m.arg, m.msg)) this._dispatch(m.topic, m.name, m.arg, m.msg);
        break;
      case 'worker':
        this._watchWorker(this._port, m.lock);
        break;
      case 'getToken':
        try {
          const token = this._getToken ? await this._getToken() : null;
          this._port.postMessage({ t: 'token', id: m.id, token });
        } catch (e) {
          this._port.postMessage({ t: 'token', id: m.id, error: String((e && e.message) || e) });
        }
        break;
      default:
        break;
    }
  }
}
