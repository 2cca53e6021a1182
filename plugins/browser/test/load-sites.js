// Load the classic content-script file sites.js the way a browser would (one
// shared global), and return what it defines.
import fs from 'node:fs';
import vm from 'node:vm';

/** @returns {any} globalThis.PalateSites as defined by src/sites.js */
export function loadSites() {
  const code = fs.readFileSync(new URL('../src/sites.js', import.meta.url), 'utf8');
  const context = vm.createContext({});
  vm.runInContext(code, context, { filename: 'sites.js' });
  return context.PalateSites;
}
