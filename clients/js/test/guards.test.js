// The client against a misbehaving world: token callbacks that hang, throw or hand out expired tokens,
// frames a broken or hostile server might send, server-ended subscriptions, and the resume store.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PubgateClient, PositionStore, DEFAULTS } from '../pubgate.js';
import { FakeClock, fakeSocketClass, flush } from './fakes.js';

function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeWS, sockets } = fakeSocketClass();
  const client = new PubgateClient('ws://gw/ws', { WebSocket: FakeWS, setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: () => clock.now, window: null, random: () => 0.5, ...options });
  const events = [];
  for (const e of ['connected', 'disconnected', 'error', 'resumed', 'unsubscribed']) client.on(e, (a) => events.push([e, a]));
  const errors = () => events.filter(([e]) => e === 'error').map(([, a]) => a.code);
  return { clock, sockets, client, events, errors };
}

const jwt = (claims) => {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b({ alg: 'HS256' })}.${b(claims)}.sig`;
};

async function open(ctx, topic = 't', epoch = 'E1', offset = 5, handlers = {}) {
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  const got = [];
  const p = ctx.client.subscribe(topic, { onMessage: (_d, m) => got.push(m.offset), ...handlers });
  const sub = ws.last('subscribe');
  ws.recv({ op: 'ack', id: sub.id, topic, epoch, offset });
  await p;
  return { ws, got };
}

test('a token callback that hangs, throws or returns a non-string is a typed error and retried with backoff', async () => {
  const answers = [() => new Promise(() => {}), () => Promise.reject(new Error('auth server down')), () => ({ not: 'a token' }), () => 'good'];
  let calls = 0;
  const ctx = setup({ token: () => answers[calls++](), tokenTimeout: 2000, backoffBase: 100, backoffMax: 100 });
  ctx.client.connect();
  await ctx.clock.advance(1999);
  assert.equal(ctx.sockets.length, 0, 'no socket without a token');
  await ctx.clock.advance(1);
  assert.deepEqual(ctx.errors(), ['token']);
  await ctx.clock.advance(200); // throws
  await ctx.clock.advance(200); // an object
  await ctx.clock.advance(200); // a string at last
  assert.deepEqual(ctx.errors(), ['token', 'token', 'token']);
  assert.equal(calls, 4);
  assert.equal(ctx.sockets.length, 1);
  assert.ok(ctx.sockets[0].url.endsWith('access_token=good'));
  ctx.client.close();
});

test('refreshes never come closer than minRefreshInterval; an expired token from the callback is not sent', async () => {
  let mode = 'short';
  const ctx = setup({ token: () => (mode === 'short' ? jwt({ exp: Math.floor(ctx.clock.now / 1000) + 1 }) : jwt({ exp: 1 })) });
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets[0];
  ws.open();
  await ctx.clock.advance(10_000);
  const refreshes = ws.sent.filter((f) => f.op === 'refresh');
  assert.ok(refreshes.length >= 5 && refreshes.length <= 10, `${refreshes.length} refreshes in 10 s of 1 s tokens`);
  mode = 'expired';
  const before = ws.sent.length;
  await ctx.clock.advance(10_000);
  assert.equal(ws.sent.filter((f, i) => i >= before && f.op === 'refresh').length, 0, 'an expired token is never sent');
  const errs = ctx.errors().filter((c) => c === 'token').length;
  assert.ok(errs >= 1 && errs <= 10, `${errs} token errors in 10 s`);
  ctx.client.close();
});

test('frames that are not JSON objects, binary or oversized are refused with bad_frame; nothing throws', async () => {
  const ctx = setup({ maxFrameChars: 1000 });
  const { ws, got } = await open(ctx);
  for (const data of ['null', '42', '"x"', '[]', '{', new ArrayBuffer(8), JSON.stringify({ op: 'message', topic: 't', offset: 6, data: 'x'.repeat(2000) })]) {
    ws.onmessage({ data });
  }
  assert.deepEqual(ctx.errors(), Array(7).fill('bad_frame'));
  ws.recv({ op: 'message', topic: 't', offset: 6, data: 1 });
  assert.deepEqual(got, [6], 'the connection still works');
  ctx.client.close();
});

test('messages with an invalid offset or epoch are refused, the position does not move', async () => {
  const ctx = setup();
  const { ws, got } = await open(ctx);
  for (const offset of [-1, 0, 1.5, '7', 1e300, null]) ws.recv({ op: 'message', topic: 't', offset, data: 1 });
  ws.recv({ op: 'message', topic: 't', offset: 6, epoch: 42, data: 1 });
  assert.equal(ctx.errors().length, 7);
  assert.deepEqual(got, []);
  assert.deepEqual(ctx.client.position('t'), { epoch: 'E1', offset: 5 });
  ws.recv({ op: 'message', topic: 't', offset: 6, data: 1 });
  assert.deepEqual(got, [6]);
  ctx.client.close();
});

test('a subscribe ack without a valid epoch and offset drops the connection and starts over', async () => {
  const ctx = setup();
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets[0];
  ws.open();
  const p = ctx.client.subscribe('t', () => undefined);
  ws.recv({ op: 'ack', id: ws.last('subscribe').id, topic: 't', offset: 'zero' });
  assert.equal(ws.closed.code, 4000);
  assert.ok(ctx.errors().includes('bad_frame'));
  await ctx.clock.advance(DEFAULTS.backoffBase);
  const ws2 = ctx.sockets[1];
  ws2.open();
  ws2.recv({ op: 'ack', id: ws2.last('subscribe').id, topic: 't', epoch: 'E', offset: 3 });
  assert.equal((await p).offset, 3);
  ctx.client.close();
});

test('an unsubscribed frame ends the subscription for good: onUnsubscribed, not resubscribed after a reconnect', async () => {
  const ctx = setup();
  const ended = [];
  const { ws } = await open(ctx, 'secret.t', 'E1', 5, { onUnsubscribed: (i) => ended.push(i) });
  ws.recv({ op: 'unsubscribed', topic: 'secret.t', reason: 'forbidden' });
  assert.deepEqual(ended, [{ topic: 'secret.t', reason: 'forbidden' }]);
  assert.deepEqual(ctx.client.topics(), []);
  assert.ok(ctx.events.some(([e, a]) => e === 'unsubscribed' && a.topic === 'secret.t'));
  ws.serverClose(1006);
  await ctx.clock.advance(DEFAULTS.backoffBase);
  ctx.sockets[1].open();
  assert.equal(ctx.sockets[1].last('subscribe'), undefined);
  ctx.client.close();
});

test('reconnect() skips the backoff only while waiting', async () => {
  const ctx = setup({ backoffBase: 60000, backoffMax: 60000 });
  ctx.client.reconnect(); // idle: nothing
  assert.equal(ctx.sockets.length, 0);
  const { ws } = await open(ctx);
  ctx.client.reconnect(); // open: nothing
  ws.serverClose(1006);
  assert.equal(ctx.client.state, 'waiting');
  for (let i = 0; i < 50; i++) ctx.client.reconnect(); // rapid toggles: one new socket
  await flush();
  assert.equal(ctx.sockets.length, 2);
  ctx.client.close();
});

function memoryStorage() {
  const m = new Map();
  return { m, getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), removeItem: (k) => m.delete(k) };
}

test("persist: 'session' keeps each topic's position, resumes a new client from it, forgets it on unsubscribe", async () => {
  const storage = memoryStorage();
  const a = setup({ persist: 'session', storage });
  const { ws } = await open(a, 't', 'E1', 5);
  ws.recv({ op: 'message', topic: 't', offset: 6, data: 1 });
  ws.recv({ op: 'message', topic: 't', offset: 7, data: 1 });
  a.client.close(); // a reload
  const b = setup({ persist: 'session', storage });
  b.client.connect();
  await flush();
  b.sockets[0].open();
  b.client.subscribe('t', () => undefined);
  assert.deepEqual(b.sockets[0].last('subscribe').since, { epoch: 'E1', offset: 7 });
  b.sockets[0].recv({ op: 'ack', id: b.sockets[0].last('subscribe').id, topic: 't', epoch: 'E1', offset: 7, recovered: true });
  const u = b.client.unsubscribe('t');
  b.sockets[0].recv({ op: 'ack', id: b.sockets[0].last('unsubscribe').id });
  await u;
  assert.equal(storage.m.size, 0);
  b.client.close();
  // Without persist nothing is stored; a store whose storage throws costs only the resume.
  const c = setup({ storage });
  await open(c);
  assert.equal(storage.m.size, 0);
  const boom = { getItem: () => { throw new Error('denied'); }, setItem: () => { throw new Error('quota'); }, removeItem: () => { throw new Error('denied'); } };
  const s = new PositionStore(boom, 'ws://gw/ws?access_token=x');
  s.save('t', 'E', 1);
  assert.equal(s.load('t'), null);
  s.remove('t');
  storage.setItem('pubgate:ws://gw/ws:t', '{"epoch":5,"offset":-1}');
  assert.equal(new PositionStore(storage, 'ws://gw/ws').load('t'), null, 'a tampered entry is ignored');
});

test('a token that expired while waiting, or one whose handshake failed, is fetched anew before the next attempt', async () => {
  let calls = 0;
  const ctx = setup({ token: () => jwt({ n: ++calls, exp: Math.floor(ctx.clock.now / 1000) + 60 }), backoffBase: 100, backoffMax: 100 });
  ctx.client.connect();
  await flush();
  ctx.sockets[0].open();
  ctx.sockets[0].serverClose(1006); // was open, token valid: reused
  await ctx.clock.advance(100);
  assert.equal(calls, 1);
  ctx.sockets[1].serverClose(1006); // never opened (a refused handshake looks like this): a new token
  await ctx.clock.advance(100);
  assert.equal(calls, 2);
  ctx.sockets[2].open();
  ctx.sockets[2].serverClose(1006);
  // Asleep for 2 minutes (past exp): the clock jumps and every timer runs late.
  ctx.clock.now += 120_000;
  for (const t of ctx.clock.timers.values()) t.at += 120_000;
  await ctx.clock.advance(100);
  assert.equal(calls, 3);
  assert.equal(ctx.sockets.length, 4);
  assert.notEqual(ctx.sockets[3].url, ctx.sockets[2].url);
  ctx.client.close();
});
