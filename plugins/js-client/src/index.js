/**
 * @palate/client: a minimal Node client for the Palate daemon.
 *
 * ```js
 * import { Client } from '@palate/client';
 * const client = await Client.connect();
 * await client.ingest({ kind: 'rating', source: 'my-tool', prompt: 'Say hi', response: 'Hello!', label: 1 });
 * await client.close();
 * ```
 */

export { Client, DEFAULTS } from './client.js';
export { ERROR_CODES, PalateError } from './errors.js';
export { MAX_SOCKET_PATH, resolvePaths, resolveSocketPath, socketPathFor } from './paths.js';
