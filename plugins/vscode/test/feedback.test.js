import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Client } from '@palate/client';
import { FeedbackSender, FeedbackSession, externalEvent, pairEvent, promptFromPrefix, ratingEvent } from '../src/feedback.js';
import { SKIP_REASON, startDaemon } from '../../js-client/test/daemon.js';

const sel = (text, prefix = 'def add(a, b):\n', languageId = 'python') => ({
  text,
  prefix,
  fileName: 'math.py',
  languageId,
});

test('the prompt is the code before the selection, cut at a line start', () => {
  assert.equal(promptFromPrefix('import os\n', 'a.py'), 'import os\n');
  assert.equal(promptFromPrefix('aaaa\nbbbb\ncc', 'a.py', 8), 'bbbb\ncc');
  // No newline inside the window: keep the raw tail rather than nothing.
  assert.equal(promptFromPrefix('abcdefghij', 'a.py', 4), 'ghij');
  assert.equal(promptFromPrefix('  \n\t', 'a.py'), 'File: a.py');
});

test('ratingEvent builds a v1 rating with editor context', () => {
  const event = ratingEvent({ prompt: 'p', text: 'r', languageId: 'python' }, -1);
  assert.deepEqual(event, {
    kind: 'rating',
    source: 'vscode',
    prompt: 'p',
    response: 'r',
    label: -1,
    context: { app: 'vscode', domain: 'code', language: 'python' },
  });
  const noLanguage = ratingEvent({ prompt: 'p', text: 'r', languageId: '' }, 1);
  assert.equal('language' in /** @type {any} */ (noLanguage.context), false);
});

test('pairEvent takes the prompt of the earlier answer', () => {
  const event = pairEvent({ prompt: 'new', text: 'good', languageId: 'go' }, { prompt: 'old', text: 'bad', languageId: 'go' });
  assert.equal(event.prompt, 'old');
  assert.equal(event.chosen, 'good');
  assert.equal(event.rejected, 'bad');
});

test('externalEvent defaults the source but keeps a given one', () => {
  assert.equal(externalEvent({ kind: 'rating' }).source, 'vscode');
  assert.equal(externalEvent({ kind: 'rating', source: 'copilot-x' }).source, 'copilot-x');
  assert.throws(() => externalEvent(null), TypeError);
  assert.throws(() => externalEvent([]), TypeError);
});

test('FeedbackSession: prefer remembers first, then sends a chained pair', async () => {
  /** @type {Record<string, unknown>[]} */
  const sent = [];
  const session = new FeedbackSession({ send: async (e) => (sent.push(e), { duplicate: false }) });
  assert.deepEqual(await session.prefer(sel('return a - b')), { remembered: true });
  assert.equal(sent.length, 0);
  await session.prefer(sel('return a + b', 'changed prefix\n'));
  assert.deepEqual([sent[0].chosen, sent[0].rejected, sent[0].prompt], ['return a + b', 'return a - b', 'def add(a, b):\n']);
  await session.prefer(sel('return sum((a, b))'));
  assert.deepEqual([sent[1].chosen, sent[1].rejected], ['return sum((a, b))', 'return a + b']);
  await assert.rejects(session.prefer(sel('return sum((a, b))')), /same text/);
  await assert.rejects(session.mark(sel('   '), 1), /Select the answer first/);
});

test('FeedbackSession: a marked answer is the one the next preference competes with', async () => {
  /** @type {Record<string, unknown>[]} */
  const sent = [];
  const session = new FeedbackSession({ send: async (e) => (sent.push(e), {}) });
  await session.mark(sel('x = 1'), -1);
  await session.prefer(sel('x = 2'));
  assert.deepEqual(sent.map((e) => e.kind), ['rating', 'pair']);
  assert.equal(sent[1].rejected, 'x = 1');
});

describe('FeedbackSender against a real daemon', { skip: SKIP_REASON }, () => {
  /** @type {Awaited<ReturnType<typeof startDaemon>>} */
  let daemon;
  let connects = 0;
  /** @type {Client | undefined} the sender's current connection */
  let current;
  /** @type {FeedbackSender} */
  let sender;

  before(async () => {
    daemon = await startDaemon();
    sender = new FeedbackSender(() => {
      connects += 1;
      return Client.connect({ socketPath: daemon.socket }).then((c) => (current = c));
    });
  });
  after(async () => {
    await sender?.dispose();
    await daemon?.stop();
  });

  test('commands store events the daemon accepts, once', async () => {
    const session = new FeedbackSession(sender);
    const good = await session.mark(sel('return a + b'), 1);
    assert.equal(/** @type {any} */ (good.result).duplicate, false);
    const again = await session.mark(sel('return a + b'), 1);
    assert.equal(/** @type {any} */ (again.result).duplicate, true);
    const pair = await session.prefer(sel('return b + a'));
    assert.equal(/** @type {any} */ (pair).result.duplicate, false);
    const status = await /** @type {Client} */ (current).status();
    assert.deepEqual(status.events.by_kind, { rating: 1, pair: 1 });
    assert.equal(connects, 1);
  });

  test('an invalid external event is rejected with invalid_event', async () => {
    await assert.rejects(sender.send(externalEvent({ kind: 'rating', prompt: 'p' })), { code: 'invalid_event' });
  });

  test('the sender reconnects after its connection was closed', async () => {
    await /** @type {Client} */ (current).close();
    const before = connects;
    const result = await sender.send(ratingEvent({ prompt: 'p', text: 'reconnected', languageId: 'c' }, 1));
    assert.equal(result.duplicate, false);
    assert.equal(connects, before + 1);
  });
});
