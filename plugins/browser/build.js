// Assemble loadable extension folders: dist/chrome and dist/firefox, each with
// src/ and its browser's manifest as manifest.json. Nothing is transformed:
// the two browsers differ only in manifest keys (see README).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

for (const browser of ['chrome', 'firefox']) {
  const out = path.join(here, 'dist', browser);
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { recursive: true });
  fs.cpSync(path.join(here, 'src'), path.join(out, 'src'), { recursive: true });
  fs.copyFileSync(path.join(here, 'manifests', `${browser}.json`), path.join(out, 'manifest.json'));
  console.log(`built ${path.relative(process.cwd(), out)}`);
}
