/**
 * Test helper: run a real Palate daemon in a throw-away PALATE_HOME.
 * Shared by the VS Code tests, which import it by relative path.
 */

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** The daemon executable, overridable for other checkouts. */
export const PALATE_BIN = process.env.PALATE_BIN ?? path.join(REPO, '.venv', 'bin', 'palate');

/** Why daemon tests are skipped, or false when the daemon is available. */
export const SKIP_REASON = fs.existsSync(PALATE_BIN)
  ? false
  : `no Palate daemon at ${PALATE_BIN} (create the venv, or set PALATE_BIN); daemon tests skipped`;

/**
 * Start a daemon and wait until it listens.
 * @returns {Promise<{home: string, socket: string, stop: () => Promise<void>}>}
 */
export async function startDaemon() {
  // Short /tmp path: the socket must fit the 103-byte limit without the fallback.
  const home = fs.mkdtempSync('/tmp/palate-js-');
  const env = { ...process.env, PALATE_HOME: home, PALATE_KEY_BACKEND: 'file' };
  const child = spawn(PALATE_BIN, ['daemon'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  const socket = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon not ready after 30 s:\n${stderr}`)), 30_000);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk) => {
      stderr += chunk;
      const m = /ready on (\S+)/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited with ${code} before it was ready:\n${stderr}`));
    });
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    fs.rmSync(home, { recursive: true, force: true });
  };
  return { home, socket, stop };
}
