// SharedWorker side of `connect(url, {share: true})`: one PubgateClient for every tab of an origin.
// Each tab talks to it over a MessagePort; a topic is subscribed once on the gateway whichever number
// of tabs want it, and each message is passed to every tab that wants it. A tab leaves by `bye`
// (pagehide, close()) or, when it is killed or crashes, by the release of its Web Lock.
import { PubgateClient } from './pubgate.js';
import { isOffset } from './pubgate-util.js';

/** Messages kept per topic so a tab joining a topic another tab has can resume with `since`. */
const REPLAY_KEEP = 1000;
const hubs = new Map(); // url -> {client, ports: Set, topics: Map<topic, Topic>, tokenWaits: Map}
let nextTokenId = 1;

/**
 * A lock this worker holds for its whole life; each tab waits on it, so when the worker dies (its
 * process crashed or was killed) the tabs start a new one and resume from what they saw.
 */
const workerLock = new Promise((held) => {
  const locks = self.navigator && navigator.locks;
  if (!locks || typeof locks.request !== 'function') return held(null);
  const name = 'pubgate-worker-' + (self.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
  locks.request(name, () => (held(name), new Promise(() => {}))).catch(() => held(null));
});

function errorOf(e) {
  return { code: (e && e.code) || 'error', message: (e && e.message) || String(e) };
}

/** The worker's connection for `url`, created by the first tab that says hello. */
function hub(url, options, hasToken) {
  let h = hubs.get(url);
  if (h) return h;
  h = { url, ports: new Set(), topics: new Map(), tokenWaits: new Map(), tokenPorts: new Set() };
  // Ask a tab that has a token callback; a tab that dies while asked is answered by the token timeout.
  const getToken = () =>
    new Promise((resolve, reject) => {
      const asker = [...h.tokenPorts][0];
      if (!asker) return resolve(null);
      const id = nextTokenId++;
      h.tokenWaits.set(id, { resolve, reject, port: asker });
      asker.postMessage({ t: 'getToken', id });
    });
  // No persist in the worker (no sessionStorage there): its connection outlives any one tab anyway.
  h.client = new PubgateClient(url, { ...options, persist: undefined, window: null, getToken: hasToken ? getToken : undefined });
  for (const event of ['connected', 'disconnected', 'error', 'resumed']) {
    h.client.on(event, (arg) => {
      const payload = event === 'error' ? errorOf(arg) : arg;
      for (const p of h.ports) p.postMessage({ t: 'event', event, arg: payload });
    });
  }
  h.client.on('unsubscribed', (arg) => {
    const t = h.topics.get(arg.topic);
    h.topics.delete(arg.topic);
    for (const p of t ? t.ports : []) p.postMessage({ t: 'event', event: 'unsubscribed', arg });
  });
  h.client.connect();
  hubs.set(url, h);
  return h;
}

/** Passes one handler call of `topic` to every tab that has it, and keeps recent messages for late joiners. */
function fanout(h, topic, name) {
  return (arg, msg) => {
    const t = h.topics.get(topic);
    if (!t) return;
    if (name === 'onMessage' && msg && isOffset(msg.offset)) {
      t.recent.push({ arg, msg });
      if (t.recent.length > REPLAY_KEEP) t.recent.shift();
    }
    if (name === 'onGap' || name === 'onRecoverFailed') t.recent = []; // the kept run no longer joins up
    for (const p of t.ports) p.postMessage({ t: 'call', topic, name, arg, msg });
  };
}

/**
 * A tab joins a topic the worker already has: from now on it gets every message after the current
 * position, and nothing from before unless it asked with `since` (served from the recent messages,
 * or answered `recovered:false` when they do not reach back that far). Returns the ack and the
 * handler calls the tab gets right after it.
 */
function join(h, t, port, topic, since) {
  const pos = h.client.position(topic);
  const ack = { topic, epoch: pos ? pos.epoch : null, offset: pos ? pos.offset : null, shared: true };
  if (!since) {
    t.ports.add(port);
    return { ack, after: [] };
  }
  const replay = t.recent.filter((r) => r.msg.offset > since.offset);
  const reaches = pos && since.epoch === pos.epoch && since.offset <= pos.offset && (since.offset === pos.offset || (replay.length && replay[0].msg.offset === since.offset + 1));
  t.ports.add(port);
  if (!reaches) {
    return { ack: { ...ack, recovered: false }, after: [{ name: 'onRecoverFailed', arg: { topic, epoch: ack.epoch, offset: ack.offset, since } }] };
  }
  const after = replay.map((r) => ({ name: 'onMessage', arg: r.arg, msg: r.msg }));
  return { ack: { ...ack, epoch: since.epoch, offset: since.offset, recovered: true }, after };
}

function drop(h, port) {
  if (!h.ports.delete(port)) return;
  h.tokenPorts.delete(port);
  for (const [id, w] of h.tokenWaits) {
    if (w.port === port) {
      h.tokenWaits.delete(id);
      w.reject(new Error('the tab asked for a token went away'));
    }
  }
  for (const [topic, t] of h.topics) {
    if (t.ports.delete(port) && t.ports.size === 0) {
      h.topics.delete(topic);
      h.client.unsubscribe(topic).catch(() => undefined);
    }
  }
  if (h.ports.size === 0) {
    h.client.close();
    hubs.delete(h.url);
  }
}

async function subscribe(h, port, topic, since) {
  let t = h.topics.get(topic);
  if (t) {
    await t.ready; // the first tab's subscribe is acked: positions are known
    if (h.topics.get(topic) === t) return join(h, t, port, topic, since);
  }
  t = { ports: new Set([port]), recent: [], ready: null };
  h.topics.set(topic, t);
  const handlers = {};
  for (const name of ['onMessage', 'onGap', 'onRecoverFailed', 'onUnsubscribed']) handlers[name] = fanout(h, topic, name);
  t.ready = h.client.subscribe(topic, handlers, since ? { since } : {});
  try {
    return { ack: await t.ready, after: [] };
  } catch (err) {
    if (h.topics.get(topic) === t) h.topics.delete(topic);
    throw err;
  }
}

self.onconnect = (e) => {
  const port = e.ports[0];
  let h = null;
  port.onmessage = async (ev) => {
    const m = ev.data || {};
    const reply = (value) => port.postMessage({ t: 'reply', id: m.id, value });
    const fail = (err) => port.postMessage({ t: 'reply', id: m.id, error: errorOf(err) });
    if (!h && m.t !== 'hello') return fail({ code: 'bad_request', message: 'hello first' });
    try {
      switch (m.t) {
        case 'hello':
          if (h) break;
          h = hub(String(m.url), m.options || {}, !!m.hasToken);
          h.ports.add(port);
          if (m.hasToken) h.tokenPorts.add(port);
          if (h.client.state === 'open') port.postMessage({ t: 'event', event: 'connected', arg: { url: h.url } });
          workerLock.then((lock) => lock && port.postMessage({ t: 'worker', lock }));
          break;
        case 'lock':
          // Granted only when the tab's context is gone: a tab that never said bye.
          if (self.navigator && navigator.locks) navigator.locks.request(String(m.name), () => drop(h, port)).catch(() => undefined);
          break;
        case 'token': {
          const w = h.tokenWaits.get(m.id);
          if (!w) break;
          h.tokenWaits.delete(m.id);
          if (m.error) w.reject(new Error(m.error));
          else w.resolve(m.token);
          break;
        }
        case 'subscribe': {
          const since = m.since && typeof m.since.epoch === 'string' && isOffset(m.since.offset) ? m.since : null;
          const { ack, after } = await subscribe(h, port, m.topic, since);
          // Between join() and here only microtasks ran: no live message reached the port yet, so the
          // reply, then the replayed messages, then live ones arrive in order.
          reply(ack);
          for (const a of after) port.postMessage({ t: 'call', topic: m.topic, ...a });
          break;
        }
        case 'unsubscribe': {
          const t = h.topics.get(m.topic);
          if (t && t.ports.delete(port) && t.ports.size === 0) {
            h.topics.delete(m.topic);
            await h.client.unsubscribe(m.topic);
          }
          reply(null);
          break;
        }
        case 'publish':
          reply(await h.client.publish(m.topic, m.data));
          break;
        case 'position':
          reply(h.client.position(m.topic));
          break;
        case 'online':
          h.client.reconnect();
          break;
        case 'bye':
          drop(h, port);
          port.close();
          break;
        default:
          break;
      }
    } catch (err) {
      fail(err);
    }
  };
  port.start();
};
