// SharedWorker side of `connect(url, {share: true})`: one PubgateClient for every tab of an origin.
// Each tab talks to it over a MessagePort; a topic is subscribed once on the gateway whichever number
// of tabs want it, and each message is passed to every tab that wants it.
import { PubgateClient } from './pubgate.js';

const clients = new Map(); // url -> {client, ports: Set, topics: Map<topic, Set<port>>, tokenWaits}
let nextTokenId = 1;

function errorOf(e) {
  return { code: (e && e.code) || 'error', message: (e && e.message) || String(e) };
}

function hub(url, options, port) {
  let h = clients.get(url);
  if (h) return h;
  h = { ports: new Set(), topics: new Map(), tokenWaits: new Map(), tokenPorts: new Set() };
  const getToken = () =>
    new Promise((resolve, reject) => {
      const asker = [...h.tokenPorts][0];
      if (!asker) return resolve(null);
      const id = nextTokenId++;
      h.tokenWaits.set(id, { resolve, reject });
      asker.postMessage({ t: 'getToken', id });
    });
  h.client = new PubgateClient(url, { ...options, window: null, getToken: port.hasToken ? getToken : undefined });
  for (const event of ['connected', 'disconnected', 'error', 'resumed']) {
    h.client.on(event, (arg) => {
      const payload = event === 'error' ? errorOf(arg) : arg;
      for (const p of h.ports) p.postMessage({ t: 'event', event, arg: payload });
    });
  }
  h.client.connect();
  clients.set(url, h);
  return h;
}

function fanout(h, topic, name) {
  return (arg, msg) => {
    for (const p of h.topics.get(topic) || []) p.postMessage({ t: 'call', topic, name, arg, msg });
  };
}

function drop(h, port) {
  h.ports.delete(port);
  h.tokenPorts.delete(port);
  for (const [topic, ports] of h.topics) {
    if (ports.delete(port) && ports.size === 0) {
      h.topics.delete(topic);
      h.client.unsubscribe(topic).catch(() => undefined);
    }
  }
}

self.onconnect = (e) => {
  const port = e.ports[0];
  let h = null;
  port.onmessage = async (ev) => {
    const m = ev.data;
    const reply = (value) => port.postMessage({ t: 'reply', id: m.id, value });
    const fail = (err) => port.postMessage({ t: 'reply', id: m.id, error: errorOf(err) });
    try {
      switch (m.t) {
        case 'hello':
          port.hasToken = m.hasToken;
          h = hub(m.url, m.options, port);
          h.ports.add(port);
          if (m.hasToken) h.tokenPorts.add(port);
          if (h.client.state === 'open') port.postMessage({ t: 'event', event: 'connected', arg: { url: m.url } });
          break;
        case 'token': {
          const w = h && h.tokenWaits.get(m.id);
          if (!w) break;
          h.tokenWaits.delete(m.id);
          if (m.error) w.reject(new Error(m.error));
          else w.resolve(m.token);
          break;
        }
        case 'subscribe': {
          let ports = h.topics.get(m.topic);
          if (ports) {
            ports.add(port);
            const pos = h.client.position(m.topic);
            reply({ topic: m.topic, epoch: pos ? pos.epoch : null, offset: pos ? pos.offset : null, shared: true });
            break;
          }
          ports = new Set([port]);
          h.topics.set(m.topic, ports);
          const handlers = {
            onMessage: fanout(h, m.topic, 'onMessage'),
            onGap: fanout(h, m.topic, 'onGap'),
            onRecoverFailed: fanout(h, m.topic, 'onRecoverFailed'),
          };
          try {
            reply(await h.client.subscribe(m.topic, handlers));
          } catch (err) {
            if (h.topics.get(m.topic) === ports) h.topics.delete(m.topic);
            fail(err);
          }
          break;
        }
        case 'unsubscribe': {
          const ports = h.topics.get(m.topic);
          if (ports && ports.delete(port) && ports.size === 0) {
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
        case 'bye':
          if (h) drop(h, port);
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
