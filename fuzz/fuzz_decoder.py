"""Coverage-guided fuzzing of the daemon's byte stream handling (atheris / libFuzzer).

Each input is the byte stream of one client connection. It goes through the real
``palate.runtime.server.Connection`` (streaming msgpack decoder with every limit, envelope parsing,
dispatch to the real Api over a real SQLCipher store, response encoding), twice: once as one
read, once cut into small pieces (chunk size derived from the input). Checked per input:

* no exception escapes, and the connection ends within ``inproc.TIME_LIMIT_S``;
* everything sent back is msgpack: ``[1, msgid, error|nil, result]`` responses and at most
  one ``[2, "error", {...}]`` (only responses to requests dispatched before it may follow it,
  docs/protocol.md section 7); every error has a documented code and none is ``internal``;
* the same msgids answered and the same closing error whatever the chunking (but scoring
  requests, which are dropped when their connection closes);
* the store is never left inside a transaction;
* the Python heap grows by at most ``MEM_BASE + MEM_PER_BYTE * len(input)`` (tracemalloc).

Run: ``.venv/bin/python fuzz/fuzz_decoder.py fuzz/corpus/decoder -max_total_time=60``
(``make fuzz`` runs every harness; any libFuzzer flag works). A crash input is written as
``crash-<sha1>``; replay it with ``.venv/bin/python fuzz/fuzz_decoder.py crash-<sha1>``.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import atheris

with atheris.instrument_imports(include=["palate", "inproc"]):
    import inproc

    from palate.runtime.server import CANCEL_ON_HANGUP

ENV: inproc.Env | None = None


def _summary(msgs: list[Any], data: bytes) -> list[Any]:
    """Which requests were answered and how the connection ended; not the codes themselves,
    which legitimately change on the second run (an export's file now exists)."""
    closing = [("closed", m[2]["code"]) for m in msgs if m[0] == 2]
    if any(name.encode() in data for name in CANCEL_ON_HANGUP):
        # Scoring requests still queued when the connection closes are dropped on purpose;
        # whether one was already answered depends on the timing.
        return closing
    return [*sorted(m[1] for m in msgs if m[0] == 1), *closing]


def test_one_input(data: bytes) -> None:
    global ENV
    if ENV is None:
        ENV = inproc.make_env()
    env = ENV
    env.tick()
    step = 1 + zlib.crc32(data) % 13
    with inproc.MemoryBound() as mem:
        whole = inproc.serve_bytes(env, [data])
        pieces = inproc.serve_bytes(env, [data[i : i + step] for i in range(0, len(data), step)])
        mem.check(len(data), env)
    a, b = _summary(whole, data), _summary(pieces, data)
    # Ingests repeat as duplicates and counts change between the runs, but codes must not.
    if a != b:
        raise inproc.Violation(f"answers depend on how the bytes arrive: {a!r:.300} vs {b!r:.300}")
    if env.in_transaction():
        raise inproc.Violation("the store was left inside a transaction")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
