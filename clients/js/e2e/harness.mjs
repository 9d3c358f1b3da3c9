// Processes and HTTP for the end-to-end tests: real redis-server, real pubgate nodes and HAProxy on free
// loopback ports, each stopped by its own PID. Shared by browser.mjs and the node --test files here.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const BIN = process.env.PUBGATE_BIN || 'target/debug/pubgate';
/** Every process started here, so a failing run can kill what it started (and nothing else). */
export const children = new Set();

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A port nothing listens on right now (the kernel picks it). */
export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `fn` every 50 ms until it returns something truthy; throws after `timeoutMs`. */
export async function until(what, fn, timeoutMs = 20000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

export function run(cmd, args, env = {}, name = cmd) {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  child.name = name;
  child.output = '';
  child.stdout.on('data', (d) => (child.output += d));
  child.stderr.on('data', (d) => (child.output += d));
  child.exited = new Promise((r) => child.on('exit', (code, sig) => r({ code, sig })));
  children.add(child);
  child.exited.then(() => children.delete(child));
  return child;
}

/** Stops one child by its PID (SIGKILL after 10 s). */
export async function stop(child, signal = 'SIGTERM') {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const t = setTimeout(() => child.kill('SIGKILL'), 10000);
  await child.exited;
  clearTimeout(t);
}

/** Kills every child still running (a failed run). */
export function killAll() {
  for (const c of children) c.kill('SIGKILL');
}

export async function startRedis() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'pubgate-e2e-redis-'));
  const child = run('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], {}, 'redis');
  child.dir = dir;
  await until('redis', () => child.output.includes('Ready to accept connections'), 10000);
  return {
    port,
    child,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      await stop(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A pubgate node on `port` with the Redis broker, history on, a short drain and `env` on top. */
export async function startNode(redisUrl, port, name, env = {}) {
  const child = run(
    BIN,
    ['--listen', `127.0.0.1:${port}`],
    {
      PUBGATE__BROKER__KIND: 'redis',
      PUBGATE__BROKER__URL: redisUrl,
      PUBGATE__HISTORY__SIZE: '1000',
      PUBGATE__DRAIN__GRACE: '2s',
      PUBGATE__LOG__FORMAT: 'plain',
      ...env,
    },
    name,
  );
  await until(`${name} listening`, () => child.output.includes('pubgate listening on') || child.exitCode !== null, 30000);
  if (child.exitCode !== null) throw new Error(`${name} exited: ${child.output}`);
  const base = `http://127.0.0.1:${port}`;
  await until(`${name} ready`, async () => (await fetch(base + '/readyz').catch(() => null))?.ok, 20000);
  return { child, port, base, name, ws: `ws://127.0.0.1:${port}/ws`, env, redisUrl };
}

/** Publishes over the HTTP API; `key` is an API key where the node requires one. */
export async function publish(base, topic, data, key = null) {
  const headers = { 'content-type': 'application/json' };
  if (key) headers.authorization = `Bearer ${key}`;
  const r = await fetch(`${base}/v1/publish/${topic}`, { method: 'POST', body: JSON.stringify(data), headers });
  if (!r.ok) throw new Error(`publish ${topic} via ${base}: ${r.status} ${await r.text()}`);
  return r.json();
}

/** The value of an unlabelled metric of a node. */
export async function metric(base, name) {
  const text = await (await fetch(base + '/metrics')).text();
  const m = text.match(new RegExp(`^${name} (\\d+)`, 'm'));
  return m ? Number(m[1]) : NaN;
}

export async function startHaproxy(backends) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'pubgate-e2e-haproxy-'));
  const servers = backends.map((b, i) => `    server n${i} 127.0.0.1:${b} check inter 300ms fall 2 rise 2\n`).join('');
  const cfg =
    `global\n    maxconn 512\n\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n` +
    `    option http-server-close\n    retries 3\n    option redispatch 1\n\nfrontend pubgate\n    bind 127.0.0.1:${port}\n    default_backend nodes\n\n` +
    `backend nodes\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n${servers}`;
  writeFileSync(join(dir, 'haproxy.cfg'), cfg);
  const child = run('haproxy', ['-db', '-f', join(dir, 'haproxy.cfg')], {}, 'haproxy');
  child.dir = dir;
  await until('haproxy', async () => (await fetch(`http://127.0.0.1:${port}/healthz`).catch(() => null))?.ok, 10000);
  return { port, child, base: `http://127.0.0.1:${port}` };
}

/** Throws unless `offsets` is exactly `from..to`, once each and in order; returns the duplicate count. */
export function checkExactlyOnce(label, offsets, to, from = 1) {
  const want = Array.from({ length: to - from + 1 }, (_, i) => from + i);
  const dups = offsets.length - new Set(offsets).size;
  if (JSON.stringify(offsets) !== JSON.stringify(want)) {
    throw new Error(`${label}: expected offsets ${from}..${to} once each, got ${JSON.stringify(offsets)} (${dups} duplicates)`);
  }
  return dups;
}
