// Which AI chat sites the content script understands, and how to read an
// answer and its question from their DOM. A classic script (content scripts
// cannot be ES modules): it defines globalThis.PalateSites, which content.js
// uses and the tests load with node:vm.
//
// Conservative by design: a click is reported only when the button matches a
// selector below AND exactly one answer and a preceding question are found;
// anything ambiguous is dropped rather than guessed. Selectors were taken from
// other open-source tools that read these pages (see README, "Site table");
// sites change their markup, so a stale selector means silence, not bad data.
(function (root) {
  'use strict';

  /**
   * @typedef {object} SiteAction
   * @property {string} selector matches the clickable element (its ancestor is found with closest())
   * @property {'good' | 'bad' | 'regenerate'} signal what the click means
   *
   * @typedef {object} Site
   * @property {string} name
   * @property {string[]} hosts exact host names
   * @property {string} user matches one user message (the question)
   * @property {string} assistant matches one assistant message (the answer)
   * @property {string} [assistantText] inside `assistant`, the answer's text without UI chrome
   * @property {SiteAction[]} actions
   */

  /** @type {Site[]} */
  const SITES = [
    {
      name: 'chatgpt',
      hosts: ['chatgpt.com', 'chat.openai.com'],
      user: '[data-message-author-role="user"]',
      assistant: '[data-message-author-role="assistant"]',
      assistantText: '.markdown',
      actions: [
        { selector: 'button[data-testid="good-response-turn-action-button"]', signal: 'good' },
        { selector: 'button[data-testid="bad-response-turn-action-button"]', signal: 'bad' },
      ],
    },
    {
      name: 'claude',
      hosts: ['claude.ai'],
      user: '[data-testid="user-message"]',
      assistant: '.font-claude-response',
      actions: [{ selector: 'button[data-testid="action-bar-retry"]', signal: 'regenerate' }],
    },
    {
      name: 'gemini',
      hosts: ['gemini.google.com'],
      user: 'user-query',
      assistant: 'model-response',
      assistantText: 'message-content',
      actions: [
        { selector: 'thumb-up-button button', signal: 'good' },
        { selector: 'thumb-down-button button', signal: 'bad' },
      ],
    },
  ];

  /**
   * The site entry for a host name, or null.
   * @param {string} hostname
   * @returns {Site | null}
   */
  function siteFor(hostname) {
    return SITES.find((s) => s.hosts.includes(hostname)) || null;
  }

  /** @param {Element} el */
  function textOf(el) {
    // innerText keeps the line breaks a reader sees; textContent is the
    // fallback where layout is unknown (tests, detached nodes).
    const text = typeof el.innerText === 'string' ? el.innerText : el.textContent;
    return text || '';
  }

  /**
   * The answer's text, without buttons and other chrome when the site says where the text is.
   * @param {Site} site
   * @param {Element} answer
   */
  function answerText(site, answer) {
    const inner = site.assistantText ? answer.querySelector(site.assistantText) : null;
    return textOf(inner || answer);
  }

  /**
   * The answer a control belongs to: the answer containing it, or the single
   * answer inside its nearest ancestor that contains any. Null when that
   * ancestor holds several answers (we would be guessing).
   * @param {Site} site
   * @param {Element} control
   * @returns {Element | null}
   */
  function answerFor(site, control) {
    const inside = control.closest(site.assistant);
    if (inside) return inside;
    for (let el = control.parentElement; el; el = el.parentElement) {
      const found = el.querySelectorAll(site.assistant);
      if (found.length === 1) return found[0];
      if (found.length > 1) return null;
    }
    return null;
  }

  /**
   * The text of the last user message before `answer` in document order.
   * One querySelectorAll over both kinds lists them in document order, which
   * avoids compareDocumentPosition (simpler, and the same in every DOM).
   * @param {Site} site
   * @param {Element} answer
   * @returns {string | null}
   */
  function questionBefore(site, answer) {
    const doc = answer.ownerDocument;
    if (!doc) return null;
    let question = null;
    for (const el of doc.querySelectorAll(`${site.user}, ${site.assistant}`)) {
      if (el === answer) break;
      if (el.matches(site.user)) question = el;
    }
    const text = question ? textOf(question) : '';
    return text.trim() ? text : null;
  }

  /**
   * What a click on the page means, if it hit one of the site's feedback controls.
   * @param {Site} site
   * @param {Element} target the clicked element
   * @returns {{site: string, signal: string, prompt: string, response: string} | null}
   */
  function captureClick(site, target) {
    for (const action of site.actions) {
      const control = target.closest(action.selector);
      if (!control) continue;
      const answer = answerFor(site, control);
      if (!answer) return null;
      const response = answerText(site, answer);
      const prompt = questionBefore(site, answer);
      if (!prompt || !response.trim()) return null;
      return { site: site.name, signal: action.signal, prompt, response };
    }
    return null;
  }

  /**
   * The question for a selection the user made (context menu), found from the
   * answer the selection starts in; null when it starts outside any answer.
   * @param {Site | null} site null on pages outside the table
   * @param {string} text the selected text, exactly as the page has it
   * @param {Node | null} anchor where the selection starts
   * @returns {{response: string, prompt: string | null}}
   */
  function selectionContext(site, text, anchor) {
    if (!site || !anchor) return { response: text, prompt: null };
    const el = anchor.nodeType === 1 ? /** @type {Element} */ (anchor) : anchor.parentElement;
    const answer = el ? el.closest(site.assistant) : null;
    return { response: text, prompt: answer ? questionBefore(site, answer) : null };
  }

  root.PalateSites = { SITES, siteFor, captureClick, selectionContext };
})(globalThis);
