// The live page: subscribe, watch, publish. Uses the pubgate JavaScript client served next to it.
import { connect } from '/_pubgate/pubgate.js';

const params = new URLSearchParams(location.search);
const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
const share = params.get('share') === '1';
const token = params.get('token') || undefined;
const MAX_ROWS = 500;
const MAX_SHOWN = 600;

const $ = (id) => document.getElementById(id);
// Options a URL can set, for demos and the browser tests: ?share=1&persist=session&backoffBase=…
// Clamped: a crafted link must not turn the page into a reconnect loop (backoffBase=0.000001).
function num(key, fallback, min, max) {
  const v = Number(params.get(key));
  return params.has(key) && Number.isFinite(v) ? Math.min(max, Math.max(min, v)) : fallback;
}
const options = { share, token, drainSpread: num('drainSpread', 2000, 0, 60000) };
if (params.get('persist') === 'session') options.persist = 'session';
if (params.has('backoffBase')) options.backoffBase = num('backoffBase', 250, 100, 60000);
if (params.has('backoffMax')) options.backoffMax = num('backoffMax', 15000, options.backoffBase || 250, 300000);
const client = connect(wsUrl, options);
const streams = new Map(); // topic -> {el, list, count, times: [], rateEl, countEl}
// For tests and the curious: what arrived, per topic (offsets), and the client.
const page = (window.pubgatePage = { client, received: {}, acks: {}, shared: !!client.shared, events: [] });

$('endpoint').textContent = wsUrl + (client.shared ? ' · shared by all tabs' : '');
// curl takes plain http without the scheme, which keeps the example inside its card.
const curlTarget = location.protocol === 'http:' ? location.host : location.origin;
$('curl-example').textContent = `curl -d '{"home":3}' \\\n  ${curlTarget}/v1/publish/scores.nba`;

function setStatus(state, text) {
  const s = $('status');
  s.className = 'status ' + state;
  s.dataset.state = state;
  $('status-text').textContent = text;
}
client.on('connected', () => {
  page.events.push('connected');
  setStatus('open', 'connected');
});
client.on('disconnected', (d) => {
  page.events.push('disconnected');
  const code = d && d.code ? ` (${d.code})` : '';
  setStatus('waiting', d && d.willReconnect === false ? 'closed' + code : 'reconnecting' + code + '…');
});
client.on('error', (e) => page.events.push('error: ' + (e && e.message)));
client.on('resumed', (r) => {
  const s = streams.get(r.topic);
  if (s && r.recovered) row(s.list, 'note info', [['data', `reconnected: resumed after offset ${r.since.offset}; what was missed follows from history`]]);
});
if (client.state === 'open') setStatus('open', 'connected');

function time() {
  const d = new Date();
  return d.toTimeString().slice(0, 8) + '.' + String(d.getMilliseconds()).padStart(3, '0').slice(0, 1);
}

/** A message's data as one line of the stream: long ones cut (a 64 KiB message would fill the screen). */
function shown(data) {
  const text = JSON.stringify(data);
  return text.length > MAX_SHOWN ? text.slice(0, MAX_SHOWN) + ` … (${text.length} characters)` : text;
}

function row(list, cls, parts) {
  const li = document.createElement('li');
  if (cls) li.className = cls;
  for (const [c, text] of parts) {
    const span = document.createElement('span');
    span.className = c;
    span.textContent = text;
    li.append(span);
  }
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(li);
  while (list.children.length > MAX_ROWS) list.firstChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function addStream(topic) {
  $('empty').hidden = true;
  const el = document.createElement('article');
  el.className = 'stream';
  el.dataset.topic = topic;
  el.innerHTML = `<div class="stream-head"><span class="name"></span>
    <span class="stats"><span class="rate">0.0</span> msg/s · <span class="count">0</span> received</span>
    <button class="ghost" title="Unsubscribe">✕</button></div><ul class="messages"></ul>`;
  el.querySelector('.name').textContent = topic;
  const s = { el, list: el.querySelector('.messages'), count: 0, times: [], rateEl: el.querySelector('.rate'), countEl: el.querySelector('.count') };
  el.querySelector('button').onclick = () => removeStream(topic);
  $('streams').append(el);
  const li = document.createElement('li');
  li.textContent = topic;
  li.dataset.topic = topic;
  const x = document.createElement('button');
  x.className = 'ghost';
  x.textContent = '✕';
  x.title = 'Unsubscribe';
  x.onclick = () => removeStream(topic);
  li.append(x);
  $('topic-list').append(li);
  s.li = li;
  streams.set(topic, s);
  page.received[topic] = [];
  return s;
}

function removeStream(topic) {
  const s = streams.get(topic);
  if (!s) return;
  streams.delete(topic);
  s.el.remove();
  s.li.remove();
  client.unsubscribe(topic).catch(() => undefined);
  if (streams.size === 0) $('empty').hidden = false;
}

async function subscribe(topic) {
  if (streams.has(topic)) return;
  const s = addStream(topic);
  try {
    const ack = await client.subscribe(topic, {
      onMessage(data, msg) {
        s.count++;
        s.times.push(performance.now());
        s.countEl.textContent = s.count;
        page.received[topic].push(msg.offset);
        // A test that reloads the page watches deliveries from outside it (Playwright's exposeFunction).
        if (typeof window.pubgateObserve === 'function') window.pubgateObserve(topic, msg.offset);
        row(s.list, '', [['off', msg.offset === undefined ? '–' : '#' + msg.offset], ['time', time()], ['data', shown(data)]]);
      },
      onGap(g) {
        row(s.list, 'note', [['data', `gap signalled at offset ${g.offset}: asking history to fill it`]]);
      },
      onRecoverFailed(info) {
        row(s.list, 'note', [['data', `history could not cover the outage: continuing live from offset ${info.offset}`]]);
      },
    });
    page.acks[topic] = ack;
    row(s.list, 'note info', [['data', `subscribed at offset ${ack.offset ?? '?'}`]]);
    s.el.dataset.subscribed = 'true';
  } catch (e) {
    row(s.list, 'note bad', [['data', `subscribe failed: ${e.code || ''} ${e.message}`]]);
  }
}

setInterval(() => {
  const now = performance.now();
  for (const s of streams.values()) {
    while (s.times.length && now - s.times[0] > 5000) s.times.shift();
    s.rateEl.textContent = (s.times.length / 5).toFixed(1);
  }
}, 1000);

$('subscribe-form').onsubmit = (e) => {
  e.preventDefault();
  const topic = $('subscribe-topic').value.trim();
  if (topic) subscribe(topic);
  $('subscribe-topic').value = '';
  if (!$('publish-topic').value) $('publish-topic').value = topic;
};

$('publish-form').onsubmit = async (e) => {
  e.preventDefault();
  const out = $('publish-result');
  let data;
  try {
    data = JSON.parse($('publish-data').value);
  } catch {
    out.textContent = 'data is not valid JSON';
    return;
  }
  try {
    const r = await client.publish($('publish-topic').value.trim(), data);
    out.textContent = `published at offset ${r.offset}`;
  } catch (err) {
    out.textContent = `not published: ${err.code || ''} ${err.message}`;
  }
};

for (const t of (params.get('topics') || '').split(',')) if (t.trim()) subscribe(t.trim());
