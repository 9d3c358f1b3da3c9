// Test doubles: a WebSocket that records what the client sends, and a clock the test moves by hand.
export class FakeClock {
  constructor() {
    this.now = 1_000_000;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { fn, at: this.now + ms, ms });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
  }
  /** Runs every timer due within `ms`, in order, and moves the clock. */
  async advance(ms) {
    const end = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= end && (!next || t.at < next[1].at)) next = [id, t];
      if (!next) break;
      this.timers.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
      await flush();
    }
    this.now = end;
    await flush();
  }
  /** Delays of the pending timers (ms from when each was set). */
  pending() {
    return [...this.timers.values()].map((t) => t.ms);
  }
}

export async function flush() {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

export function fakeSocketClass() {
  const sockets = [];
  class FakeWS {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.closed = null;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closed = { code, reason };
    }
    // --- driven by the test ---
    open() {
      this.onopen && this.onopen({});
    }
    recv(frame) {
      this.onmessage && this.onmessage({ data: JSON.stringify(frame) });
    }
    serverClose(code, reason = '') {
      this.onclose && this.onclose({ code, reason });
    }
    last(op) {
      return [...this.sent].reverse().find((f) => !op || f.op === op);
    }
    ops() {
      return this.sent.map((f) => f.op);
    }
  }
  return { FakeWS, sockets };
}
