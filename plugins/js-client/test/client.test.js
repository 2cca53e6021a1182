// The client against a REAL daemon process (skipped when the venv is absent).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Client, PalateError } from '../src/index.js';
import { SKIP_REASON, startDaemon } from './daemon.js';

/** A valid rating event; `n` makes its content (and derived id) unique. */
const rating = (n, extra = {}) => ({
  kind: 'rating',
  source: 'js-test',
  prompt: `Say hi #${n}`,
  response: 'Hello!',
  label: 1,
  ...extra,
});

describe('Client against a real daemon', { skip: SKIP_REASON }, () => {
  /** @type {Awaited<ReturnType<typeof startDaemon>>} */
  let daemon;
  /** @type {Client} */
  let client;

  before(async () => {
    daemon = await startDaemon();
    client = await Client.connect({ socketPath: daemon.socket, timeoutMs: 20_000 });
  });

  after(async () => {
    await client?.close();
    await daemon?.stop();
  });

  test('hello reports the api level, methods and limits', async () => {
    const info = await client.hello({ client: 'js-test', apiLevel: 1 });
    assert.equal(info.name, 'palate');
    assert.equal(info.api_level, 1);
    assert.ok(info.methods.includes('ingest_batch'), info.methods.join(','));
    assert.equal(info.limits.max_in_flight, 64);
    assert.equal(typeof info.pid, 'number');
  });

  test('the socket path resolved from PALATE_HOME is the daemon socket', async () => {
    const { resolveSocketPath } = await import('../src/index.js');
    assert.equal(resolveSocketPath({ env: { PALATE_HOME: daemon.home } }), daemon.socket);
  });

  test('ingest stores once; a resend is a harmless duplicate', async () => {
    const event = rating(1, { id: 'js-ingest-1', ts: 1764150000.25, context: { app: 'node' } });
    const first = await client.ingest(event);
    assert.deepEqual(first, { id: 'js-ingest-1', seq: first.seq, duplicate: false });
    const again = await client.ingest(event);
    assert.deepEqual(again, { id: 'js-ingest-1', seq: first.seq, duplicate: true });
    const status = await client.status();
    assert.equal(status.events.by_source['js-test'], 1);
  });

  test('an event without id gets the derived content id', async () => {
    // docs/events.md: this exact event has this id.
    const event = { source: 'cli', kind: 'pair', prompt: '2+2?', chosen: '4', rejected: '5' };
    const result = await client.ingest(event);
    assert.equal(result.id, 'd-f924d3a6a2c23d7f3a7e6fd94cd835ae9969c881');
  });

  test('ingestBatch stores events with a cursor in one transaction', async () => {
    const events = [rating(10), rating(11), rating(10)];
    const cursor = { adapter: 'js-test', key: '/log', value: { offset: 123 } };
    const result = await client.ingestBatch(events, cursor);
    assert.equal(result.accepted, 2);
    assert.equal(result.duplicates, 1);
    assert.deepEqual(
      result.results.map((r) => r.duplicate),
      [false, false, true],
    );
    assert.equal(result.results[2].id, result.results[0].id);
    assert.deepEqual(await client.cursors('js-test'), { '/log': { offset: 123 } });
    assert.deepEqual(await client.cursors('nobody'), {});
  });

  test('an invalid event is rejected with the documented error shape', async () => {
    const bad = { kind: 'rating', source: 'js-test', prompt: ' ', response: 'x', label: 2 };
    const err = await client.ingest(bad).then(
      () => assert.fail('accepted an invalid event'),
      (e) => e,
    );
    assert.ok(err instanceof PalateError);
    assert.equal(err.code, 'invalid_event');
    assert.match(err.message, /^invalid event: /);
    const fields = err.details.errors.map((/** @type {{field: string}} */ e) => e.field).sort();
    assert.deepEqual(fields, ['label', 'prompt']);
    // A request-level error leaves the connection usable.
    assert.equal((await client.hello()).name, 'palate');
  });

  test('a rejected batch names events by index and stores nothing', async () => {
    const before = (await client.status()).events.total;
    const err = await client.ingestBatch([rating(20), rating(21, { label: 0 })]).catch((e) => e);
    assert.equal(err.code, 'invalid_event');
    assert.deepEqual(err.details.errors.map((/** @type {{field: string}} */ e) => e.field), ['events[1].label']);
    assert.equal((await client.status()).events.total, before);
  });

  test('an unknown method is unknown_method with the known ones listed', async () => {
    const err = await client.call('no_such_method', {}).catch((e) => e);
    assert.equal(err.code, 'unknown_method');
    assert.ok(err.details.methods.includes('ingest'));
  });

  test('rerank before any model is trained surfaces no_model', async () => {
    const err = await client.rerank('p', ['a', 'b'], { topK: 1 }).catch((e) => e);
    assert.equal(err.code, 'no_model');
    assert.match(err.message, /palate train/);
  });

  test('generate maps its options to the wire and needs a deployed model', async () => {
    const none = await client.generate('p', { n: 2, maxTokens: 4, seed: 1 }).catch((e) => e);
    assert.equal(none.code, 'no_model');
    const bad = await client.generate('p', { maxTokens: 0 }).catch((e) => e);
    assert.equal(bad.code, 'invalid_request');
    assert.equal(bad.details.param, 'max_tokens');
    const strategy = await client.generate('p', { strategy: 'worst' }).catch((e) => e);
    assert.equal(strategy.code, 'invalid_request');
    assert.match(strategy.message, /strategy/);
  });

  test('unknown parameters are refused, not ignored', async () => {
    const err = await client.call('status', { verbose: true }).catch((e) => e);
    assert.equal(err.code, 'invalid_request');
  });

  test('pipelined calls all resolve with their own results', async () => {
    const results = await Promise.all(Array.from({ length: 100 }, (_, i) => client.ingest(rating(1000 + i))));
    assert.equal(new Set(results.map((r) => r.seq)).size, 100);
    assert.ok(results.every((r) => r.duplicate === false));
  });

  test('an oversized request is refused locally and the connection survives', async () => {
    const huge = rating(30, { response: 'x'.repeat(5 * 1024 * 1024) });
    const err = await client.ingest(huge).catch((e) => e);
    assert.equal(err.code, 'too_large');
    assert.equal(client.closed, false);
    assert.equal((await client.hello()).name, 'palate');
  });
});

test('connecting when no daemon runs is unavailable', async () => {
  const socketPath = '/tmp/palate-js-no-such-dir/palate.sock';
  const err = await Client.connect({ socketPath }).catch((e) => e);
  assert.ok(err instanceof PalateError);
  assert.equal(err.code, 'unavailable');
  assert.match(err.message, /not running/);
  assert.equal(err.details.socket, socketPath);
});
