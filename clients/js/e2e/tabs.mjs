// Browser scenarios of shared mode (one SharedWorker connection for all tabs) and of `persist:
// 'session'`, called by browser.mjs with its running nodes. Each uses its own browser context, so its
// own SharedWorker, and checks exact offsets.
import { checkExactlyOnce, metric, publish, sleep, startNode, stop, until } from './harness.mjs';

const subscribed = (page, topic) => page.locator(`.stream[data-topic="${topic}"][data-subscribed="true"]`).waitFor({ timeout: 15000 });
const ackOf = (page, topic) => page.evaluate((t) => window.pubgatePage.acks[t], topic);

/** Publishes `count` messages to `topic` through `base`, `gapMs` apart; resolves with the last offset. */
async function publishRun(base, topic, count, gapMs) {
  let last = 0;
  for (let i = 0; i < count; i++) {
    last = (await publish(base, topic, { i })).offset;
    await sleep(gapMs);
  }
  return last;
}

/** Crashes a tab's renderer: no pagehide, no bye, no goodbye of any kind. */
async function crash(ctx, tab) {
  const cdp = await ctx.newCDPSession(tab);
  const crashed = new Promise((resolve) => tab.once('crash', resolve));
  cdp.send('Page.crash').catch(() => undefined); // never answers: the page is gone
  await Promise.race([crashed, sleep(10000).then(() => Promise.reject(new Error('the tab did not crash')))]);
}

const workerGone = (tab) => tab.evaluate(() => window.pubgatePage.events.filter((e) => e === 'disconnected').length);

/**
 * A tab killed without pagehide is noticed through its Web Lock and its topics are released; when
 * the tab that hosted the worker dies with it, the other tabs start a new worker and resume from what
 * they saw: every message published meanwhile arrives once.
 */
async function crashedTabs(browser, { a, b, log, received }) {
  const ctx = await browser.newContext();
  try {
    // Chromium runs the worker in the process of the tab that started it: the survivor goes first.
    const [keep, doomed] = [await ctx.newPage(), await ctx.newPage()];
    await keep.goto(`${a.base}/?share=1&topics=crash.both`);
    await subscribed(keep, 'crash.both');
    await doomed.goto(`${a.base}/?share=1&topics=crash.only,crash.both`);
    await Promise.all([subscribed(doomed, 'crash.only'), subscribed(doomed, 'crash.both')]);
    await until('one connection, two subscriptions', async () => (await metric(a.base, 'pubgate_connections')) === 1 && (await metric(a.base, 'pubgate_subscriptions')) === 2);
    await crash(ctx, doomed);
    await until("the crashed tab's topic released on the node", async () => (await metric(a.base, 'pubgate_subscriptions')) === 1, 10000);
    if (await workerGone(keep)) throw new Error('the worker died with the tab: the release was not the tab lock');
    await publish(b.base, 'crash.both', { after: 'crash' });
    await until('the other tab still receives', async () => (await received(keep, 'crash.both')).length === 1);
    log('6a. a crashed tab (no pagehide) is noticed by its Web Lock: its topic released, the other tab unaffected');
  } finally {
    await ctx.close();
  }
  const ctx2 = await browser.newContext();
  try {
    const [host, keep] = [await ctx2.newPage(), await ctx2.newPage()];
    await host.goto(`${a.base}/?share=1&topics=gone.t`);
    await subscribed(host, 'gone.t');
    await keep.goto(`${a.base}/?share=1&topics=gone.t`);
    await subscribed(keep, 'gone.t');
    for (let i = 0; i < 5; i++) await publish(b.base, 'gone.t', { i });
    await until('5 messages in the surviving tab', async () => (await received(keep, 'gone.t')).length === 5);
    await crash(ctx2, host); // the worker dies with it
    const last = await publishRun(b.base, 'gone.t', 15, 20); // while the survivor starts a new worker
    await until(`all ${last} messages in the surviving tab`, async () => (await received(keep, 'gone.t')).length >= last, 15000);
    await sleep(300);
    checkExactlyOnce('tab whose worker died', await received(keep, 'gone.t'), last);
    if (!(await workerGone(keep))) throw new Error('the worker survived its host tab: nothing was tested');
    await until('one connection again', async () => (await metric(a.base, 'pubgate_connections')) === 1);
    log(`6b. the worker died with its host tab: the other tab started a new one and got offsets 1..${last} once each`);
    return { tabCrashReleased: true, workerCrashResumed: { published: last, received: last, duplicated: 0 } };
  } finally {
    await ctx2.close();
  }
}

/**
 * The worker waits out a long backoff after its node died; the node comes back and a tab reports
 * `online`: the worker reconnects at once, long before the backoff, and rapid toggles open one socket.
 */
async function onlineReconnects(browser, { a, log }) {
  const ctx = await browser.newContext();
  try {
    const p = await ctx.newPage();
    await p.goto(`${a.base}/?share=1&topics=online.t&backoffBase=20000&backoffMax=40000`);
    await subscribed(p, 'online.t');
    await p.evaluate(() => {
      window.seen = { closes: [], opens: [] };
      window.pubgatePage.client.on('disconnected', (d) => window.seen.closes.push({ delay: d.delay, at: Date.now() }));
      window.pubgatePage.client.on('connected', () => window.seen.opens.push(Date.now()));
    });
    await stop(a.child, 'SIGKILL');
    // Wait until the worker sits in a backoff of at least 8 s (random: a few attempts at most).
    const wait = await until('a long backoff', () => p.evaluate(() => window.seen.closes.find((c) => c.delay >= 8000)), 30000);
    const node = await startNode(a.redisUrl, a.port, a.name, a.env);
    const onlineAt = await p.evaluate(() => {
      for (let i = 0; i < 20; i++) {
        dispatchEvent(new Event('offline'));
        dispatchEvent(new Event('online'));
      }
      return Date.now();
    });
    const openedAt = await until('reconnected after online', () => p.evaluate(() => window.seen.opens.at(-1)), 5000);
    const due = wait.at + wait.delay;
    if (openedAt >= due) throw new Error(`reconnected at ${openedAt}, not before the backoff ended at ${due}: online did nothing`);
    await sleep(300);
    const conns = await metric(node.base, 'pubgate_connections');
    if (conns !== 1) throw new Error(`after 20 online/offline toggles the worker holds ${conns} connections`);
    log(`6d. online reconnects the worker ${openedAt - onlineAt} ms after the event, ${due - openedAt} ms before its backoff; 20 toggles, 1 connection`);
    return { node, result: { backoffMs: wait.delay, reconnectMsAfterOnline: openedAt - onlineAt, connectionsAfterToggles: conns } };
  } finally {
    await ctx.close();
  }
}

/**
 * A second tab joins a topic the first already has while messages flow: it gets every message after
 * its ack and none before; a third tab asking `since` gets the kept messages after it, then live ones.
 */
async function lateJoiner(browser, { a, b, log, received }) {
  const ctx = await browser.newContext();
  try {
    const [t1, t2, t3] = [await ctx.newPage(), await ctx.newPage(), await ctx.newPage()];
    await t1.goto(`${a.base}/?share=1&topics=join.t`);
    await subscribed(t1, 'join.t');
    const running = publishRun(b.base, 'join.t', 60, 20);
    await until('some messages before the second tab', async () => (await received(t1, 'join.t')).length >= 15);
    await t2.goto(`${a.base}/?share=1&topics=join.t`);
    await subscribed(t2, 'join.t');
    const last = await running;
    const ack2 = await ackOf(t2, 'join.t');
    await until('all messages in both tabs', async () => (await received(t1, 'join.t')).length === last && (await received(t2, 'join.t')).length === last - ack2.offset);
    await sleep(200);
    checkExactlyOnce('tab 1', await received(t1, 'join.t'), last);
    if (ack2.offset < 15 || ack2.offset >= last) throw new Error(`tab 2 acked at ${ack2.offset}: not while messages flowed`);
    checkExactlyOnce('tab 2 (after its ack)', await received(t2, 'join.t'), last, ack2.offset + 1);
    // A third tab resumes from offset 5 of the same epoch: the worker's kept messages, then live.
    await t3.goto(`${a.base}/?share=1`);
    await t3.locator('#status[data-state="open"]').waitFor({ timeout: 15000 });
    const got3 = await t3.evaluate(async () => {
      const client = window.pubgatePage.client;
      const pos = await client.position('join.t');
      window.got3 = [];
      const ack = await client.subscribe('join.t', (_d, m) => window.got3.push(m.offset), { since: { epoch: pos.epoch, offset: 5 } });
      return ack;
    });
    if (!got3.recovered) throw new Error(`tab 3 resume not recovered: ${JSON.stringify(got3)}`);
    await publish(b.base, 'join.t', { live: true });
    await until('tab 3 replay and live', async () => (await t3.evaluate(() => window.got3.length)) === last + 1 - 5);
    checkExactlyOnce('tab 3 (since 5)', await t3.evaluate(() => window.got3), last + 1, 6);
    log(`6c. late joiner: tab 2 acked at ${ack2.offset}, got ${last - ack2.offset} (exactly ${ack2.offset + 1}..${last}); tab 3 since 5 got 6..${last + 1}`);
    return { tab2Ack: ack2.offset, published: last };
  } finally {
    await ctx.close();
  }
}

/** The three shared-mode scenarios; returns their results and node-a (restarted by the online one). */
export async function sharedScenarios(browser, env) {
  const crash = await crashedTabs(browser, env);
  const join = await lateJoiner(browser, env);
  const online = await onlineReconnects(browser, env);
  return { crash, join, online: online.result, node: online.node };
}

/**
 * `persist: 'session'`: the page is reloaded while messages are published; every message after the
 * first ack arrives once across the reload (the reloaded page resumes from sessionStorage).
 */
export async function persistScenario(browser, { a, b, log }) {
  const ctx = await browser.newContext();
  try {
    const p = await ctx.newPage();
    // Each delivery is logged in the tab's own sessionStorage, synchronously, in the handler: a call
    // out to the test could be lost in the unload itself.
    await p.addInitScript(() => {
      window.pubgateObserve = (topic, offset) => {
        const log = JSON.parse(sessionStorage.getItem('e2e-seen') || '[]');
        log.push([topic, offset]);
        sessionStorage.setItem('e2e-seen', JSON.stringify(log));
      };
    });
    const seenNow = async () => {
      const all = await p.evaluate(() => JSON.parse(sessionStorage.getItem('e2e-seen') || '[]')).catch(() => null);
      return all && all.filter(([t]) => t === 'persist.t').map(([, o]) => o);
    };
    await p.goto(`${a.base}/?topics=persist.t&persist=session`);
    await subscribed(p, 'persist.t');
    const first = (await ackOf(p, 'persist.t')).offset;
    const running = publishRun(b.base, 'persist.t', 80, 25);
    await until('messages before the reload', async () => ((await seenNow()) || []).length >= 20);
    await p.reload();
    await subscribed(p, 'persist.t');
    const last = await running;
    await until(`all ${last - first} messages across the reload`, async () => ((await seenNow()) || []).length >= last - first, 15000).catch(async (e) => {
      throw new Error(`${e.message}: got ${JSON.stringify(await seenNow())}`);
    });
    await sleep(300);
    const seen = await seenNow();
    checkExactlyOnce('persist across reload', seen, last, first + 1);
    const resumed = await p.locator('.stream[data-topic="persist.t"] .messages li.note', { hasText: 'resumed after offset' }).count();
    if (resumed !== 1) throw new Error(`the reloaded page did not say it resumed (${resumed})`);
    log(`7. persist: reloaded while publishing, ${seen.length} messages, offsets ${first + 1}..${last} once each`);
    return { published: last - first, received: seen.length, duplicated: 0 };
  } finally {
    await ctx.close();
  }
}
