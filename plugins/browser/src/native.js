/**
 * One native messaging Port to the Palate host, with request ids.
 *
 * Wire (JSON, framed by the browser): request `{"id", "method", "params"}`,
 * answer `{"id", "result"}` or `{"id", "error": {"code", "message"}}`. One
 * Port is held rather than sendNativeMessage per event, because that would
 * start a host process per call; an open Port also keeps an MV3 service
 * worker alive. After a disconnect the next request opens a new Port.
 */

/** An error answered by the host, or `unavailable` when the host went away. */
export class NativeError extends Error {
  /**
   * @param {string} code a Palate error code (docs/protocol.md section 6)
   * @param {string} message
   * @param {Record<string, unknown>} [details]
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'NativeError';
    this.code = code;
    this.details = details;
  }
}

/**
 * @typedef {object} Port The subset of runtime.Port used here.
 * @property {(msg: unknown) => void} postMessage
 * @property {{addListener: (fn: (msg: any) => void) => void}} onMessage
 * @property {{addListener: (fn: (port: Port) => void) => void}} onDisconnect
 * @property {() => void} disconnect
 * @property {{message?: string}} [error] Firefox's disconnect reason
 */

export class NativeBridge {
  /** @type {Port | null} */ #port = null;
  /** @type {Map<number, {resolve: (v: any) => void, reject: (e: Error) => void, timer: any}>} */
  #pending = new Map();
  #nextId = 1;
  #connect;
  #lastError;
  #timeoutMs;

  /**
   * @param {() => Port} connect opens a Port, e.g. `() => chrome.runtime.connectNative(HOST_NAME)`
   * @param {{lastError?: () => {message?: string} | undefined, timeoutMs?: number}} [options]
   *   `lastError` reads Chrome's disconnect reason (`chrome.runtime.lastError`)
   */
  constructor(connect, { lastError = () => undefined, timeoutMs = 30_000 } = {}) {
    this.#connect = connect;
    this.#lastError = lastError;
    this.#timeoutMs = timeoutMs;
  }

  /**
   * Send one request to the host.
   * @param {string} method a daemon method, e.g. `ingest`
   * @param {Record<string, unknown>} params
   * @returns {Promise<any>} the result
   * @throws {NativeError}
   */
  request(method, params) {
    const port = this.#open();
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new NativeError('unavailable', `no answer from the Palate host within ${this.#timeoutMs} ms`));
      }, this.#timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      port.postMessage({ id, method, params });
    });
  }

  /**
   * Store one v1 event through the host.
   * @param {Record<string, unknown>} event
   * @returns {Promise<{id: string, seq: number, duplicate: boolean}>}
   */
  ingest(event) {
    return this.request('ingest', { event });
  }

  /** Close the Port; pending requests fail with `unavailable`. */
  disconnect() {
    const port = this.#port;
    if (!port) return;
    this.#dropPort(port, 'the extension closed the connection to the Palate host');
    port.disconnect();
  }

  #open() {
    if (this.#port) return this.#port;
    const port = this.#connect();
    port.onMessage.addListener((msg) => this.#onMessage(msg));
    port.onDisconnect.addListener((p) => {
      // Chrome reports why through runtime.lastError, Firefox through port.error;
      // "host not found" here usually means `palate browser install` was not run.
      const reason = (p && p.error && p.error.message) || this.#lastError()?.message || 'the Palate host exited';
      this.#dropPort(port, reason);
    });
    this.#port = port;
    return port;
  }

  /**
   * @param {Port} port
   * @param {string} reason
   */
  #dropPort(port, reason) {
    if (this.#port !== port) return;
    this.#port = null;
    for (const { reject, timer } of this.#pending.values()) {
      clearTimeout(timer);
      reject(new NativeError('unavailable', reason));
    }
    this.#pending.clear();
  }

  /** @param {any} msg */
  #onMessage(msg) {
    const entry = msg && this.#pending.get(msg.id);
    if (!entry) return;
    this.#pending.delete(msg.id);
    clearTimeout(entry.timer);
    if (msg.error) {
      const { code = 'internal', message = 'error from the Palate host', details = {} } = msg.error;
      entry.reject(new NativeError(String(code), String(message), details));
    } else {
      entry.resolve(msg.result);
    }
  }
}
