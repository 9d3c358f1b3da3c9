// Type declarations for pubgate.js, the pubgate JavaScript client.

/** A position in a topic: the epoch and the offset of the last message processed. */
export interface Position {
  epoch: string;
  offset: number;
}

/** A `message` frame as received from the gateway. */
export interface Message<T = unknown> {
  op: 'message';
  topic: string;
  /** Absent on messages published straight into the broker (raw `PUBLISH`). */
  offset?: number;
  /** Present on the first message (offset 1) of an epoch. */
  epoch?: string;
  data: T;
}

export interface SubscribeAck {
  topic: string;
  /** Absent for a wildcard subscription (`scores.*`, `scores.>`), which has no position of its own. */
  epoch?: string | null;
  offset?: number | null;
  recovered?: boolean;
  /** A wildcard's ack: the server's time (ms) its messages are live from, when the server offers it. */
  time?: number;
}

export interface GapInfo {
  topic: string;
  /** The epoch and offset the server's gap frame names. */
  epoch: string;
  offset: number;
  /** The client's position when the gap frame came. */
  last: Position | null;
}

export interface RecoverFailedInfo {
  topic: string;
  /** The topic's current epoch and latest offset: the live stream continues after it. */
  epoch: string;
  offset: number;
  /** The position the client asked to resume from. */
  since: Position | null;
}

export interface TopicHandlers<T = unknown> {
  /** Called once per message, in offset order, never twice for one offset of an epoch. */
  onMessage?: (data: T, message: Message<T>) => void;
  /** The server signalled a gap; the client is asking history to fill it (unsubscribe + subscribe with since). */
  onGap?: (info: GapInfo) => void;
  /** History could not cover what was missed: reload the topic's state, then go on live. */
  onRecoverFailed?: (info: RecoverFailedInfo) => void;
  /** The server ended the subscription (a refreshed token no longer allows it); it is not resubscribed. */
  onUnsubscribed?: (info: UnsubscribedInfo) => void;
}

export interface UnsubscribedInfo {
  topic: string;
  /** `forbidden` today. */
  reason: string;
}

export interface DisconnectedEvent {
  code?: number;
  reason?: string;
  willReconnect: boolean;
  /** ms until the next attempt. */
  delay?: number;
}

export interface ClientOptions {
  /** A token (sent as `access_token`), or a callback that fetches one (called again after a 4001 close and before `exp`). */
  token?: string | (() => string | Promise<string>);
  getToken?: () => string | Promise<string>;
  /** A WebSocket constructor (Node: `ws`, or Node 22's global). Defaults to `globalThis.WebSocket`. */
  WebSocket?: unknown;
  /** Connect at once (default false for `new PubgateClient`, true for `connect()`). */
  connect?: boolean;
  ackTimeout?: number;
  backoffBase?: number;
  backoffMax?: number;
  stableAfter?: number;
  drainSpread?: number;
  refreshMargin?: number;
  connectTimeout?: number;
  /** ms to wait for the token callback before retrying with backoff (default 10000). */
  tokenTimeout?: number;
  /** ms: refreshes never come closer than this (default 1000). */
  minRefreshInterval?: number;
  /** Server frames longer than this many characters are refused unparsed (default 16 MiB). */
  maxFrameChars?: number;
  /** `'session'`: keep each topic's position in sessionStorage so a page reload resumes without loss (not in shared mode). */
  persist?: 'session';
  /** The storage `persist` uses (default `sessionStorage`). */
  storage?: Pick<Storage, 'getItem' | 'setItem' | 'removeItem'> | null;
  /** Share one connection among the tabs of this origin (SharedWorker), for `connect()`. Default true where available. */
  share?: boolean;
  /** URL of pubgate-worker.js (default: next to pubgate.js). */
  workerUrl?: string | URL;
  /** For tests: the random source, clock and timers. */
  random?: () => number;
  now?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  /** Where to listen for `online` (default `window`; null for none). */
  window?: { addEventListener(e: string, f: () => void): void; removeEventListener(e: string, f: () => void): void } | null;
}

export type ClientState = 'idle' | 'connecting' | 'open' | 'waiting' | 'closed';

export interface ResumedEvent {
  topic: string;
  /** The position the client resumed from. */
  since: Position;
  /** The ack's epoch and offset: `since` when recovered, else the topic's current epoch and latest offset. */
  epoch: string;
  offset: number;
  /** True when history covered the outage (the missed messages follow). */
  recovered: boolean;
}

export interface ClientEvents {
  connected: { url: string };
  resumed: ResumedEvent;
  disconnected: DisconnectedEvent;
  error: Error;
  unsubscribed: UnsubscribedInfo;
}

export interface Client {
  readonly state: ClientState;
  /**
   * `topic` may be a wildcard (`scores.*` one level, `scores.>` the rest): its handlers get every matching
   * topic's messages (each `(topic, offset)` once) from each ack on. After a reconnect it resumes from
   * its last ack's `time` and the positions seen (topics it never saw included) when the server offers
   * `time`, else it goes on live (docs/topics.md). Wildcards are refused in shared mode.
   */
  subscribe<T = unknown>(topic: string, handlers: TopicHandlers<T> | ((data: T, message: Message<T>) => void), options?: { since?: Position }): Promise<SubscribeAck>;
  unsubscribe(topic: string): Promise<void>;
  publish(topic: string, data: unknown): Promise<Position>;
  topics(): string[];
  /** Reconnects at once if waiting out a backoff (the browser's `online` event calls it). */
  reconnect(): void;
  on<E extends keyof ClientEvents>(event: E, fn: (arg: ClientEvents[E]) => void): () => void;
  off<E extends keyof ClientEvents>(event: E, fn: (arg: ClientEvents[E]) => void): void;
  close(): void;
}

export class PubgateClient implements Client {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  connect(): this;
  subscribe<T = unknown>(topic: string, handlers: TopicHandlers<T> | ((data: T, message: Message<T>) => void), options?: { since?: Position }): Promise<SubscribeAck>;
  unsubscribe(topic: string): Promise<void>;
  publish(topic: string, data: unknown): Promise<Position>;
  /** Where the client would resume `topic` from. */
  position(topic: string): Position | null;
  topics(): string[];
  reconnect(): void;
  on<E extends keyof ClientEvents>(event: E, fn: (arg: ClientEvents[E]) => void): () => void;
  off<E extends keyof ClientEvents>(event: E, fn: (arg: ClientEvents[E]) => void): void;
  close(): void;
}

/**
 * A connected client: shared among tabs through a SharedWorker when available and `share` is not false.
 * Shared, `position()` resolves asynchronously (the position lives in the worker).
 */
export function connect(url: string, options?: ClientOptions): Client & { readonly shared?: boolean; position(topic: string): Position | null | Promise<Position | null> };

/** The store behind `persist: 'session'`: one entry per topic, keyed by the URL without its query. */
export class PositionStore {
  constructor(storage: Pick<Storage, 'getItem' | 'setItem' | 'removeItem'> | null, url: string);
  load(topic: string): Position | null;
  save(topic: string, epoch: string | null, offset: number | null): void;
  remove(topic: string): void;
}

export class PubgateError extends Error {
  /** A protocol error code (`forbidden`, `rate_limited`, …) or `timeout`, `disconnected`, `closed`, `token_expired`, `token` (the callback failed, hung or gave no usable token), `bad_frame` (the server sent something outside the protocol). */
  code: string;
  constructor(code: string, message?: string);
}

/** Full-jitter capped exponential backoff: random in [0, min(max, base * 2^attempt)). */
export function backoffDelay(attempt: number, base?: number, max?: number, random?: () => number): number;
/** A JWT's `exp` in ms, or null. */
export function tokenExpiry(token: string): number | null;
/** ms from `now` until the token should be refreshed, or null when it has no `exp`. */
export function refreshDelay(token: string, now?: number, margin?: number): number | null;

export const DEFAULTS: Readonly<Required<Pick<ClientOptions, 'ackTimeout' | 'backoffBase' | 'backoffMax' | 'stableAfter' | 'drainSpread' | 'refreshMargin' | 'connectTimeout' | 'tokenTimeout' | 'minRefreshInterval' | 'maxFrameChars'>>>;
export const CLOSE_AUTH: 4001;
export const CLOSE_GOING_AWAY: 1001;
