#!/bin/sh
# Install the pinned JS dependencies and run every JS test (js-client, vscode,
# browser) with node's built-in runner. Called from `make test`.
# Exits 0 with a message when node is absent, non-zero when a test fails.
set -eu
# Run from plugins/ (parameter expansion, not dirname: works with a bare PATH).
case $0 in */*) cd "${0%/*}" ;; esac

if ! command -v node >/dev/null 2>&1; then
  echo "plugins/run-tests.sh: node not found; JavaScript tests skipped."
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "plugins/run-tests.sh: npm not found (needed to install the pinned dependencies)." >&2
  exit 1
fi

# npm ci: exactly package-lock.json, into a fresh node_modules.
npm ci --no-audit --no-fund --loglevel=error

# Daemon-backed tests use ../.venv/bin/palate (or $PALATE_BIN) and skip with a
# message when it is absent. Test files run one at a time: each starts its own
# daemon, and the machines this runs on are small.
exec node --test --test-reporter=spec --test-concurrency=1 js-client/test/*.test.js vscode/test/*.test.js browser/test/*.test.js
