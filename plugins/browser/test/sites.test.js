import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseHTML } from 'linkedom';
import { loadSites } from './load-sites.js';

const S = loadSites();

// Trimmed copies of each site's markup, as the selector table expects it.
const CHATGPT = `<main>
  <article data-testid="conversation-turn-1"><div data-message-author-role="user" data-message-id="u1">What is 2+2?</div></article>
  <article data-testid="conversation-turn-2">
    <div data-message-author-role="assistant" data-message-id="a1"><div class="markdown">It is 4.</div></div>
    <div><button data-testid="copy-turn-action-button">Copy</button>
      <button data-testid="good-response-turn-action-button"><svg><path id="up"/></svg></button>
      <button data-testid="bad-response-turn-action-button">Bad</button></div>
  </article>
  <article data-testid="conversation-turn-3"><div data-message-author-role="user">And 3+3?</div></article>
  <article data-testid="conversation-turn-4">
    <div data-message-author-role="assistant"><div class="markdown">6.</div></div>
    <button data-testid="bad-response-turn-action-button" id="bad2">Bad</button>
  </article>
</main>`;

const CLAUDE = `<div>
  <div data-index="0"><div data-testid="user-message">Name a colour</div></div>
  <div data-index="1"><div class="font-claude-response" data-is-streaming="false">Blue.</div>
    <div role="group" aria-label="Message actions"><button data-testid="action-bar-copy">Copy</button>
    <button data-testid="action-bar-retry" id="retry">Retry</button></div></div>
</div>`;

const GEMINI = `<div>
  <user-query>Capital of France?</user-query>
  <model-response><message-content>Paris.</message-content>
    <message-actions><thumb-up-button><button aria-label="Good response" id="up">Up</button></thumb-up-button>
    <thumb-down-button><button aria-label="Bad response">Down</button></thumb-down-button></message-actions>
  </model-response>
</div>`;

/** @param {string} html */
const doc = (html) => parseHTML(`<!doctype html><html><body>${html}</body></html>`).document;

test('siteFor knows each host and nothing else', () => {
  assert.equal(S.siteFor('chatgpt.com').name, 'chatgpt');
  assert.equal(S.siteFor('chat.openai.com').name, 'chatgpt');
  assert.equal(S.siteFor('claude.ai').name, 'claude');
  assert.equal(S.siteFor('gemini.google.com').name, 'gemini');
  assert.equal(S.siteFor('evil-chatgpt.com'), null);
});

test('ChatGPT thumbs capture the answer of their own turn and the question before it', () => {
  const d = doc(CHATGPT);
  const site = S.siteFor('chatgpt.com');
  // The click lands on the icon inside the button.
  // Spread: results come from the vm realm, and deepEqual compares prototypes.
  assert.deepEqual({ ...S.captureClick(site, d.getElementById('up')) }, {
    site: 'chatgpt',
    signal: 'good',
    prompt: 'What is 2+2?',
    response: 'It is 4.',
  });
  const second = S.captureClick(site, d.getElementById('bad2'));
  assert.deepEqual([second.signal, second.prompt, second.response], ['bad', 'And 3+3?', '6.']);
  assert.equal(S.captureClick(site, d.querySelector('[data-testid="copy-turn-action-button"]')), null);
});

test('Claude retry is a regenerate signal', () => {
  const d = doc(CLAUDE);
  const got = S.captureClick(S.siteFor('claude.ai'), d.getElementById('retry'));
  assert.deepEqual({ ...got }, { site: 'claude', signal: 'regenerate', prompt: 'Name a colour', response: 'Blue.' });
});

test('Gemini thumbs inside the answer read only the answer text', () => {
  const d = doc(GEMINI);
  const got = S.captureClick(S.siteFor('gemini.google.com'), d.getElementById('up'));
  assert.deepEqual([got.signal, got.prompt, got.response], ['good', 'Capital of France?', 'Paris.']);
});

test('ambiguous or incomplete markup yields nothing', () => {
  const site = S.siteFor('chatgpt.com');
  // Two answers under the button's nearest answer-holding ancestor.
  const two = doc(`<div data-message-author-role="user">q</div><div>
    <div data-message-author-role="assistant">a</div><div data-message-author-role="assistant">b</div>
    <button data-testid="good-response-turn-action-button" id="b">Good</button></div>`);
  assert.equal(S.captureClick(site, two.getElementById('b')), null);
  // No question before the answer.
  const noQuestion = doc(`<div><div data-message-author-role="assistant">a</div>
    <button data-testid="good-response-turn-action-button" id="b">Good</button></div>`);
  assert.equal(S.captureClick(site, noQuestion.getElementById('b')), null);
});

test('selectionContext finds the question of the answer holding the selection', () => {
  const d = doc(CHATGPT);
  const site = S.siteFor('chatgpt.com');
  const text = d.querySelectorAll('.markdown')[1].firstChild;
  assert.deepEqual({ ...S.selectionContext(site, '6', text) }, { response: '6', prompt: 'And 3+3?' });
  assert.deepEqual({ ...S.selectionContext(null, 'x', text) }, { response: 'x', prompt: null });
  // A selection outside any answer has no question: the caller falls back.
  const outside = d.querySelector('[data-message-author-role="user"]').firstChild;
  assert.equal(S.selectionContext(site, 'What', outside).prompt, null);
});
