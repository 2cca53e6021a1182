/**
 * Where the daemon's socket is: the same rules as daemon/palate/paths.py
 * (docs/protocol.md section 1), so a plugin finds the daemon the CLI finds.
 *
 * Python's pathlib is mimicked where it matters: `Path(x)` collapses `//`
 * and `.` components but keeps `..`, and `.absolute()` prefixes the current
 * directory without resolving symlinks. Known gaps, documented in the README:
 * `~user` is not expanded (only `~` and `~/...`), and environment strings are
 * seen as UTF-8 by Node, so a non-UTF-8 path may hash differently.
 */

import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';

/**
 * Usable bytes in `sun_path`: 104 on macOS (103 + NUL). Python uses the
 * smaller limit everywhere so a path valid on Linux is valid on a Mac.
 */
export const MAX_SOCKET_PATH = 103;

/**
 * @typedef {object} PathEnv What the resolution reads; defaults come from the process.
 * @property {Record<string, string | undefined>} [env] environment variables
 * @property {string} [platform] `process.platform`
 * @property {string} [homedir] the user's home directory
 * @property {number} [uid] the user's numeric id
 * @property {string} [cwd] current directory, for relative paths
 * @property {(p: string) => boolean} [isDir] whether `p` is an existing directory
 * @property {(p: string) => boolean} [isWritableDir] whether `p` is a writable directory
 */

/**
 * @typedef {object} PalatePaths
 * @property {string} home the Palate home directory
 * @property {string} runDir directory of the lock (and normally the socket)
 * @property {string} socket the socket path to connect to
 */

/**
 * Normalise like pathlib's `PurePosixPath`: drop empty and `.` parts, keep
 * `..`, keep exactly two leading slashes (POSIX leaves `//` implementation-defined).
 * @param {string} p
 * @returns {string}
 */
function purePath(p) {
  const root = p.startsWith('//') && !p.startsWith('///') ? '//' : p.startsWith('/') ? '/' : '';
  const parts = p.split('/').filter((s) => s !== '' && s !== '.');
  const joined = root + parts.join('/');
  return joined === '' ? '.' : joined;
}

/**
 * `Path(*parts)`: join then normalise.
 * @param {...string} parts
 * @returns {string}
 */
function join(...parts) {
  return purePath(parts.join('/'));
}

/**
 * `Path(p).absolute()`.
 * @param {string} p
 * @param {string} cwd
 */
function absolute(p, cwd) {
  const pure = purePath(p);
  if (pure.startsWith('/')) return pure;
  return pure === '.' ? purePath(cwd) : join(cwd, pure);
}

/**
 * `Path(p).expanduser()` for `~` and `~/...` (not `~user`).
 * @param {string} p
 * @param {string} homedir
 */
function expandUser(p, homedir) {
  return p === '~' || p.startsWith('~/') ? homedir + p.slice(1) : p;
}

/** @param {string} p */
function defaultIsDir(p) {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/** @param {string} p */
function defaultIsWritableDir(p) {
  try {
    fs.accessSync(p, fs.constants.W_OK | fs.constants.X_OK);
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/**
 * Python's `tempfile.gettempdir()`: the first writable of `$TMPDIR`, `$TEMP`,
 * `$TMP`, `/tmp`, `/var/tmp`, `/usr/tmp`, else the current directory, made
 * absolute with `os.path.abspath` (which, unlike pathlib, collapses `..`).
 * @param {Required<PathEnv>} ctx
 */
function pythonTempDir(ctx) {
  const { env, cwd } = ctx;
  const candidates = [env.TMPDIR, env.TEMP, env.TMP, '/tmp', '/var/tmp', '/usr/tmp'];
  for (const dir of candidates) {
    if (!dir) continue;
    const abs = normPath(dir.startsWith('/') ? dir : `${cwd}/${dir}`);
    if (ctx.isWritableDir(abs)) return abs;
  }
  return normPath(cwd);
}

/**
 * `os.path.normpath` for an absolute POSIX path (collapses `..` too).
 * @param {string} p
 */
function normPath(p) {
  const root = p.startsWith('//') && !p.startsWith('///') ? '//' : '/';
  /** @type {string[]} */
  const out = [];
  for (const part of p.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') out.pop();
    else out.push(part);
  }
  return root + out.join('/');
}

/**
 * The Palate home: `$PALATE_HOME` if non-empty, else the platform default.
 * @param {Required<PathEnv>} ctx
 */
function defaultHome(ctx) {
  const { env, homedir } = ctx;
  if (env.PALATE_HOME) return absolute(expandUser(env.PALATE_HOME, homedir), ctx.cwd);
  return platformHome(ctx);
}

/**
 * The platform's per-user home (what an unset PALATE_HOME gives).
 * @param {Required<PathEnv>} ctx
 */
function platformHome(ctx) {
  const { env, homedir } = ctx;
  if (ctx.platform === 'darwin') return join(homedir, 'Library', 'Application Support', 'Palate');
  const base = env.XDG_DATA_HOME ? env.XDG_DATA_HOME : join(homedir, '.local', 'share');
  return join(base, 'palate');
}

/**
 * The socket for a run directory, or the short hashed fallback when the
 * natural path exceeds {@link MAX_SOCKET_PATH} bytes (never truncated:
 * truncation could make unlink and bind act on different files).
 * @param {string} runDir
 * @param {PathEnv} [options]
 * @returns {string}
 */
export function socketPathFor(runDir, options = {}) {
  const ctx = withDefaults(options);
  const natural = join(runDir, 'palate.sock');
  if (Buffer.byteLength(natural) <= MAX_SOCKET_PATH) return natural;
  const digest = createHash('sha256').update(runDir).digest('hex').slice(0, 16);
  let shortRoot = join(pythonTempDir(ctx), `palate-${ctx.uid}`);
  // 24 bytes leave room for "/<16 hex>.sock" inside the limit.
  if (Buffer.byteLength(shortRoot) > MAX_SOCKET_PATH - 24) shortRoot = `/tmp/palate-${ctx.uid}`;
  return join(shortRoot, `${digest}.sock`);
}

/**
 * Resolve home, run directory and socket exactly as `palate.paths.resolve()`.
 * @param {PathEnv & {home?: string}} [options] `home` overrides the home directory
 * @returns {PalatePaths}
 */
export function resolvePaths(options = {}) {
  const ctx = withDefaults(options);
  const home = absolute(options.home ?? defaultHome(ctx), ctx.cwd);
  // The key's presence, not its value, decides here (Python tests
  // `"PALATE_HOME" not in os.environ`): an empty PALATE_HOME picks the default
  // home above but still keeps the run dir inside it. A `home` given that is not
  // the platform's default keeps it inside too.
  let runDir = join(home, 'run');
  if (!('PALATE_HOME' in ctx.env) && home === absolute(platformHome(ctx), ctx.cwd)) {
    const xdgRun = ctx.env.XDG_RUNTIME_DIR;
    if (xdgRun && ctx.isDir(xdgRun)) runDir = join(xdgRun, 'palate');
  }
  // PALATE_SOCKET names the socket outright: the daemon pins it for its adapters and
  // the browser launcher (palate.paths.Paths.child_env).
  const pinned = ctx.env.PALATE_SOCKET;
  const socket = pinned ? absolute(expandUser(pinned, ctx.homedir), ctx.cwd) : socketPathFor(runDir, ctx);
  return { home, runDir, socket };
}

/**
 * The socket path a client should connect to by default.
 * @param {PathEnv} [options]
 * @returns {string}
 */
export function resolveSocketPath(options = {}) {
  return resolvePaths(options).socket;
}

/**
 * @param {PathEnv} options
 * @returns {Required<PathEnv>}
 */
function withDefaults(options) {
  return {
    env: options.env ?? process.env,
    platform: options.platform ?? process.platform,
    homedir: options.homedir ?? os.homedir(),
    uid: options.uid ?? (process.getuid ? process.getuid() : 0),
    cwd: options.cwd ?? process.cwd(),
    isDir: options.isDir ?? defaultIsDir,
    isWritableDir: options.isWritableDir ?? defaultIsWritableDir,
  };
}
