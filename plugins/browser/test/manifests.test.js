// The two manifests may differ only where the browsers differ, and the ids the
// native host installer relies on (ids.json) must match them.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { test } from 'node:test';
import { HOST_NAME } from '../src/events.js';
import { loadSites } from './load-sites.js';

const read = (/** @type {string} */ p) => JSON.parse(fs.readFileSync(new URL(p, import.meta.url), 'utf8'));
const chrome = read('../manifests/chrome.json');
const firefox = read('../manifests/firefox.json');
const ids = read('../ids.json');

test('the Chrome key gives the documented extension id', () => {
  // Chrome's id: the first 128 bits of SHA-256 of the public key, hex digits 0-f written as a-p.
  const digest = createHash('sha256').update(Buffer.from(chrome.key, 'base64')).digest('hex');
  const id = digest.slice(0, 32).replace(/[0-9a-f]/g, (c) => String.fromCharCode(97 + parseInt(c, 16)));
  assert.equal(id, ids.chrome_extension_id);
  assert.equal(ids.chrome_allowed_origin, `chrome-extension://${id}/`);
});

test('Firefox gecko id and host name match ids.json', () => {
  assert.equal(firefox.browser_specific_settings.gecko.id, ids.firefox_extension_id);
  assert.equal(HOST_NAME, ids.host_name);
  // Host names: lowercase alphanumerics, "_" and ".", no leading/trailing/double dot.
  assert.match(HOST_NAME, /^[a-z0-9_]+(\.[a-z0-9_]+)*$/);
});

test('the manifests differ only in background, key and gecko settings', () => {
  const strip = (/** @type {any} */ m) => {
    const { background, key, browser_specific_settings, minimum_chrome_version, ...rest } = m;
    return rest;
  };
  assert.deepEqual(strip(firefox), strip(chrome));
  assert.deepEqual(chrome.background, { service_worker: 'src/background.js', type: 'module' });
  assert.deepEqual(firefox.background, { scripts: ['src/background.js'], type: 'module' });
  assert.ok(chrome.permissions.includes('nativeMessaging'));
});

test('every file a manifest names exists', () => {
  const files = [chrome.background.service_worker, ...chrome.content_scripts.flatMap((c) => c.js)];
  for (const f of files) assert.ok(fs.existsSync(new URL(`../${f}`, import.meta.url)), f);
});

test('content scripts run exactly on the sites of the selector table', () => {
  // Array.from: the table lives in another vm realm, deepEqual compares prototypes.
  const hosts = Array.from(loadSites().SITES.flatMap((/** @type {any} */ s) => s.hosts));
  const matches = chrome.content_scripts[0].matches;
  assert.deepEqual([...matches].sort(), hosts.map((h) => `https://${h}/*`).sort());
});
