/**
 * The one error shape of the Palate protocol: `{code, message, details}`
 * (docs/protocol.md, section 6). Codes are stable, so programs branch on
 * `err.code`; `message` is for humans; `details` carries structured data.
 */

/**
 * Every error code of api level 1. A code outside this list is never
 * constructed locally; one received from a newer daemon becomes `internal`
 * (see {@link PalateError.fromWire}).
 * @type {readonly string[]}
 */
export const ERROR_CODES = Object.freeze([
  'invalid_request',
  'invalid_event',
  'too_large',
  'unknown_method',
  'busy',
  'unauthorized',
  'not_found',
  'conflict',
  'storage_full',
  'storage_error',
  'key_error',
  'unavailable',
  'model_error',
  'no_model',
  'internal',
]);

const KNOWN = new Set(ERROR_CODES);

/** An error from the daemon, or produced by the client with a protocol code. */
export class PalateError extends Error {
  /**
   * @param {string} code one of {@link ERROR_CODES}
   * @param {string} message what happened and what to do, for humans
   * @param {Record<string, unknown>} [details] structured data for programs
   */
  constructor(code, message, details = {}) {
    // Refusing unknown codes here catches typos in this package; codes that
    // arrive from the wire go through fromWire, which never throws.
    if (!KNOWN.has(code)) throw new TypeError(`unknown Palate error code ${JSON.stringify(code)}`);
    super(message);
    this.name = 'PalateError';
    /** @type {string} */
    this.code = code;
    /** @type {Record<string, unknown>} */
    this.details = details;
  }

  /**
   * Rebuild an error received on the wire. Tolerant by design (protocol.md
   * section 4): an unknown code becomes `internal` and the original code is
   * kept in `details.code`, exactly as the Python client does.
   * @param {unknown} obj the `error` element of a response or notification
   * @returns {PalateError}
   */
  static fromWire(obj) {
    if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
      return new PalateError('internal', `malformed error from daemon: ${JSON.stringify(obj)}`);
    }
    const { code, message, details } = /** @type {Record<string, unknown>} */ (obj);
    let extra =
      details !== null && typeof details === 'object' && !Array.isArray(details)
        ? /** @type {Record<string, unknown>} */ (details)
        : {};
    let known = typeof code === 'string' && KNOWN.has(code) ? code : null;
    if (known === null) {
      extra = { ...extra, code };
      known = 'internal';
    }
    return new PalateError(known, message === undefined ? '' : String(message), extra);
  }

  /** @returns {{code: string, message: string, details: Record<string, unknown>}} */
  toJSON() {
    return { code: this.code, message: this.message, details: this.details };
  }
}
