// End-to-end in a real browser: Debian's chromium driven by playwright-core, against real pubgate
// nodes on a real Redis (and HAProxy). Run by scripts/e2e-browser.sh; everything listens on loopback.
//
//   PUBGATE_BIN=target/debug/pubgate E2E_OUT=target/e2e node clients/js/e2e/browser.mjs
//
// 1. the page subscribes, a backend publishes over HTTP, the message appears on the page;
// 2. the node the page is connected to is restarted (same port) while messages are published through
//    another node: after the reconnect every one of them appears, none twice;
// 3. the same through HAProxy in front of two nodes;
// 4. two tabs share one connection when sharing is on (the node counts one WebSocket);
// 5. a screenshot of the page is saved to $E2E_OUT/page.png;
// 6. shared mode (tabs.mjs): a crashed tab's topics are released, `online` reconnects the worker at
//    once, a tab joining a topic another tab has gets exactly what follows its ack (or its `since`);
// 7. `persist: 'session'`: a reload while messages are published loses none and repeats none.
import { mkdirSync, writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { checkExactlyOnce, children, freePort, metric, publish, sleep, startHaproxy, startNode, startRedis, stop, until } from './harness.mjs';
import { persistScenario, sharedScenarios } from './tabs.mjs';

const OUT = process.env.E2E_OUT || 'target/e2e';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const started = Date.now();
const results = {};

function log(...a) {
  console.log(`[e2e ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);
}

const connections = (base) => metric(base, 'pubgate_connections');

/** Offsets the page delivered for `topic`. */
const received = (page, topic) => page.evaluate((t) => (window.pubgatePage.received[t] || []).slice(), topic);
const rows = (page, topic) => page.locator(`.stream[data-topic="${topic}"] .messages li:not(.note)`).count();

/**
 * Restarts the node `page` is connected to while `duringOutage` messages are published through
 * `other`; returns what the page got.
 */
async function restartScenario(label, page, topic, node, other, redisUrl, before, duringOutage) {
  before += (await received(page, topic)).length; // what the page already has
  for (let i = (await received(page, topic)).length + 1; i <= before; i++) await publish(other.base, topic, { n: i, phase: 'before' });
  await until(`${label}: ${before} messages on the page`, async () => (await received(page, topic)).length === before);
  const connectedBefore = (await page.evaluate(() => window.pubgatePage.events.filter((e) => e === 'connected').length));
  log(`${label}: ${before} messages shown; restarting ${node.name} (SIGTERM, drain)`);
  node.child.kill('SIGTERM');
  // Publish while the page's node drains, is down and comes back.
  let whileDown = 0;
  for (let i = 1; i <= duringOutage; i++) {
    if (node.child.exitCode !== null || node.child.signalCode !== null) whileDown++;
    await publish(other.base, topic, { n: before + i, phase: 'outage' });
    if (i === Math.floor(duringOutage / 2)) await node.child.exited;
  }
  if (whileDown < duringOutage / 2) throw new Error(`${label}: only ${whileDown} published while the node was down`);
  await node.child.exited;
  const restarted = await startNode(redisUrl, node.port, node.name);
  log(`${label}: ${node.name} back on port ${node.port}; ${duringOutage} published meanwhile`);
  const total = before + duringOutage;
  await until(`${label}: all ${total} messages after the reconnect`, async () => (await received(page, topic)).length >= total, 30000);
  await sleep(500); // anything duplicated would arrive right behind
  const offsets = await received(page, topic);
  const dups = checkExactlyOnce(label, offsets, total);
  const shown = await rows(page, topic);
  if (shown !== total) throw new Error(`${label}: ${shown} rows on the page, expected ${total}`);
  const failedNotes = await page.locator(`.stream[data-topic="${topic}"] .messages li.note`, { hasText: 'could not cover' }).count();
  if (failedNotes) throw new Error(`${label}: the resume was not recovered from history`);
  const resumedNotes = await page.locator(`.stream[data-topic="${topic}"] .messages li.note`, { hasText: 'resumed after offset' }).count();
  if (resumedNotes < 1) throw new Error(`${label}: no resume shown on the page`);
  const connectedAfter = await page.evaluate(() => window.pubgatePage.events.filter((e) => e === 'connected').length);
  if (connectedAfter <= connectedBefore) throw new Error(`${label}: the page never reconnected`);
  const r = { publishedDuringOutage: duringOutage, publishedWhileNodeDown: whileDown, received: offsets.length - before, duplicated: dups, reconnects: connectedAfter - connectedBefore };
  log(`${label}:`, JSON.stringify(r));
  return { restarted, result: r };
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  const redis = await startRedis();
  const [pa, pb] = [await freePort(), await freePort()];
  let a = await startNode(redis.url, pa, 'node-a');
  let b = await startNode(redis.url, pb, 'node-b');
  log(`redis ${redis.port}, node-a ${pa}, node-b ${pb}`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  try {
    // 1. subscribe on the page, publish from a backend over HTTP, see it.
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 760 } });
    const page = await ctx.newPage();
    page.on('pageerror', (e) => log('page error:', e.message));
    await page.goto(`${a.base}/?topics=scores.nba&drainSpread=300`);
    await page.locator('#status[data-state="open"]').waitFor({ timeout: 15000 });
    await page.locator('.stream[data-topic="scores.nba"][data-subscribed="true"]').waitFor({ timeout: 15000 });
    await publish(a.base, 'scores.nba', { home: 3, away: 1 });
    await page.locator('.stream[data-topic="scores.nba"] .messages li .data', { hasText: '{"home":3,"away":1}' }).waitFor({ timeout: 10000 });
    results.publishAppears = true;
    log('1. a message published over HTTP appears on the page');

    // 2. restart the page's node; messages published meanwhile (through node-b) arrive once each.
    const r2 = await restartScenario('2. node restart', page, 'scores.nba', a, b, redis.url, 3, 30);
    a = r2.restarted;
    results.restart = r2.result;

    // The page's own controls: subscribe with the form, publish with the publish box.
    await page.fill('#subscribe-topic', 'prices.eurusd');
    await page.click('#subscribe-form button');
    await page.locator('.stream[data-topic="prices.eurusd"][data-subscribed="true"]').waitFor({ timeout: 10000 });
    for (const [i, px] of [1.0842, 1.0845, 1.0839].entries()) {
      await page.fill('#publish-topic', 'prices.eurusd');
      await page.fill('#publish-data', JSON.stringify({ bid: px, ask: +(px + 0.0002).toFixed(4) }));
      await page.click('#publish-form button');
      await until('publish box result', async () => (await page.textContent('#publish-result')).includes(`offset ${i + 1}`));
    }
    if ((await received(page, 'prices.eurusd')).length !== 3) throw new Error('publish box messages not shown');
    for (let i = 0; i < 3; i++) await publish(b.base, 'scores.nba', { home: 4 + i, away: 2 });
    await until('last scores', async () => (await received(page, 'scores.nba')).length === 37);
    await sleep(1100); // let the rates tick
    await page.screenshot({ path: join(OUT, 'page.png') });
    results.screenshot = join(OUT, 'page.png');
    log('5. screenshot saved to', results.screenshot);
    await ctx.close();

    // 3. the same through HAProxy in front of both nodes.
    const hap = await startHaproxy([a.port, b.port]);
    try {
      const hctx = await browser.newContext();
      const hpage = await hctx.newPage();
      await hpage.goto(`${hap.base}/?topics=jobs.42&drainSpread=300`);
      await hpage.locator('.stream[data-topic="jobs.42"][data-subscribed="true"]').waitFor({ timeout: 15000 });
      const onA = await until('the page connection on a node', async () => {
        const [ca, cb] = [await connections(a.base), await connections(b.base)];
        return ca + cb === 1 ? (ca === 1 ? 'a' : 'b') : null;
      });
      const [mine, other] = onA === 'a' ? [a, b] : [b, a];
      const r3 = await restartScenario(`3. HAProxy, ${mine.name} restarted`, hpage, 'jobs.42', mine, other, redis.url, 3, 30);
      if (onA === 'a') a = r3.restarted;
      else b = r3.restarted;
      results.haproxy = r3.result;
      await hctx.close();
    } finally {
      await stop(hap.child);
      rmSync(hap.child.dir, { recursive: true, force: true });
    }

    // 4. two tabs, one connection.
    await until('no connections left', async () => (await connections(a.base)) === 0);
    const sctx = await browser.newContext();
    const t1 = await sctx.newPage();
    const t2 = await sctx.newPage();
    await t1.goto(`${a.base}/?share=1&topics=chat.room1`);
    await t2.goto(`${a.base}/?share=1&topics=chat.room1`);
    for (const t of [t1, t2]) await t.locator('.stream[data-topic="chat.room1"][data-subscribed="true"]').waitFor({ timeout: 15000 });
    const shared = await Promise.all([t1, t2].map((t) => t.evaluate(() => window.pubgatePage.shared)));
    if (!shared.every(Boolean)) throw new Error(`SharedWorker not used: ${shared}`);
    await publish(b.base, 'chat.room1', { text: 'hello, both tabs' });
    for (const t of [t1, t2]) await until('shared message in each tab', async () => (await received(t, 'chat.room1')).length === 1);
    const conns = await connections(a.base);
    if (conns !== 1) throw new Error(`two shared tabs hold ${conns} connections, expected 1`);
    results.sharedTabs = { tabs: 2, connections: conns };
    log('4. two tabs share one connection:', JSON.stringify(results.sharedTabs));
    await sctx.close();

    // 6. shared mode: a crashed tab's topics are released, `online` reconnects the worker, a tab
    // joining a topic gets what follows its ack and nothing before; 7. a reload resumes (persist).
    results.shared = await sharedScenarios(browser, { a, b, log, received });
    a = results.shared.node; // restarted by the online scenario
    delete results.shared.node;
    results.persist = await persistScenario(browser, { a, b, log });
  } finally {
    await browser.close();
    await Promise.all([stop(a.child), stop(b.child)]);
    await redis.stop();
  }
  writeFileSync(join(OUT, 'results.json'), JSON.stringify(results, null, 2) + '\n');
  log(`passed in ${((Date.now() - started) / 1000).toFixed(1)}s:`, JSON.stringify(results));
}

const watchdog = setTimeout(() => {
  console.error('e2e: over the 200 s budget');
  for (const c of children) c.kill('SIGKILL');
  process.exit(1);
}, 200000);

main().then(
  () => {
    clearTimeout(watchdog);
    process.exit(0);
  },
  async (e) => {
    console.error('e2e FAILED:', e.stack || e);
    for (const c of children) {
      console.error(`--- ${c.name} output (tail) ---\n${c.output.slice(-3000)}`);
      c.kill('SIGKILL');
    }
    process.exit(1);
  },
);
