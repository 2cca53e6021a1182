/**
 * A pipelining msgpack-RPC client for the Palate daemon (docs/protocol.md).
 *
 * One Unix-socket connection; requests carry increasing msgids and responses
 * are matched by msgid because the daemon answers concurrently and out of
 * order. At most `maxInFlight` requests are outstanding (the daemon answers
 * the 65th with `busy`), further calls wait their turn locally.
 */

import net from 'node:net';
import { decodeMultiStream, encode } from '@msgpack/msgpack';
import { PalateError } from './errors.js';
import { resolveSocketPath } from './paths.js';

const REQUEST = 0;
const RESPONSE = 1;
const NOTIFICATION = 2;
const MAX_MSGID = 0xffffffff;

/** Defaults taken from the daemon's documented limits (protocol.md section 8). */
export const DEFAULTS = Object.freeze({
  timeoutMs: 60_000,
  maxInFlight: 64,
  maxFrameBytes: 4 * 1024 * 1024,
});

/**
 * @typedef {object} ClientOptions
 * @property {string} [socketPath] connect here instead of the resolved default
 * @property {number} [timeoutMs] per-call deadline, 60 s like the Python client; 0 = none
 * @property {number} [maxInFlight] outstanding requests before calls queue locally
 * @property {(method: string, params: unknown) => void} [onNotification]
 *   notifications other than the connection-level `error` (none at level 1)
 */

/**
 * @typedef {object} CallOptions
 * @property {number} [timeoutMs] overrides the client's deadline for this call
 */

/**
 * @typedef {object} Pending
 * @property {(value: any) => void} resolve
 * @property {(err: Error) => void} reject
 * @property {NodeJS.Timeout | undefined} timer
 */

/** A connection to the daemon. Create it with {@link Client.connect}. */
export class Client {
  /** @type {net.Socket} */ #socket;
  /** @type {Map<number, Pending>} */ #pending = new Map();
  /** @type {Array<() => void>} calls waiting for an in-flight slot */ #waiting = [];
  #nextId = 1;
  #timeoutMs;
  #maxInFlight;
  #onNotification;
  /** @type {PalateError | null} set once the connection is unusable */ #closedWith = null;
  /** @type {PalateError | null} the daemon's `error` notification, if any */ #serverError = null;

  /**
   * Connect to the daemon.
   * @param {ClientOptions} [options]
   * @returns {Promise<Client>}
   * @throws {PalateError} `unavailable` when nothing listens on the socket
   */
  static async connect(options = {}) {
    const path = options.socketPath ?? resolveSocketPath();
    const socket = await new Promise((resolve, reject) => {
      const s = net.createConnection({ path });
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (/** @type {NodeJS.ErrnoException} */ e) => {
        reject(
          new PalateError(
            'unavailable',
            `the Palate daemon is not running (cannot connect to ${path}: ${e.code ?? e.message}). ` +
              'Start it with `palate daemon`.',
            { socket: path },
          ),
        );
      });
    });
    return new Client(socket, path, options);
  }

  /**
   * Use {@link Client.connect}; this wraps an already connected socket.
   * @param {net.Socket} socket
   * @param {string} path
   * @param {ClientOptions} options
   */
  constructor(socket, path, options) {
    this.#socket = socket;
    /** The socket path this client is connected to. @type {string} */
    this.path = path;
    this.#timeoutMs = options.timeoutMs ?? DEFAULTS.timeoutMs;
    this.#maxInFlight = options.maxInFlight ?? DEFAULTS.maxInFlight;
    this.#onNotification = options.onNotification;
    // The stream errors are reported through the read loop's end; without a
    // listener Node would throw them as uncaught.
    socket.on('error', () => {});
    this.#readLoop();
    this.#updateRef();
  }

  /** Whether the connection is closed (calls then fail with `unavailable` or the daemon's error). */
  get closed() {
    return this.#closedWith !== null;
  }

  /**
   * Send a request and wait for its response.
   * @param {string} method
   * @param {Record<string, unknown> | null} [params] a map; `undefined` values are dropped
   * @param {CallOptions} [options]
   * @returns {Promise<any>} the result
   * @throws {PalateError} the daemon's error, or `unavailable` (connection lost or timeout),
   *   or `too_large` (the message would exceed the frame limit; nothing was sent)
   */
  async call(method, params = {}, options = {}) {
    if (this.#closedWith) throw this.#closedWith;
    // A loop, not an if: a call arriving meanwhile may take the freed slot first.
    while (this.#pending.size >= this.#maxInFlight) {
      await new Promise((resolve) => this.#waiting.push(/** @type {() => void} */ (resolve)));
      if (this.#closedWith) throw this.#closedWith;
    }
    const msgid = this.#allocateId();
    const frame = encode([REQUEST, msgid, method, params ?? {}], { ignoreUndefined: true });
    if (frame.byteLength > DEFAULTS.maxFrameBytes) {
      this.#release();
      // Sending it would cost the connection (the daemon closes on an
      // oversized frame), so refuse before a byte leaves.
      throw new PalateError(
        'too_large',
        `${method} request is ${frame.byteLength} bytes; the limit is ${DEFAULTS.maxFrameBytes}`,
        { max_frame_bytes: DEFAULTS.maxFrameBytes },
      );
    }
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    return new Promise((resolve, reject) => {
      /** @type {Pending} */
      const entry = { resolve, reject, timer: undefined };
      if (timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          // A late answer is then dropped because its msgid is no longer pending.
          this.#settle(msgid);
          reject(new PalateError('unavailable', `no answer to ${method} within ${timeoutMs} ms`, { method }));
        }, timeoutMs);
      }
      this.#pending.set(msgid, entry);
      this.#updateRef();
      this.#socket.write(frame);
    });
  }

  /**
   * Handshake: learn the daemon's api level, methods and limits.
   * @param {{client?: string, apiLevel?: number}} [options]
   * @returns {Promise<{name: string, version: string, api_level: number, min_api_level: number,
   *   methods: string[], limits: Record<string, number>, pid: number}>}
   */
  hello({ client = 'palate-js', apiLevel } = {}) {
    return this.call('hello', { client, api_level: apiLevel });
  }

  /**
   * Store one v1 event (docs/events.md). Resolves after the daemon committed it durably.
   * @param {Record<string, unknown>} event
   * @returns {Promise<{id: string, seq: number, duplicate: boolean}>}
   */
  ingest(event) {
    return this.call('ingest', { event });
  }

  /**
   * Store 1..2000 events atomically, optionally with an adapter cursor committed
   * in the same transaction.
   * @param {Array<Record<string, unknown>>} events
   * @param {{adapter: string, key: string, value: unknown}} [cursor]
   * @returns {Promise<{accepted: number, duplicates: number,
   *   results: Array<{id: string, seq: number, duplicate: boolean}>}>}
   */
  ingestBatch(events, cursor) {
    return this.call('ingest_batch', { events, cursor });
  }

  /**
   * The daemon's status map (events, db, key, daemon sections).
   * @returns {Promise<Record<string, any>>}
   */
  status() {
    return this.call('status');
  }

  /**
   * An adapter's cursors, as `{key: value}` (empty when it has none).
   * @param {string} adapter
   * @returns {Promise<Record<string, unknown>>}
   */
  async cursors(adapter) {
    const result = await this.call('cursors', { adapter });
    return result.cursors;
  }

  /**
   * Score responses to a prompt with the deployed model (`no_model` until one is
   * trained). An older daemon without `score` in `hello().methods` answers
   * `unknown_method`.
   * @param {string} prompt
   * @param {string[]} responses
   * @returns {Promise<Record<string, any>>}
   */
  score(prompt, responses) {
    return this.call('score', { prompt, responses });
  }

  /**
   * Order candidates best-first with the deployed model (`no_model` until one is
   * trained; `unknown_method` from a daemon without `rerank`).
   * @param {string} prompt
   * @param {string[]} candidates
   * @param {{topK?: number}} [options]
   * @returns {Promise<Record<string, any>>} at least `order`, `scores`, `p_best`, `version`
   */
  rerank(prompt, candidates, { topK } = {}) {
    return this.call('rerank', { prompt, candidates, top_k: topK });
  }

  /**
   * Probability that `a` is preferred over `b` (`no_model` until a model is
   * deployed; `unknown_method` from a daemon without `compare`).
   * @param {string} prompt
   * @param {string} a
   * @param {string} b
   * @returns {Promise<Record<string, any>>}
   */
  compare(prompt, a, b) {
    return this.call('compare', { prompt, a, b });
  }

  /**
   * Sample `n` answers to `prompt` from the local policy and return the one the
   * reward model prefers (docs/generation.md): `best`, `best_index`, `candidates`,
   * `scores`, `z`, `finish`, `strategy`, `policy`, `usage`, `version`, and
   * `uncertainty` when the reward model is an ensemble. Generation takes seconds
   * on a CPU, so the default timeout is 5 minutes. `no_model` until a reward
   * model is deployed; `unknown_method` from a daemon without `generate`.
   * @param {string} prompt
   * @param {{n?: number, strategy?: 'best'|'soft'|'lower_bound', lambda?: number,
   *   kappa?: number, maxTokens?: number, temperature?: number, topP?: number,
   *   seed?: number, policy?: 'base'|number|string, model?: string,
   *   rewardModel?: string, timeoutMs?: number}} [options]
   * @returns {Promise<Record<string, any>>}
   */
  generate(prompt, options = {}) {
    const { n, strategy, lambda, kappa, maxTokens, temperature, topP, seed, policy, model,
      rewardModel, timeoutMs = 300_000 } = options;
    return this.call('generate', {
      prompt, n, strategy, lambda, kappa, max_tokens: maxTokens, temperature, top_p: topP,
      seed, policy, model, reward_model: rewardModel, timeout_ms: timeoutMs,
    }, { timeoutMs: timeoutMs + 5_000 });
  }

  /**
   * Close the connection. Outstanding calls fail with `unavailable`.
   * @returns {Promise<void>} resolves once the socket is closed
   */
  close() {
    this.#shutdown(new PalateError('unavailable', 'the client was closed'));
    if (this.#socket.closed) return Promise.resolve();
    return new Promise((resolve) => {
      this.#socket.once('close', () => resolve());
      this.#socket.end();
    });
  }

  async #readLoop() {
    let ended = new PalateError('unavailable', 'the daemon closed the connection');
    try {
      for await (const msg of decodeMultiStream(this.#socket)) this.#dispatch(msg);
    } catch (e) {
      const reason = /** @type {Error} */ (e).message;
      ended = new PalateError('unavailable', `lost the connection to the daemon: ${reason}`);
      this.#socket.destroy();
    }
    // The daemon sends its `error` notification just before closing; that is
    // the real reason, so it wins over the generic one.
    this.#shutdown(this.#serverError ?? ended);
  }

  /** @param {unknown} msg */
  #dispatch(msg) {
    if (!Array.isArray(msg)) return;
    if (msg[0] === RESPONSE && msg.length === 4) {
      const entry = this.#settle(msg[1]);
      if (!entry) return;
      if (msg[2] !== null && msg[2] !== undefined) entry.reject(PalateError.fromWire(msg[2]));
      else entry.resolve(msg[3]);
    } else if (msg[0] === NOTIFICATION && msg.length === 3) {
      // Pending requests are not failed yet: the daemon still lets dispatched
      // requests answer (up to 10 s) so a committed event is acknowledged.
      if (msg[1] === 'error') this.#serverError = PalateError.fromWire(msg[2]);
      else this.#onNotification?.(msg[1], msg[2]);
    }
  }

  /**
   * Forget a pending request and free its slot.
   * @param {unknown} msgid
   * @returns {Pending | undefined}
   */
  #settle(msgid) {
    const entry = this.#pending.get(/** @type {number} */ (msgid));
    if (!entry) return undefined;
    this.#pending.delete(/** @type {number} */ (msgid));
    clearTimeout(entry.timer);
    this.#release();
    return entry;
  }

  /** Hand a freed in-flight slot to the next waiting call. */
  #release() {
    this.#waiting.shift()?.();
    this.#updateRef();
  }

  /** @param {PalateError} err */
  #shutdown(err) {
    if (this.#closedWith) return;
    this.#closedWith = err;
    for (const entry of this.#pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(err);
    }
    this.#pending.clear();
    for (const wake of this.#waiting.splice(0)) wake();
    this.#updateRef();
  }

  #allocateId() {
    // Wraps within 0..2**32-1 and skips ids still pending (only possible after
    // four billion calls on one connection, but then silently wrong otherwise).
    let id = this.#nextId;
    while (this.#pending.has(id)) id = id >= MAX_MSGID ? 0 : id + 1;
    this.#nextId = id >= MAX_MSGID ? 0 : id + 1;
    return id;
  }

  /**
   * An idle connection must not keep a Node process alive (a script that
   * forgot close() would hang), a busy one must until its answers arrive.
   */
  #updateRef() {
    if (this.#pending.size > 0 || this.#waiting.length > 0) this.#socket.ref();
    else this.#socket.unref();
  }
}
