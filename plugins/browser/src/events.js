/**
 * v1 events (docs/events.md) from what the browser saw. Pure functions, used
 * by the background script and tested with node --test.
 */

/** The native messaging host the Python side installs as `palate-native-host`. */
export const HOST_NAME = 'com.palate.native_host';

/** The `source` of every event from this extension. */
export const SOURCE = 'browser';

/**
 * How sure an implicit signal is. Regenerating says "not this one" less
 * surely than a thumbs-down, so it counts half (the adapters' shared rule:
 * implicit signals weigh less than explicit ones).
 */
export const REGENERATE_CONFIDENCE = 0.5;

/** The daemon's limit on one text field, in code points. */
const MAX_TEXT_CHARS = 200_000;

/**
 * The host a page URL belongs to, used as `context.app` (the tool the user
 * talked to); null for URLs without one.
 * @param {string | undefined} url
 * @returns {string | null}
 */
export function appFor(url) {
  try {
    const host = new URL(url ?? '').hostname;
    return host && host.length <= 128 ? host : null;
  } catch {
    return null;
  }
}

/**
 * @param {string} prompt
 * @param {string} response
 * @param {1 | -1} label
 * @param {string | null} app
 * @returns {Record<string, unknown>}
 */
function rating(prompt, response, label, app) {
  /** @type {Record<string, unknown>} */
  const event = { kind: 'rating', source: SOURCE, prompt: lastChars(prompt), response, label };
  if (app) event.context = { app };
  return event;
}

/**
 * Keep the end of an over-long prompt (the part closest to the answer) so the
 * event is not refused; an over-long answer is left to the daemon to refuse.
 * @param {string} text
 */
function lastChars(text) {
  const chars = Array.from(text);
  return chars.length > MAX_TEXT_CHARS ? chars.slice(-MAX_TEXT_CHARS).join('') : text;
}

/**
 * The event for a click the content script captured on a site's own control.
 * @param {{signal: string, prompt: string, response: string}} capture
 * @param {string} pageUrl
 * @returns {Record<string, unknown>}
 */
export function captureEvent(capture, pageUrl) {
  const app = appFor(pageUrl);
  switch (capture.signal) {
    case 'good':
      return rating(capture.prompt, capture.response, 1, app);
    case 'bad':
      return rating(capture.prompt, capture.response, -1, app);
    case 'regenerate':
      return { ...rating(capture.prompt, capture.response, -1, app), confidence: REGENERATE_CONFIDENCE };
    default:
      throw new Error(`unknown capture signal ${JSON.stringify(capture.signal)}`);
  }
}

/**
 * The event for the context menu ("this answer was good/bad") on a selection.
 * The question comes from the conversation when the site is in the table;
 * elsewhere the page title stands in (on Q&A pages it usually is the
 * question). With neither, there is nothing to learn from: an error.
 * @param {{response: string, prompt: string | null}} selection
 * @param {1 | -1} label
 * @param {{url?: string, title?: string}} page
 * @returns {Record<string, unknown>}
 */
export function selectionEvent(selection, label, page) {
  if (!selection.response || !selection.response.trim()) throw new Error('select the answer first');
  const prompt = selection.prompt && selection.prompt.trim() ? selection.prompt : (page.title ?? '').trim();
  if (!prompt) throw new Error('could not find the question this answer belongs to');
  return rating(prompt, selection.response, label, appFor(page.url));
}
