// Socket path resolution must match daemon/palate/paths.py exactly.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { MAX_SOCKET_PATH, resolvePaths, resolveSocketPath } from '../src/paths.js';
import { PALATE_BIN } from './daemon.js';

const base = {
  platform: 'linux',
  homedir: '/home/ann',
  uid: 1000,
  cwd: '/work',
  isDir: () => true,
  isWritableDir: () => true,
};

test('PALATE_HOME puts the socket in $PALATE_HOME/run, ignoring XDG_RUNTIME_DIR', () => {
  const env = { PALATE_HOME: '/srv/p', XDG_RUNTIME_DIR: '/run/user/1000' };
  assert.deepEqual(resolvePaths({ ...base, env }), {
    home: '/srv/p',
    runDir: '/srv/p/run',
    socket: '/srv/p/run/palate.sock',
  });
});

test('PALATE_HOME is expanded, made absolute and normalised like pathlib', () => {
  assert.equal(resolveSocketPath({ ...base, env: { PALATE_HOME: '~/p' } }), '/home/ann/p/run/palate.sock');
  assert.equal(resolveSocketPath({ ...base, env: { PALATE_HOME: 'rel//./x/' } }), '/work/rel/x/run/palate.sock');
  // pathlib keeps "..": it does not resolve the path.
  assert.equal(resolveSocketPath({ ...base, env: { PALATE_HOME: '/a/../b' } }), '/a/../b/run/palate.sock');
});

test('without PALATE_HOME an existing XDG_RUNTIME_DIR holds the socket', () => {
  const env = { XDG_RUNTIME_DIR: '/run/user/1000' };
  assert.equal(resolveSocketPath({ ...base, env }), '/run/user/1000/palate/palate.sock');
  const missing = resolvePaths({ ...base, env, isDir: () => false });
  assert.equal(missing.socket, '/home/ann/.local/share/palate/run/palate.sock');
});

test('XDG_DATA_HOME and the macOS home are honoured', () => {
  assert.equal(resolvePaths({ ...base, env: { XDG_DATA_HOME: '/d' } }).home, '/d/palate');
  assert.equal(
    resolvePaths({ ...base, platform: 'darwin', env: { XDG_RUNTIME_DIR: '/nope' }, isDir: () => false }).socket,
    '/home/ann/Library/Application Support/Palate/run/palate.sock',
  );
});

test('an empty PALATE_HOME selects the default home but still disables XDG_RUNTIME_DIR', () => {
  const env = { PALATE_HOME: '', XDG_RUNTIME_DIR: '/run/user/1000' };
  assert.equal(resolveSocketPath({ ...base, env }), '/home/ann/.local/share/palate/run/palate.sock');
});

test('PALATE_SOCKET names the socket outright (what the daemon pins for its children)', () => {
  const env = { PALATE_HOME: '/srv/p', XDG_RUNTIME_DIR: '/run/user/1000', PALATE_SOCKET: '/run/user/1000/palate/palate.sock' };
  assert.equal(resolveSocketPath({ ...base, env }), '/run/user/1000/palate/palate.sock');
  assert.equal(resolvePaths({ ...base, env }).home, '/srv/p');
});

test('a home passed in that is not the default keeps its socket inside it', () => {
  const env = { XDG_RUNTIME_DIR: '/run/user/1000' };
  assert.equal(resolvePaths({ ...base, env, home: '/srv/q' }).socket, '/srv/q/run/palate.sock');
  assert.equal(
    resolvePaths({ ...base, env, home: '/home/ann/.local/share/palate' }).socket,
    '/run/user/1000/palate/palate.sock',
  );
});

test('a socket path over 103 bytes moves to a hashed name under the temp dir', () => {
  const home = `/srv/${'x'.repeat(100)}`;
  const socket = resolveSocketPath({ ...base, env: { PALATE_HOME: home, TMPDIR: '/tmpd' } });
  // sha256("/srv/xxx.../run")[:16], computed with Python's hashlib.
  assert.equal(socket, '/tmpd/palate-1000/d084ba7687b58794.sock');
  assert.ok(Buffer.byteLength(socket) <= MAX_SOCKET_PATH);
});

test('the fallback uses /tmp when the temp dir itself is too long', () => {
  const env = { PALATE_HOME: `/srv/${'x'.repeat(100)}`, TMPDIR: `/${'t'.repeat(80)}` };
  assert.match(resolveSocketPath({ ...base, env }), /^\/tmp\/palate-1000\/[0-9a-f]{16}\.sock$/);
});

test('an unwritable TMPDIR is skipped like tempfile.gettempdir() does', () => {
  const env = { PALATE_HOME: `/srv/${'x'.repeat(100)}`, TMPDIR: '/ro', TEMP: '/tmp2/../tmp3' };
  const socket = resolveSocketPath({ ...base, env, isWritableDir: (p) => p !== '/ro' });
  assert.match(socket, /^\/tmp3\/palate-1000\//);
});

const python = path.join(path.dirname(PALATE_BIN), 'python');
const pythonSkip = fs.existsSync(python) ? false : `no ${python}; cross-check with palate.paths skipped`;

test('agrees with palate.paths.resolve() for real environments', { skip: pythonSkip }, () => {
  const tmp = fs.mkdtempSync('/tmp/palate-paths-');
  try {
    const cases = [
      { PALATE_HOME: path.join(tmp, 'home') },
      { PALATE_HOME: `${tmp}/${'long-directory-name/'.repeat(5)}` },
      { PALATE_HOME: `${tmp}/./a//b/../c` },
      { PALATE_HOME: '', XDG_RUNTIME_DIR: tmp },
      { XDG_RUNTIME_DIR: tmp, XDG_DATA_HOME: path.join(tmp, 'data') },
      { XDG_RUNTIME_DIR: path.join(tmp, 'absent'), XDG_DATA_HOME: `${tmp}/${'d'.repeat(90)}` },
      { XDG_DATA_HOME: `${tmp}/${'d'.repeat(90)}`, TMPDIR: `${tmp}/${'t'.repeat(70)}` },
      { PALATE_HOME: path.join(tmp, 'home'), PALATE_SOCKET: path.join(tmp, 'pinned.sock') },
      { XDG_RUNTIME_DIR: tmp, PALATE_SOCKET: `${tmp}/./x/../pinned.sock` },
    ];
    for (const extra of cases) {
      const env = { PATH: process.env.PATH, HOME: tmp, ...extra };
      const fromPython = execFileSync(python, ['-c', 'from palate.paths import resolve; print(resolve().socket)'], {
        env,
        cwd: tmp,
        encoding: 'utf8',
      }).trim();
      assert.equal(resolveSocketPath({ env, homedir: tmp, cwd: tmp }), fromPython, JSON.stringify(extra));
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});
