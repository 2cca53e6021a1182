/**
 * Everything the VS Code extension does that is not VS Code API: building v1
 * events (docs/events.md) from an editor selection, remembering the previous
 * answer for pairwise preferences, and sending over one reconnecting client.
 * extension.cjs only reads the editor and shows messages.
 */

/** The `source` of events this extension builds. */
export const SOURCE = 'vscode';

/** How much text before the selection becomes the prompt. */
export const PROMPT_CHARS = 2000;

/**
 * @typedef {object} Selection What the extension reads from the active editor.
 * @property {string} text the selected text (the answer being judged)
 * @property {string} prefix document text before the selection
 * @property {string} fileName base name of the document, used when the prefix is blank
 * @property {string} languageId VS Code language id, e.g. `python`
 */

/**
 * @typedef {object} Answer
 * @property {string} prompt
 * @property {string} text
 * @property {string} languageId
 */

/**
 * The prompt for a selection: the code before it, as a completion model saw it
 * (the same framing Continue uses for autocomplete outcomes). Cut to the last
 * `maxChars` characters at a line start, so no half line opens the prompt.
 * When nothing but whitespace precedes the selection, the file name stands in,
 * because the daemon refuses a blank prompt.
 * @param {string} prefix
 * @param {string} fileName
 * @param {number} [maxChars]
 * @returns {string}
 */
export function promptFromPrefix(prefix, fileName, maxChars = PROMPT_CHARS) {
  let prompt = prefix;
  if (prompt.length > maxChars) {
    const tail = prompt.slice(-maxChars);
    const newline = tail.indexOf('\n');
    prompt = newline >= 0 && newline < tail.length - 1 ? tail.slice(newline + 1) : tail;
  }
  return prompt.trim() === '' ? `File: ${fileName}` : prompt;
}

/**
 * @param {string} languageId
 * @returns {{app: string, domain: string, language?: string}}
 */
function contextFor(languageId) {
  const context = { app: 'vscode', domain: 'code' };
  // The daemon limits context values to 1-128 characters.
  return languageId && languageId.length <= 128 ? { ...context, language: languageId } : context;
}

/**
 * A `rating` event: thumbs up (+1) or down (-1) on one answer. No `id`: the
 * daemon derives one from the content, so marking the same text twice stores once.
 * @param {Answer} answer
 * @param {1 | -1} label
 * @returns {Record<string, unknown>}
 */
export function ratingEvent(answer, label) {
  return {
    kind: 'rating',
    source: SOURCE,
    prompt: answer.prompt,
    response: answer.text,
    label,
    context: contextFor(answer.languageId),
  };
}

/**
 * A `pair` event: `chosen` preferred over `rejected` for the same prompt.
 * @param {Answer} chosen
 * @param {Answer} rejected its prompt is used: it is the answer first given
 * @returns {Record<string, unknown>}
 */
export function pairEvent(chosen, rejected) {
  return {
    kind: 'pair',
    source: SOURCE,
    prompt: rejected.prompt,
    chosen: chosen.text,
    rejected: rejected.text,
    context: contextFor(chosen.languageId || rejected.languageId),
  };
}

/**
 * An event handed in by another extension: a copy with `source` defaulting to
 * `vscode`. Everything else is left to the daemon's validation, which reports
 * every problem at once (an `invalid_event` PalateError).
 * @param {unknown} event
 * @returns {Record<string, unknown>}
 */
export function externalEvent(event) {
  if (event === null || typeof event !== 'object' || Array.isArray(event)) {
    throw new TypeError('sendFeedback expects a v1 event object (see docs/events.md)');
  }
  return { source: SOURCE, ...event };
}

/**
 * Sends events over one client connection, opened lazily and reopened after
 * the daemon closed it (idle timeout, restart). A send that fails because the
 * connection was lost is retried once on a fresh one; that is safe because
 * ingest is idempotent (explicit or content-derived ids).
 */
export class FeedbackSender {
  /** @type {import('@palate/client').Client | null} */ #client = null;
  #connect;

  /** @param {() => Promise<import('@palate/client').Client>} connect opens a client */
  constructor(connect) {
    this.#connect = connect;
  }

  /**
   * Ingest one event.
   * @param {Record<string, unknown>} event
   * @returns {Promise<{id: string, seq: number, duplicate: boolean}>}
   * @throws {import('@palate/client').PalateError}
   */
  async send(event) {
    try {
      return await (await this.#open()).ingest(event);
    } catch (e) {
      const err = /** @type {{code?: string}} */ (e);
      if (err.code !== 'unavailable' || !this.#client?.closed) throw e;
      this.#client = null;
      return (await this.#open()).ingest(event);
    }
  }

  /** Close the connection, if one is open. */
  async dispose() {
    const client = this.#client;
    this.#client = null;
    await client?.close();
  }

  async #open() {
    if (!this.#client || this.#client.closed) this.#client = await this.#connect();
    return this.#client;
  }
}

/**
 * The commands' logic: marks answers and pairs an answer with the previous one.
 * Every command remembers its answer as "the previous answer", so mark an
 * answer, regenerate, select the new one and run "Prefer this" to store a pair.
 */
export class FeedbackSession {
  /** @type {Answer | null} */ #previous = null;
  #sender;

  /** @param {{send: (event: Record<string, unknown>) => Promise<unknown>}} sender */
  constructor(sender) {
    this.#sender = sender;
  }

  /**
   * Rate the selected answer.
   * @param {Selection} selection
   * @param {1 | -1} label
   * @returns {Promise<{event: Record<string, unknown>, result: unknown}>}
   */
  async mark(selection, label) {
    const answer = answerFrom(selection);
    const event = ratingEvent(answer, label);
    const result = await this.#sender.send(event);
    this.#previous = answer;
    return { event, result };
  }

  /**
   * Prefer the selected answer over the previous one. Without a previous
   * answer, only remembers this one and sends nothing.
   * @param {Selection} selection
   * @returns {Promise<{remembered: true} | {event: Record<string, unknown>, result: unknown}>}
   */
  async prefer(selection) {
    const answer = answerFrom(selection);
    const previous = this.#previous;
    if (previous === null) {
      this.#previous = answer;
      return { remembered: true };
    }
    if (previous.text === answer.text) {
      throw new Error('This is the same text as the previous answer; select the other answer.');
    }
    const event = pairEvent(answer, previous);
    const result = await this.#sender.send(event);
    // Chain: the winner becomes the answer the next regeneration competes with.
    this.#previous = { ...answer, prompt: previous.prompt };
    return { event, result };
  }
}

/**
 * @param {Selection} selection
 * @returns {Answer}
 */
function answerFrom(selection) {
  if (selection.text.trim() === '') throw new Error('Select the answer first.');
  return {
    prompt: promptFromPrefix(selection.prefix, selection.fileName),
    text: selection.text,
    languageId: selection.languageId,
  };
}
