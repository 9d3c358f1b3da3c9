// The client against a hostile or broken server: a fake WebSocket server on loopback (the `ws`
// package) sends huge and malformed frames, never answers, or refuses every token. The client must stay
// usable, report typed errors, and never turn a bad server into a reconnect storm.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket, { WebSocketServer } from 'ws';
import { PubgateClient } from '../pubgate.js';
import { sleep, until } from './harness.mjs';

const servers = [];
after(() => Promise.all(servers.map((s) => new Promise((r) => s.close(r)))));

/** A fake server whose `onConnection(socket, n)` plays the hostile part; counts connections. */
async function fakeServer(onConnection) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  servers.push(wss);
  const state = { connections: 0, urls: [] };
  wss.on('connection', (sock, req) => {
    state.connections++;
    state.urls.push(req.url);
    sock.on('error', () => undefined);
    onConnection(sock, state.connections);
  });
  return { url: `ws://127.0.0.1:${wss.address().port}/ws`, state, wss };
}

/** Answers subscribes at epoch E, offset 0, and pongs; `extra` runs after each ack. */
function answering(extra) {
  return (sock) =>
    sock.on('message', (raw) => {
      const f = JSON.parse(String(raw));
      if (f.op === 'subscribe') {
        sock.send(JSON.stringify({ op: 'ack', id: f.id, topic: f.topic, epoch: 'E', offset: 0 }));
        extra(sock, f);
      }
    });
}

function client(url, options = {}) {
  const c = new PubgateClient(url, { WebSocket, window: null, backoffBase: 100, backoffMax: 400, ...options });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  return { c, errors };
}

test('huge, binary and garbage frames are refused with bad_frame; the connection keeps delivering', { timeout: 30000 }, async () => {
  const srv = await fakeServer(
    answering((sock, f) => {
      sock.send('x'.repeat(17 * 1024 * 1024)); // over maxFrameChars (16 MiB)
      sock.send(Buffer.from([1, 2, 3]), { binary: true });
      for (let i = 0; i < 2000; i++) sock.send(i % 2 ? 'null' : '{"op":');
      sock.send(JSON.stringify({ op: 'message', topic: f.topic, offset: 1e300, data: 1 }));
      sock.send(JSON.stringify({ op: 'ack', id: 999999, epoch: 'E', offset: 0 })); // nobody asked
      sock.send(JSON.stringify({ op: 'message', topic: '__proto__', offset: 1, data: 1 }));
      sock.send(JSON.stringify({ op: 'message', topic: f.topic, offset: 1, data: 'ok' }));
    }),
  );
  const { c, errors } = client(srv.url, { connect: true });
  const got = [];
  await c.subscribe('t', (d) => got.push(d));
  await until('the good message', () => got.length === 1, 10000);
  assert.deepEqual(got, ['ok']);
  assert.equal(errors.length, 2 + 2000 + 1);
  assert.ok(errors.every((e) => e === 'bad_frame'));
  assert.equal(c.state, 'open');
  assert.equal(srv.state.connections, 1);
  c.close();
});

test('a server that never answers: ack timeouts start over with backoff, not in a loop', { timeout: 30000 }, async () => {
  const srv = await fakeServer(() => undefined);
  const { c, errors } = client(srv.url, { ackTimeout: 200, backoffMax: 1000, connect: true });
  const p = c.subscribe('t', () => undefined);
  await sleep(3000);
  // 200 ms per try plus a growing delay (at most 1 s): a handful in 3 s, never hundreds.
  assert.ok(srv.state.connections >= 3 && srv.state.connections <= 16, `${srv.state.connections} connections in 3 s`);
  assert.ok(errors.filter((e) => e === 'timeout').length >= 3);
  c.close();
  await assert.rejects(p, (e) => e.code === 'closed');
});

test('a server that refuses every token (4001): a new token each time, with backoff; a hanging callback does not stall it', { timeout: 30000 }, async () => {
  const srv = await fakeServer((sock) => sock.close(4001, 'token expired'));
  let calls = 0;
  const token = () => (++calls === 3 ? new Promise(() => {}) : `tok-${calls}`);
  const { c, errors } = client(srv.url, { token, tokenTimeout: 300, backoffMax: 1000, connect: true });
  await sleep(3000);
  assert.ok(srv.state.connections >= 3 && srv.state.connections <= 16, `${srv.state.connections} connections in 3 s`);
  assert.equal(calls, srv.state.connections + 1, 'one token per connection, plus the one that hung');
  assert.deepEqual(new Set(srv.state.urls).size, srv.state.urls.length, 'never the same token twice');
  assert.ok(errors.includes('token'));
  c.close();
});

test('a server that accepts and closes at once (1006-style churn) is retried with growing delays', { timeout: 30000 }, async () => {
  const srv = await fakeServer((sock) => sock.terminate());
  const { c } = client(srv.url, { connect: true, backoffMax: 2000 });
  await sleep(3000);
  assert.ok(srv.state.connections >= 3 && srv.state.connections <= 20, `${srv.state.connections} connections in 3 s`);
  c.close();
});
