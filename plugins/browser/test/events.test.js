import assert from 'node:assert/strict';
import { test } from 'node:test';
import { REGENERATE_CONFIDENCE, appFor, captureEvent, selectionEvent } from '../src/events.js';

const capture = (signal) => ({ signal, prompt: 'q', response: 'a' });

test('captured thumbs become ratings with the site as app', () => {
  assert.deepEqual(captureEvent(capture('good'), 'https://chatgpt.com/c/1'), {
    kind: 'rating',
    source: 'browser',
    prompt: 'q',
    response: 'a',
    label: 1,
    context: { app: 'chatgpt.com' },
  });
  assert.equal(captureEvent(capture('bad'), 'https://claude.ai/').label, -1);
});

test('regenerate is a negative rating with lower confidence', () => {
  const event = captureEvent(capture('regenerate'), 'https://claude.ai/chat/x');
  assert.equal(event.label, -1);
  assert.equal(event.confidence, REGENERATE_CONFIDENCE);
  assert.ok(REGENERATE_CONFIDENCE > 0 && REGENERATE_CONFIDENCE < 1);
  assert.throws(() => captureEvent(capture('copy'), 'https://x/'), /unknown capture signal/);
});

test('a selection uses the conversation question, else the page title', () => {
  const page = { url: 'https://stackoverflow.com/q/1', title: 'How do I exit vim?' };
  assert.equal(selectionEvent({ response: ':q', prompt: 'exit vim?' }, 1, page).prompt, 'exit vim?');
  const fromTitle = selectionEvent({ response: ':q', prompt: null }, -1, page);
  assert.deepEqual([fromTitle.prompt, fromTitle.label, fromTitle.context], ['How do I exit vim?', -1, { app: 'stackoverflow.com' }]);
  assert.throws(() => selectionEvent({ response: ':q', prompt: ' ' }, 1, { url: 'file:///x', title: ' ' }), /question/);
  assert.throws(() => selectionEvent({ response: '  ', prompt: 'q' }, 1, page), /select the answer/);
});

test('no context for URLs without a host; over-long prompts keep their end', () => {
  assert.equal(appFor('file:///tmp/a.html'), null);
  assert.equal(appFor('not a url'), null);
  const event = selectionEvent({ response: 'a', prompt: `${'x'.repeat(200_000)}END` }, 1, { url: 'about:blank' });
  assert.equal('context' in event, false);
  assert.equal(/** @type {string} */ (event.prompt).length, 200_000);
  assert.ok(/** @type {string} */ (event.prompt).endsWith('END'));
});
