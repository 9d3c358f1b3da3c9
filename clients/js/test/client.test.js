import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PubgateClient, backoffDelay, tokenExpiry, refreshDelay, DEFAULTS } from '../pubgate.js';
import { FakeClock, fakeSocketClass, flush } from './fakes.js';

function setup(options = {}) {
  const clock = new FakeClock();
  const { FakeWS, sockets } = fakeSocketClass();
  const client = new PubgateClient('ws://gw/ws', {
    WebSocket: FakeWS,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: () => clock.now,
    window: null,
    pingInterval: 0, // the fake sockets answer nothing; the ping test turns it on
    ...options,
  });
  const events = [];
  for (const e of ['connected', 'disconnected', 'error', 'resumed']) client.on(e, (a) => events.push([e, a]));
  return { clock, sockets, client, events };
}

function jwt(claims) {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b({ alg: 'HS256' })}.${b(claims)}.sig`;
}

/** Connects, subscribes `topic` and acks it at (epoch, offset); returns the socket and what was delivered. */
async function subscribed(ctx, topic = 't', epoch = 'E1', offset = 5, extra = {}) {
  const got = [];
  const gaps = [];
  const failed = [];
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  const p = ctx.client.subscribe(topic, {
    onMessage: (d, m) => got.push(m.offset ?? d),
    onGap: (g) => gaps.push(g),
    onRecoverFailed: (i) => failed.push(i),
    ...extra,
  });
  const sub = ws.last('subscribe');
  assert.equal(sub.since, undefined, 'first subscribe has no since');
  ws.recv({ op: 'ack', id: sub.id, topic, epoch, offset });
  const ack = await p;
  assert.equal(ack.offset, offset);
  return { ws, got, gaps, failed };
}

test('backoff: full jitter within [0, min(max, base*2^n)), capped, and spread', () => {
  for (let n = 0; n < 20; n++) {
    const cap = Math.min(10000, 100 * 2 ** n);
    assert.equal(backoffDelay(n, 100, 10000, () => 0), 0);
    assert.ok(backoffDelay(n, 100, 10000, () => 0.999999) < cap);
    assert.ok(backoffDelay(n, 100, 10000, () => 0.999999) >= cap - 1);
  }
  assert.ok(backoffDelay(1000, 100, 10000, () => 0.999999) < 10000, 'huge attempts stay capped');
  // Spread: 1000 clients at attempt 6 land all over [0, 6400), not in one instant.
  const d = Array.from({ length: 1000 }, () => backoffDelay(6, 100, 10000));
  const buckets = new Array(8).fill(0);
  for (const x of d) buckets[Math.floor(x / 800)]++;
  for (const b of buckets) assert.ok(b > 60 && b < 200, `uneven jitter: ${buckets}`);
});

test('reconnect delays grow, reset after a stable connection, and a drain spreads the return', async () => {
  const ctx = setup({ random: () => 0.999, backoffBase: 100, backoffMax: 1000, stableAfter: 5000, drainSpread: 7000 });
  ctx.client.connect();
  await flush();
  const delays = [];
  for (let i = 0; i < 6; i++) {
    ctx.sockets.at(-1).serverClose(1006);
    delays.push(ctx.events.at(-1)[1].delay);
    await ctx.clock.advance(delays.at(-1));
    assert.equal(ctx.sockets.length, i + 2, 'one new socket per retry');
  }
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999]);
  // A connection that stayed up 5 s resets the backoff.
  ctx.sockets.at(-1).open();
  await ctx.clock.advance(5000);
  ctx.sockets.at(-1).serverClose(1006);
  assert.equal(ctx.events.at(-1)[1].delay, 99);
  await ctx.clock.advance(99);
  // A short-lived connection does not.
  ctx.sockets.at(-1).open();
  await ctx.clock.advance(100);
  ctx.sockets.at(-1).serverClose(1006);
  assert.equal(ctx.events.at(-1)[1].delay, 199);
  await ctx.clock.advance(199);
  // A drain (1001): a random moment within drainSpread.
  ctx.sockets.at(-1).open();
  await ctx.clock.advance(6000);
  ctx.sockets.at(-1).serverClose(1001);
  assert.equal(ctx.events.at(-1)[1].delay, 6993);
  ctx.client.close();
});

test('drain reconnects of many clients are spread over drainSpread', async () => {
  const clients = [];
  for (let i = 0; i < 200; i++) {
    const ctx = setup({ drainSpread: 5000 });
    ctx.client.connect();
    clients.push(ctx);
  }
  await flush();
  const out = [];
  for (const ctx of clients) {
    ctx.sockets[0].open();
    await ctx.clock.advance(6000);
    ctx.sockets[0].serverClose(1001);
    out.push(ctx.events.at(-1)[1].delay);
    ctx.client.close();
  }
  const min = Math.min(...out);
  const max = Math.max(...out);
  const firstSecond = out.filter((d) => d < 1000).length;
  assert.ok(min < 500 && max > 4500 && max < 5000, `spread ${min}..${max}`);
  assert.ok(firstSecond < 80, `${firstSecond} of 200 came back within the first second`);
});

test('online event reconnects at once', async () => {
  const listeners = {};
  const win = { addEventListener: (e, f) => (listeners[e] = f), removeEventListener: () => {} };
  const ctx = setup({ window: win, random: () => 0.999, backoffBase: 10000, backoffMax: 10000 });
  ctx.client.connect();
  await flush();
  ctx.sockets[0].serverClose(1006);
  assert.equal(ctx.client.state, 'waiting');
  listeners.online();
  await flush();
  assert.equal(ctx.sockets.length, 2);
  ctx.client.close();
});

test('resume: every topic resubscribes with since = last (epoch, offset) processed', async () => {
  const ctx = setup({ random: () => 0 });
  const { ws, got } = await subscribed(ctx, 'a', 'E1', 5);
  const pb = ctx.client.subscribe('b', () => {});
  ws.recv({ op: 'ack', id: ws.last('subscribe').id, topic: 'b', epoch: '0', offset: 0 });
  await pb;
  ws.recv({ op: 'message', topic: 'a', offset: 6, data: 1 });
  ws.recv({ op: 'message', topic: 'a', offset: 7, data: 2 });
  // b is empty: message 1 names its epoch, which the client learns.
  ws.recv({ op: 'message', topic: 'b', epoch: 'B9', offset: 1, data: 'x' });
  assert.deepEqual(ctx.client.position('a'), { epoch: 'E1', offset: 7 });
  assert.deepEqual(ctx.client.position('b'), { epoch: 'B9', offset: 1 });
  ws.serverClose(1006);
  await ctx.clock.advance(1);
  const ws2 = ctx.sockets.at(-1);
  assert.notEqual(ws2, ws);
  ws2.open();
  const subs = ws2.sent.filter((f) => f.op === 'subscribe');
  assert.deepEqual(
    subs.map((f) => [f.topic, f.since]),
    [
      ['a', { epoch: 'E1', offset: 7 }],
      ['b', { epoch: 'B9', offset: 1 }],
    ],
  );
  // recovered:true then the replay, with one duplicate at the seam that must not be delivered.
  ws2.recv({ op: 'ack', id: subs[0].id, topic: 'a', epoch: 'E1', offset: 7, recovered: true });
  ws2.recv({ op: 'message', topic: 'a', offset: 7, data: 2 });
  ws2.recv({ op: 'message', topic: 'a', offset: 8, data: 3 });
  ws2.recv({ op: 'message', topic: 'a', offset: 9, data: 4 });
  assert.deepEqual(got, [6, 7, 8, 9]);
  const resumed = ctx.events.filter(([e]) => e === 'resumed').map(([, a]) => [a.topic, a.since.offset, a.recovered]);
  assert.deepEqual(resumed, [['a', 7, true]]);
  assert.deepEqual(ctx.client.position('a'), { epoch: 'E1', offset: 9 });
  ctx.client.close();
});

test('a topic acked at the empty epoch "0" resumes from "0" before message 1 and learns the epoch after', async () => {
  const ctx = setup({ random: () => 0 });
  const { ws, got } = await subscribed(ctx, 'e', '0', 0);
  ws.serverClose(1006);
  await ctx.clock.advance(1);
  let ws2 = ctx.sockets.at(-1);
  ws2.open();
  const s = ws2.last('subscribe');
  assert.deepEqual(s.since, { epoch: '0', offset: 0 });
  ws2.recv({ op: 'ack', id: s.id, topic: 'e', epoch: '0', offset: 0, recovered: true });
  ws2.recv({ op: 'message', topic: 'e', epoch: 'N1', offset: 1, data: 1 });
  ws2.recv({ op: 'message', topic: 'e', offset: 2, data: 2 });
  assert.deepEqual(got, [1, 2]);
  assert.deepEqual(ctx.client.position('e'), { epoch: 'N1', offset: 2 });
  ctx.client.close();
});

test('dedupe: an offset already delivered is never delivered again; raw messages pass', async () => {
  const ctx = setup();
  const { ws, got } = await subscribed(ctx, 't', 'E', 10);
  for (const o of [11, 12, 11, 12, 10, 3, 13]) ws.recv({ op: 'message', topic: 't', offset: o, data: o });
  ws.recv({ op: 'message', topic: 't', data: 'raw' });
  assert.deepEqual(got, [11, 12, 13, 'raw']);
  ctx.client.close();
});

test('a hole in the offsets resubscribes with since (history first), messages in between dropped', async () => {
  const ctx = setup();
  const { ws, got, failed } = await subscribed(ctx, 't', 'E', 10);
  ws.recv({ op: 'message', topic: 't', offset: 11, data: 0 });
  ws.recv({ op: 'message', topic: 't', offset: 14, data: 0 });
  ws.recv({ op: 'message', topic: 't', offset: 15, data: 0 });
  const un = ws.last('unsubscribe');
  assert.equal(un.topic, 't');
  ws.recv({ op: 'ack', id: un.id, topic: 't' });
  await flush();
  const re = ws.last('subscribe');
  assert.deepEqual(re.since, { epoch: 'E', offset: 11 });
  ws.recv({ op: 'ack', id: re.id, topic: 't', epoch: 'E', offset: 11, recovered: true });
  for (const o of [12, 13, 14, 15]) ws.recv({ op: 'message', topic: 't', offset: o, data: o });
  assert.deepEqual(got, [11, 12, 13, 14, 15]);
  assert.equal(failed.length, 0);
  ctx.client.close();
});

test('gap frame: onGap, then unsubscribe + subscribe with since; recovered:false calls onRecoverFailed and goes on live', async () => {
  const ctx = setup();
  const { ws, got, gaps, failed } = await subscribed(ctx, 't', 'E1', 41);
  ws.recv({ op: 'message', topic: 't', offset: 42, data: 0 });
  ws.recv({ op: 'gap', topic: 't', epoch: 'E2', offset: 0 });
  assert.equal(gaps.length, 1);
  assert.deepEqual(gaps[0].last, { epoch: 'E1', offset: 42 });
  // The new epoch's first message right behind the gap frame: not delivered before the resync ends.
  ws.recv({ op: 'message', topic: 't', epoch: 'E2', offset: 1, data: 0 });
  const un = ws.last('unsubscribe');
  ws.recv({ op: 'ack', id: un.id, topic: 't' });
  await flush();
  const re = ws.last('subscribe');
  assert.deepEqual(re.since, { epoch: 'E1', offset: 42 });
  ws.recv({ op: 'ack', id: re.id, topic: 't', epoch: 'E2', offset: 1, recovered: false });
  assert.equal(failed.length, 1);
  assert.equal(failed[0].epoch, 'E2');
  assert.equal(failed[0].offset, 1);
  ws.recv({ op: 'message', topic: 't', offset: 2, data: 0 });
  assert.deepEqual(got, [42, 2]);
  assert.deepEqual(ctx.client.position('t'), { epoch: 'E2', offset: 2 });
  ctx.client.close();
});

test('per-topic handlers; unsubscribe stops delivery at once', async () => {
  const ctx = setup();
  const { ws, got } = await subscribed(ctx, 'a', 'E', 0);
  const other = [];
  const pb = ctx.client.subscribe('b', (d) => other.push(d));
  ws.recv({ op: 'ack', id: ws.last('subscribe').id, topic: 'b', epoch: 'F', offset: 0 });
  await pb;
  ws.recv({ op: 'message', topic: 'a', offset: 1, data: 'a1' });
  ws.recv({ op: 'message', topic: 'b', offset: 1, data: 'b1' });
  const p = ctx.client.unsubscribe('a');
  ws.recv({ op: 'message', topic: 'a', offset: 2, data: 'a2' });
  ws.recv({ op: 'ack', id: ws.last('unsubscribe').id, topic: 'a' });
  await p;
  assert.deepEqual(got, [1]);
  assert.deepEqual(other, ['b1']);
  ctx.client.close();
});

test('publish resolves with the ack, rejects on an error reply and on timeout; subscribe refusal rejects', async () => {
  const ctx = setup({ ackTimeout: 1000 });
  const { ws } = await subscribed(ctx, 't', 'E', 0);
  const p1 = ctx.client.publish('t', { x: 1 });
  const f = ws.last('publish');
  assert.deepEqual(f.data, { x: 1 });
  ws.recv({ op: 'ack', id: f.id, topic: 't', epoch: 'E', offset: 1 });
  assert.deepEqual(await p1, { epoch: 'E', offset: 1 });
  const p2 = ctx.client.publish('t', 1);
  ws.recv({ op: 'error', id: ws.last('publish').id, code: 'forbidden', message: 'no' });
  await assert.rejects(p2, { code: 'forbidden' });
  const p3 = assert.rejects(ctx.client.publish('t', 1), { code: 'timeout' });
  await ctx.clock.advance(1000);
  await p3;
  const p4 = ctx.client.subscribe('secret', () => {});
  ws.recv({ op: 'error', id: ws.last('subscribe').id, code: 'forbidden', message: 'no' });
  await assert.rejects(p4, { code: 'forbidden' });
  assert.deepEqual(ctx.client.topics(), ['t']);
  // A publish sent before a close is rejected, never re-sent (it may have gone out).
  const p5 = assert.rejects(ctx.client.publish('t', 5), { code: 'disconnected' });
  ws.serverClose(1006);
  await p5;
  ctx.client.close();
});

test('token: sent as access_token; refreshed with the refresh op before exp; a 4001 close fetches a new one', async () => {
  const clock0 = Date.now();
  let n = 0;
  const tokens = [];
  const ctx = setup({
    refreshMargin: 30000,
    token: async () => {
      n++;
      const t = jwt({ sub: 'u', exp: Math.floor((1_000_000 + 3600_000 * n) / 1000), n });
      tokens.push(t);
      return t;
    },
  });
  void clock0;
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets[0];
  assert.ok(ws.url.startsWith('ws://gw/ws?access_token='), ws.url);
  assert.equal(decodeURIComponent(ws.url.split('=')[1]), tokens[0]);
  ws.open();
  // exp is 1 h after the clock's start: the refresh is due 30 s before it.
  assert.deepEqual(ctx.clock.pending().filter((ms) => ms > 10000), [3600_000 - 30_000]);
  await ctx.clock.advance(3600_000 - 30_001);
  assert.equal(ws.last('refresh'), undefined, 'not before its time');
  await ctx.clock.advance(1);
  const r = ws.last('refresh');
  assert.equal(r.token, tokens[1]);
  ws.recv({ op: 'ack', id: r.id });
  // The server closes with 4001 (token refused): the next connection uses a freshly fetched token.
  ws.serverClose(4001, 'token expired');
  await ctx.clock.advance(DEFAULTS.backoffBase);
  assert.equal(ctx.sockets.length, 2);
  assert.equal(decodeURIComponent(ctx.sockets[1].url.split('=')[1]), tokens[2]);
  assert.equal(n, 3);
  ctx.client.close();
});

test('token timing helpers', () => {
  const now = 1_700_000_000_000;
  const t = jwt({ exp: now / 1000 + 3600 });
  assert.equal(tokenExpiry(t), now + 3600_000);
  assert.equal(refreshDelay(t, now, 30000), 3600_000 - 30000);
  // A short-lived token (40 s) is refreshed halfway, not 30 s early.
  assert.equal(refreshDelay(jwt({ exp: now / 1000 + 40 }), now, 30000), 20000);
  assert.equal(refreshDelay(jwt({ exp: now / 1000 - 5 }), now, 30000), 0);
  assert.equal(refreshDelay('opaque-api-token', now), null);
  assert.equal(tokenExpiry(jwt({ sub: 'x' })), null);
});

test('a static token refused with 4001 stops reconnecting and says why', async () => {
  const ctx = setup({ token: 'static' });
  ctx.client.connect();
  await flush();
  ctx.sockets[0].open();
  ctx.sockets[0].serverClose(4001);
  await ctx.clock.advance(60000);
  assert.equal(ctx.sockets.length, 1);
  assert.equal(ctx.client.state, 'closed');
  assert.ok(ctx.events.some(([e, a]) => e === 'error' && a.code === 'token_expired'));
});

test('wildcards: acked without a position, each matching (topic, offset) once, nothing else, no since after a reconnect', async () => {
  const ctx = setup();
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  const got = [];
  const gaps = [];
  const p = ctx.client.subscribe('scores.*', { onMessage: (d, m) => got.push(`${m.topic}#${m.offset ?? 'raw'}`), onGap: (g) => gaps.push(g.topic) });
  const sub = ws.last('subscribe');
  assert.equal(sub.topic, 'scores.*');
  ws.recv({ op: 'ack', id: sub.id, topic: 'scores.*' });
  assert.deepEqual(await p, { topic: 'scores.*' });
  ws.recv({ op: 'message', topic: 'scores.nba', epoch: 'E', offset: 1, data: 1 });
  ws.recv({ op: 'message', topic: 'scores.nhl', offset: 7, data: 1 });
  ws.recv({ op: 'message', topic: 'scores.nba', offset: 2, data: 1 });
  ws.recv({ op: 'message', topic: 'scores.nba', offset: 2, data: 1 }); // a duplicate
  ws.recv({ op: 'message', topic: 'scores.nba.live', offset: 1, data: 1 }); // one level too deep
  ws.recv({ op: 'message', topic: 'news.nba', offset: 1, data: 1 });
  ws.recv({ op: 'message', topic: 'scores.nba', data: 'raw' });
  ws.recv({ op: 'gap', topic: 'scores.nhl', epoch: 'E2', offset: 3 });
  assert.deepEqual(got, ['scores.nba#1', 'scores.nhl#7', 'scores.nba#2', 'scores.nba#raw']);
  assert.deepEqual(gaps, ['scores.nhl']);
  assert.ok(!ctx.events.some(([e]) => e === 'error'), JSON.stringify(ctx.events));
  // After a reconnect the wildcard is subscribed again, live, without `since`.
  ws.serverClose(1001, 'going away');
  await ctx.clock.advance(DEFAULTS.backoffMax + DEFAULTS.drainSpread);
  await flush();
  const ws2 = ctx.sockets.at(-1);
  assert.notEqual(ws2, ws);
  ws2.open();
  await flush();
  const again = ws2.last('subscribe');
  assert.equal(again.topic, 'scores.*');
  assert.equal(again.since, undefined);
});

test('a token that lives longer than timers can wait (24.8 days) is refreshed once, when due', async () => {
  let n = 0;
  const thirtyDays = 30 * 24 * 3600_000;
  const ctx = setup({
    refreshMargin: 30000,
    token: async () => {
      n++;
      return jwt({ sub: 'u', exp: Math.floor((1_000_000 + thirtyDays * n) / 1000) });
    },
  });
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets[0];
  ws.open();
  assert.ok(ctx.clock.pending().every((ms) => ms <= 2147483647), 'no timer past 2^31 - 1 ms');
  await ctx.clock.advance(10 * 24 * 3600_000);
  assert.equal(n, 1, 'no refresh storm');
  assert.equal(ws.last('refresh'), undefined);
  await ctx.clock.advance(thirtyDays - 10 * 24 * 3600_000 - 30_000);
  assert.equal(n, 2, 'refreshed when due');
  assert.ok(ws.last('refresh'));
});

test('wildcards: after a reconnect to a node with new epochs, messages at lower offsets are delivered', async () => {
  const ctx = setup();
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  const got = [];
  ctx.client.subscribe('s.*', (d, m) => got.push(`${m.topic}#${m.offset}`));
  ws.recv({ op: 'ack', id: ws.last('subscribe').id, topic: 's.*' });
  for (let o = 18; o <= 20; o++) ws.recv({ op: 'message', topic: 's.a', offset: o, data: o });
  ws.serverClose(1006, '');
  await ctx.clock.advance(DEFAULTS.backoffMax);
  await flush();
  const ws2 = ctx.sockets.at(-1);
  ws2.open();
  await flush();
  ws2.recv({ op: 'ack', id: ws2.last('subscribe').id, topic: 's.*' });
  // The restarted node's new epoch: offsets start again, only message 1 names the epoch.
  ws2.recv({ op: 'message', topic: 's.a', epoch: 'E2', offset: 5, data: 5 });
  ws2.recv({ op: 'message', topic: 's.a', offset: 6, data: 6 });
  assert.deepEqual(got, ['s.a#18', 's.a#19', 's.a#20', 's.a#5', 's.a#6']);
});

test('a silent server (no pong within ackTimeout) is dropped and the client reconnects', async () => {
  const ctx = setup({ pingInterval: 30000 });
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  await ctx.clock.advance(30000);
  const ping = ws.last('ping');
  assert.ok(ping, 'a ping after pingInterval');
  ws.recv({ op: 'pong', id: ping.id });
  await flush();
  await ctx.clock.advance(30000);
  const second = ws.last('ping');
  assert.notEqual(second.id, ping.id, 'pings go on while pongs come');
  // No pong: after ackTimeout the connection is dropped and a new one is opened.
  await ctx.clock.advance(DEFAULTS.ackTimeout + DEFAULTS.backoffMax);
  await flush();
  assert.ok(ctx.sockets.length >= 2, 'reconnected');
  assert.ok(ctx.events.some(([e, a]) => e === 'disconnected' && a.willReconnect), JSON.stringify(ctx.events));
});

test('close() then connect() while a token is fetched opens one socket; a subscribe close() rejected stays gone', async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  const ctx = setup({ token: () => gate });
  ctx.client.connect();
  const p = ctx.client.subscribe('t', () => {});
  ctx.client.close();
  await assert.rejects(p, (e) => e.code === 'closed');
  ctx.client.connect();
  release(jwt({ sub: 'u', exp: 4_000_000_000 }));
  await flush();
  await flush();
  assert.equal(ctx.sockets.length, 1, 'one socket, not one per attempt');
  ctx.sockets[0].open();
  await flush();
  assert.equal(ctx.sockets[0].last('subscribe'), undefined, 'the rejected subscribe is not revived');
  ctx.client.close();
});

test('wildcards: a server that offers `time` gets the wildcard resume; replayed duplicates are dropped; recovered:false reloads', async () => {
  const ctx = setup();
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  const got = [];
  const failed = [];
  ctx.client.subscribe('scores.*', { onMessage: (d, m) => got.push(`${m.topic}#${m.offset}`), onRecoverFailed: (i) => failed.push(i) });
  ws.recv({ op: 'ack', id: ws.last('subscribe').id, topic: 'scores.*', time: 1000 });
  ws.recv({ op: 'message', topic: 'scores.a', epoch: 'EA', offset: 1, data: 1 });
  ws.recv({ op: 'message', topic: 'scores.a', offset: 2, data: 2 });
  ws.recv({ op: 'message', topic: 'scores.b', offset: 7, data: 7 }); // joined mid-epoch: epoch unknown
  ws.serverClose(1001, 'going away');
  await ctx.clock.advance(DEFAULTS.backoffMax + DEFAULTS.drainSpread);
  await flush();
  const ws2 = ctx.sockets.at(-1);
  ws2.open();
  await flush();
  const again = ws2.last('subscribe');
  // Only the topic whose epoch is known is named; scores.b comes again from `time`.
  assert.deepEqual(again.since, { time: 1000, topics: { 'scores.a': { epoch: 'EA', offset: 2 } } });
  ws2.recv({ op: 'ack', id: again.id, topic: 'scores.*', time: 2000, recovered: true });
  ws2.recv({ op: 'message', topic: 'scores.a', offset: 3, data: 3 });
  ws2.recv({ op: 'message', topic: 'scores.b', offset: 6, data: 6 }); // replayed, seen already
  ws2.recv({ op: 'message', topic: 'scores.b', offset: 7, data: 7 }); // replayed, seen already
  ws2.recv({ op: 'message', topic: 'scores.b', offset: 8, data: 8 });
  ws2.recv({ op: 'message', topic: 'scores.c', epoch: 'EC', offset: 1, data: 1 }); // never seen
  assert.deepEqual(got, ['scores.a#1', 'scores.a#2', 'scores.b#7', 'scores.a#3', 'scores.b#8', 'scores.c#1']);
  assert.deepEqual(failed, []);
  assert.ok(ctx.events.some(([e, a]) => e === 'resumed' && a.topic === 'scores.*' && a.recovered === true));
  // The next resume starts from the new ack's time; a recovered:false one reloads and starts over.
  ws2.serverClose(1001, 'going away');
  await ctx.clock.advance(DEFAULTS.backoffMax + DEFAULTS.drainSpread);
  await flush();
  const ws3 = ctx.sockets.at(-1);
  ws3.open();
  await flush();
  const third = ws3.last('subscribe');
  assert.equal(third.since.time, 2000);
  assert.deepEqual(Object.keys(third.since.topics).sort(), ['scores.a', 'scores.c']);
  ws3.recv({ op: 'ack', id: third.id, topic: 'scores.*', time: 3000, recovered: false });
  assert.equal(failed.length, 1);
  assert.equal(failed[0].topic, 'scores.*');
  // Live from that ack: the seen positions were dropped, so a lower offset (a new epoch) is delivered.
  ws3.recv({ op: 'message', topic: 'scores.a', offset: 2, data: 2 });
  assert.equal(got.at(-1), 'scores.a#2');
});

test('a wildcard that saw thousands of topics resumes with a frame the server takes; the rest replays from time', async () => {
  const ctx = setup();
  ctx.client.connect();
  await flush();
  const ws = ctx.sockets.at(-1);
  ws.open();
  const got = [];
  ctx.client.subscribe('big.>', { onMessage: (d, m) => got.push(`${m.topic}#${m.offset}`) });
  ws.recv({ op: 'ack', id: ws.last('subscribe').id, topic: 'big.>', time: 1000 });
  for (let i = 0; i < 3000; i++) {
    ws.recv({ op: 'message', topic: `big.game.t${i}`, epoch: 'E0123456789abcde', offset: 5, data: i });
  }
  ws.serverClose(1001, 'going away');
  await ctx.clock.advance(DEFAULTS.backoffMax + DEFAULTS.drainSpread);
  await flush();
  const ws2 = ctx.sockets.at(-1);
  ws2.open();
  await flush();
  const again = ws2.last('subscribe');
  assert.equal(again.since.time, 1000, 'still a resume, never a plain subscribe');
  const listed = Object.keys(again.since.topics).length;
  assert.ok(listed > 500 && listed < 3000, `${listed} listed`);
  assert.ok(JSON.stringify(again).length < 64 * 1024, 'fits the default max_message_size');
  // A topic left out comes again from `time`: what the client has is dropped, the new one kept.
  ws2.recv({ op: 'ack', id: again.id, topic: 'big.>', time: 2000, recovered: true });
  ws2.recv({ op: 'message', topic: 'big.game.t2999', offset: 5, data: 2999 });
  ws2.recv({ op: 'message', topic: 'big.game.t2999', offset: 6, data: 2999 });
  assert.deepEqual(got.slice(3000), ['big.game.t2999#6']);
});
