// The client in Node (with the `ws` package: Node 20 has no global WebSocket) against real pubgate
// nodes on a real Redis: a node killed and started again on the same port, and JWT auth with short
// HS256 tokens minted here (refresh before expiry; the 4001 close when a refresh is withheld).
// Run by scripts/e2e-browser.sh: PUBGATE_BIN=… node --test clients/js/e2e/*.test.js
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import WebSocket from 'ws';
import { PubgateClient } from '../pubgate.js';
import { checkExactlyOnce, freePort, killAll, metric, publish, sleep, startNode, startRedis, stop, until } from './harness.mjs';

const SECRET = 'e2e-hs256-secret-of-at-least-32-bytes';
const API_KEY = 'e2e-publisher-key';
const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 JWT valid for `seconds` from now. */
function mint(seconds, claims = {}) {
  const body = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url({ sub: 'e2e', exp: Math.floor(Date.now() / 1000) + seconds, subscribe: ['jwt.>'], publish: ['jwt.>'], ...claims })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

/** `ws` with every frame the client sends recorded, so a test can see the refresh ops. */
function recordingSocket(sent) {
  return class extends WebSocket {
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  };
}

/** A client that records what each topic delivers, and its events. */
function observed(url, options) {
  const client = new PubgateClient(url, { WebSocket, backoffBase: 100, backoffMax: 1000, window: null, ...options });
  const got = {};
  const events = [];
  for (const e of ['connected', 'disconnected', 'error', 'resumed', 'unsubscribed']) client.on(e, (a) => events.push({ e, a, at: Date.now() }));
  const sub = (topic, extra = {}) => {
    got[topic] = [];
    return client.subscribe(topic, { onMessage: (_d, m) => got[topic].push(m.offset), ...extra });
  };
  return { client, got, events, sub };
}

let redis;
const nodes = [];
before(async () => {
  redis = await startRedis();
});
after(async () => {
  await Promise.all(nodes.map((n) => stop(n.child)));
  if (redis) await redis.stop();
  killAll();
});

test('a node killed and started again on the same port: resume with since, no loss, no duplicate', { timeout: 60000 }, async () => {
  const [pa, pb] = [await freePort(), await freePort()];
  let a = await startNode(redis.url, pa, 'node-a');
  const b = await startNode(redis.url, pb, 'node-b');
  nodes.push(a, b);
  const { client, got, events, sub } = observed(a.ws, { connect: true });
  try {
    const ack = await sub('restart.t');
    assert.equal(ack.offset, 0);
    for (let i = 1; i <= 20; i++) await publish(b.base, 'restart.t', { i });
    await until('20 live messages', () => got['restart.t'].length === 20, 10000);
    await stop(a.child, 'SIGKILL');
    for (let i = 21; i <= 50; i++) await publish(b.base, 'restart.t', { i }); // while node-a is down
    await until('the client sees the close', () => events.some((x) => x.e === 'disconnected'), 5000);
    a = await startNode(redis.url, pa, 'node-a');
    nodes.push(a);
    await until('all 50 after the restart', () => got['restart.t'].length >= 50, 20000);
    await sleep(300); // a duplicate would arrive right behind
    assert.equal(checkExactlyOnce('restart', got['restart.t'], 50), 0);
    const resumed = events.filter((x) => x.e === 'resumed');
    assert.deepEqual(resumed.map((x) => [x.a.since.offset, x.a.recovered]), [[20, true]]);
    assert.equal(client.position('restart.t').offset, 50);
  } finally {
    client.close();
  }
});

test('JWT: short tokens are refreshed on the live connection; a withheld refresh ends in 4001, a new token and a resume without loss', { timeout: 60000 }, async () => {
  const node = await startNode(redis.url, await freePort(), 'node-jwt', {
    PUBGATE__AUTH__JWT_SECRET: SECRET,
    PUBGATE__AUTH__API_KEYS: API_KEY,
    PUBGATE__AUTH__JWT_LEEWAY: '0s',
  });
  nodes.push(node);
  const sent = [];
  let mode = 'fresh';
  let minted = 0;
  let release = null;
  const token = () => {
    if (mode === 'withhold') return new Promise((r) => (release = r)); // a token service that hangs
    minted++;
    return mint(3);
  };
  const { client, got, events, sub } = observed(node.ws, { token, WebSocket: recordingSocket(sent), tokenTimeout: 3000, connect: true });
  await sub('jwt.t');
  const publisher = { n: 0, stop: false };
  const publishing = (async () => {
    // Bounded: at most 400 messages, 100 ms apart.
    while (!publisher.stop && publisher.n < 400) {
      await publish(node.base, 'jwt.t', { n: ++publisher.n }, API_KEY);
      await sleep(100);
    }
  })();
  try {
    // Phase 1: 3-second tokens for 7 seconds: refreshed in place, the connection never drops.
    await sleep(7000);
    const refreshes = sent.filter((f) => f.op === 'refresh');
    assert.ok(refreshes.length >= 3, `${refreshes.length} refresh ops in 7 s of 3 s tokens`);
    assert.ok(minted >= refreshes.length + 1);
    assert.deepEqual(events.filter((x) => x.e === 'disconnected' || x.e === 'error'), []);
    assert.equal(events.filter((x) => x.e === 'connected').length, 1);
    // Phase 2: the token service hangs: no refresh, the server closes with 4001 at exp.
    mode = 'withhold';
    const expiriesBefore = await metric(node.base, 'pubgate_token_expiries_total');
    await until('a 4001 close', () => events.some((x) => x.e === 'disconnected' && x.a.code === 4001), 8000);
    const mintedBefore = minted;
    mode = 'fresh'; // the reconnect asks for a new token instead of retrying the old one
    const closedAt = events.find((x) => x.e === 'disconnected').at;
    await until('reconnected', () => events.some((x) => x.e === 'connected' && x.at > closedAt), 10000);
    await sleep(1500); // messages keep coming on the new connection
    publisher.stop = true;
    await publishing;
    const total = publisher.n;
    await until(`all ${total} messages`, () => got['jwt.t'].length >= total, 10000).catch((e) => {
      const have = new Set(got['jwt.t']);
      const missing = Array.from({ length: total }, (_, i) => i + 1).filter((o) => !have.has(o));
      throw new Error(`${e.message}: missing ${JSON.stringify(missing)}; events ${JSON.stringify(events.map((x) => [x.e, x.a && (x.a.code ?? x.a.message ?? x.a.since)]))}`);
    });
    await sleep(300);
    assert.equal(checkExactlyOnce('jwt', got['jwt.t'], total), 0);
    assert.equal(await metric(node.base, 'pubgate_token_expiries_total'), expiriesBefore + 1);
    const resumed = events.filter((x) => x.e === 'resumed');
    assert.equal(resumed.length, 1);
    assert.equal(resumed[0].a.recovered, true);
    assert.ok(minted > mintedBefore, 'the reconnect fetched a new token');
  } finally {
    publisher.stop = true;
    await publishing;
    if (release) release(null);
    client.close();
  }
});

test('JWT: a refresh that narrows the token ends the subscriptions it no longer allows (unsubscribed frame)', { timeout: 30000 }, async () => {
  const node = await startNode(redis.url, await freePort(), 'node-jwt2', { PUBGATE__AUTH__JWT_SECRET: SECRET, PUBGATE__AUTH__API_KEYS: API_KEY });
  nodes.push(node);
  let claims = { subscribe: ['jwt.>', 'other.>'] };
  const { client, got, events, sub } = observed(node.ws, { token: () => mint(4, claims), connect: true });
  const ended = [];
  try {
    await sub('jwt.keep');
    await sub('other.b', { onUnsubscribed: (info) => ended.push(info) });
    claims = { subscribe: ['jwt.>'] };
    await until('the refresh ends other.b', () => ended.length === 1, 10000);
    assert.deepEqual(ended, [{ topic: 'other.b', reason: 'forbidden' }]);
    assert.deepEqual(client.topics(), ['jwt.keep']);
    await publish(node.base, 'other.b', { x: 1 }, API_KEY);
    await publish(node.base, 'jwt.keep', { x: 1 }, API_KEY);
    await until('jwt.keep still delivers', () => got['jwt.keep'].length === 1, 5000);
    assert.deepEqual(got['other.b'], []);
    assert.equal(events.filter((x) => x.e === 'disconnected').length, 0);
  } finally {
    client.close();
  }
});
