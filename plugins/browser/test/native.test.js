import assert from 'node:assert/strict';
import { test } from 'node:test';
import { NativeBridge, NativeError } from '../src/native.js';

/** A fake runtime.Port recording what is posted; the test plays the host. */
function fakePort() {
  /** @type {Array<(m: any) => void>} */ const onMsg = [];
  /** @type {Array<(p: any) => void>} */ const onDis = [];
  const port = {
    /** @type {any[]} */ posted: [],
    disconnected: false,
    /** @type {{message?: string} | undefined} */ error: undefined,
    postMessage: (/** @type {any} */ m) => port.posted.push(m),
    onMessage: { addListener: (/** @type {any} */ fn) => onMsg.push(fn) },
    onDisconnect: { addListener: (/** @type {any} */ fn) => onDis.push(fn) },
    disconnect: () => {
      port.disconnected = true;
    },
    /** @param {any} m */ reply: (m) => onMsg.forEach((fn) => fn(m)),
    hangUp: () => onDis.forEach((fn) => fn(port)),
  };
  return port;
}

test('requests use the host protocol and share one Port', async () => {
  const ports = [fakePort()];
  const bridge = new NativeBridge(() => ports[0]);
  const a = bridge.ingest({ kind: 'rating' });
  const b = bridge.request('hello', {});
  assert.deepEqual(ports[0].posted, [
    { id: 1, method: 'ingest', params: { event: { kind: 'rating' } } },
    { id: 2, method: 'hello', params: {} },
  ]);
  ports[0].reply({ id: 2, result: { name: 'palate' } });
  ports[0].reply({ id: 1, result: { id: 'e', seq: 3, duplicate: false } });
  assert.deepEqual(await a, { id: 'e', seq: 3, duplicate: false });
  assert.deepEqual(await b, { name: 'palate' });
});

test('error answers become NativeError with code and message', async () => {
  const port = fakePort();
  const bridge = new NativeBridge(() => port);
  const pending = bridge.ingest({});
  port.reply({ id: 1, error: { code: 'invalid_event', message: 'invalid event: kind ...', details: { errors: [] } } });
  const err = await pending.catch((e) => e);
  assert.ok(err instanceof NativeError);
  assert.deepEqual([err.code, err.message, err.details], ['invalid_event', 'invalid event: kind ...', { errors: [] }]);
});

test('a disconnect fails pending requests with its reason; the next request reconnects', async () => {
  const ports = [fakePort(), fakePort()];
  let opened = 0;
  const bridge = new NativeBridge(() => ports[opened++], {
    lastError: () => ({ message: 'Specified native messaging host not found.' }),
  });
  const pending = bridge.ingest({});
  ports[0].hangUp();
  const err = await pending.catch((e) => e);
  assert.deepEqual([err.code, err.message], ['unavailable', 'Specified native messaging host not found.']);
  const next = bridge.ingest({ n: 2 });
  assert.equal(opened, 2);
  ports[1].reply({ id: 2, result: 'ok' });
  assert.equal(await next, 'ok');
});

test("Firefox's port.error is the disconnect reason", async () => {
  const port = fakePort();
  const bridge = new NativeBridge(() => port);
  const pending = bridge.ingest({});
  port.error = { message: 'No such native application com.palate.native_host' };
  port.hangUp();
  assert.match((await pending.catch((e) => e)).message, /No such native application/);
});

test('no answer within the timeout is unavailable; a late answer is ignored', async () => {
  const port = fakePort();
  const bridge = new NativeBridge(() => port, { timeoutMs: 20 });
  const err = await bridge.ingest({}).catch((e) => e);
  assert.equal(err.code, 'unavailable');
  port.reply({ id: 1, result: 'late' });
  const again = bridge.ingest({});
  port.reply({ id: 2, result: 'ok' });
  assert.equal(await again, 'ok');
});

test('disconnect() closes the Port and fails what is pending', async () => {
  const port = fakePort();
  const bridge = new NativeBridge(() => port);
  const pending = bridge.ingest({});
  bridge.disconnect();
  assert.equal(port.disconnected, true);
  assert.equal((await pending.catch((e) => e)).code, 'unavailable');
});
