// Protocol behaviour that a healthy daemon does not readily produce (out-of-order
// answers, the connection-level error notification, slow answers), checked
// against a scripted fake server on a Unix socket.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, test } from 'node:test';
import { decodeMultiStream, encode } from '@msgpack/msgpack';
import { Client, PalateError } from '../src/index.js';

/** @type {Array<() => Promise<void>>} */
const cleanups = [];
afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn();
});

/**
 * Serve one connection; `onRequest(msg, send, conn)` sees each decoded message.
 * @param {(msg: any[], send: (m: unknown[]) => void, conn: net.Socket) => void} onRequest
 */
async function fakeServer(onRequest) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'palate-fake-'));
  const socketPath = path.join(dir, 's.sock');
  /** @type {Set<net.Socket>} */
  const conns = new Set();
  const server = net.createServer(async (conn) => {
    conns.add(conn);
    conn.on('error', () => {});
    const send = (/** @type {unknown[]} */ m) => conn.write(encode(m));
    try {
      for await (const msg of decodeMultiStream(conn)) onRequest(/** @type {any[]} */ (msg), send, conn);
    } catch {
      // The client went away mid-message; nothing to check here.
    }
  });
  await new Promise((resolve) => server.listen(socketPath, () => resolve(undefined)));
  cleanups.push(async () => {
    for (const c of conns) c.destroy();
    await new Promise((resolve) => server.close(resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return socketPath;
}

/** @param {Client} client */
const closeLater = (client) => cleanups.push(() => client.close());

test('responses are matched by msgid, not by arrival order', async () => {
  /** @type {any[][]} */
  const held = [];
  const socketPath = await fakeServer((msg, send) => {
    held.push(msg);
    if (held.length === 3) for (const m of held.reverse()) send([1, m[1], null, { echo: m[3].n }]);
  });
  const client = await Client.connect({ socketPath });
  closeLater(client);
  const results = await Promise.all([1, 2, 3].map((n) => client.call('echo', { n })));
  assert.deepEqual(results.map((r) => r.echo), [1, 2, 3]);
  assert.deepEqual(held.map((m) => m[1]).sort(), [1, 2, 3]);
});

test('requests use the [0, msgid, method, params] envelope and drop undefined params', async () => {
  /** @type {any[]} */
  let seen = [];
  const socketPath = await fakeServer((msg, send) => {
    seen = msg;
    send([1, msg[1], null, 'ok']);
  });
  const client = await Client.connect({ socketPath });
  closeLater(client);
  await client.hello({ client: 'x' });
  assert.deepEqual(seen, [0, 1, 'hello', { client: 'x' }]);
});

test('no more than maxInFlight requests are outstanding; the rest queue', async () => {
  let outstanding = 0;
  let peak = 0;
  const socketPath = await fakeServer((msg, send) => {
    outstanding += 1;
    peak = Math.max(peak, outstanding);
    setTimeout(() => {
      outstanding -= 1;
      send([1, msg[1], null, msg[1]]);
    }, 5);
  });
  const client = await Client.connect({ socketPath, maxInFlight: 3 });
  closeLater(client);
  const ids = await Promise.all(Array.from({ length: 12 }, () => client.call('x')));
  assert.equal(new Set(ids).size, 12);
  assert.equal(peak, 3);
});

test('the connection-level error notification fails pending calls with its code', async () => {
  const socketPath = await fakeServer((msg, send, conn) => {
    send([2, 'error', { code: 'too_large', message: 'message exceeds a size limit', details: {} }]);
    conn.end();
  });
  const client = await Client.connect({ socketPath });
  const err = await client.call('ingest', { event: {} }).catch((e) => e);
  assert.ok(err instanceof PalateError);
  assert.equal(err.code, 'too_large');
  assert.equal(err.message, 'message exceeds a size limit');
  assert.equal(client.closed, true);
  // Later calls fail at once with the same reason instead of hanging.
  assert.equal((await client.call('hello').catch((e) => e)).code, 'too_large');
});

test('responses already dispatched still arrive after the error notification', async () => {
  const socketPath = await fakeServer((msg, send, conn) => {
    send([2, 'error', { code: 'invalid_request', message: 'idle for too long; closing', details: {} }]);
    send([1, msg[1], null, { id: 'e1', seq: 7, duplicate: false }]);
    conn.end();
  });
  const client = await Client.connect({ socketPath });
  assert.deepEqual(await client.call('ingest'), { id: 'e1', seq: 7, duplicate: false });
});

test('a closed connection without notification is unavailable', async () => {
  const socketPath = await fakeServer((msg, send, conn) => conn.destroy());
  const client = await Client.connect({ socketPath });
  const err = await client.call('status').catch((e) => e);
  assert.equal(err.code, 'unavailable');
  assert.match(err.message, /closed the connection/);
});

test('error responses keep code, message and details; unknown codes become internal', async () => {
  const socketPath = await fakeServer((msg, send) => {
    const error =
      msg[2] === 'old'
        ? { code: 'busy', message: 'queue full', details: { queued: 4096 } }
        : { code: 'brand_new_code', message: 'from the future', details: { x: 1 } };
    send([1, msg[1], error, null]);
  });
  const client = await Client.connect({ socketPath });
  closeLater(client);
  const busy = await client.call('old').catch((e) => e);
  assert.deepEqual(busy.toJSON(), { code: 'busy', message: 'queue full', details: { queued: 4096 } });
  const future = await client.call('new').catch((e) => e);
  assert.deepEqual(future.toJSON(), {
    code: 'internal',
    message: 'from the future',
    details: { x: 1, code: 'brand_new_code' },
  });
});

test('a call without an answer times out as unavailable; a late answer is ignored', async () => {
  /** @type {(() => void) | undefined} */
  let answerLate;
  const socketPath = await fakeServer((msg, send) => {
    if (msg[2] === 'slow') answerLate = () => send([1, msg[1], null, 'late']);
    else send([1, msg[1], null, 'fast']);
  });
  const client = await Client.connect({ socketPath, timeoutMs: 5000 });
  closeLater(client);
  const err = await client.call('slow', {}, { timeoutMs: 50 }).catch((e) => e);
  assert.equal(err.code, 'unavailable');
  assert.match(err.message, /no answer to slow within 50 ms/);
  answerLate?.();
  assert.equal(await client.call('quick'), 'fast');
});

test('other notifications go to onNotification', async () => {
  const socketPath = await fakeServer((msg, send) => {
    send([2, 'progress', { done: 1 }]);
    send([1, msg[1], null, true]);
  });
  /** @type {unknown[]} */
  const got = [];
  const client = await Client.connect({ socketPath, onNotification: (m, p) => got.push([m, p]) });
  closeLater(client);
  await client.call('x');
  assert.deepEqual(got, [['progress', { done: 1 }]]);
});

test('PalateError refuses codes outside the protocol', () => {
  assert.throws(() => new PalateError('oops', 'typo'), TypeError);
  assert.equal(PalateError.fromWire('nonsense').code, 'internal');
});
