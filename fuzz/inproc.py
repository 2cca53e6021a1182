"""An in-process daemon for the fuzz harnesses: the real Api over a real SQLCipher store.

No socket: the server's real :class:`palate.runtime.server.Connection` reads from an
``asyncio.StreamReader`` fed with the fuzz input and writes into a byte sink, so the bytes go
through exactly the daemon's framing, decoder limits, envelope parsing, dispatch, parameter
validation, store and response encoding. The store lives on tmpfs (``/dev/shm``) when there
is one, so a commit's fsync costs nothing and the fuzzer stays fast. Training and scoring
are not attached (``api.jobs``/``api.serving`` are None): with valid parameters those methods
answer ``unavailable`` instead of starting a child process or loading a model.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from contract import sandbox_params

from palate.config import load_config
from palate.errors import ERROR_CODES
from palate.paths import resolve
from palate.runtime.api import Api
from palate.runtime.daemon import open_store
from palate.runtime.server import Connection, Server
from palate.store.writer import StoreWriter
from palate.wire import protocol

#: Methods that answer ``unavailable`` in-process when their params are valid.
DETACHED = frozenset({"train", "score", "rerank", "compare"})
#: Per-input bounds: wall time, and Python heap growth (tracemalloc peak) per input byte
#: on top of a fixed allowance. Strings decode to about their size and the decoder holds
#: the bytes twice (scanner and decoder); containers, ~70 bytes each for one byte on the
#: wire, are capped per message in absolute terms (protocol.MAX_DECODED_ELEMENTS, ~10 MiB),
#: which the fixed allowance covers. 400 bytes per byte let a 4 MiB message decode to
#: 255 MiB unnoticed (issue 14); tests/security/test_decoded_size.py runs that input here.
TIME_LIMIT_S = 10.0
MEM_BASE = 16 * 1024 * 1024
MEM_PER_BYTE = 32


class Violation(AssertionError):
    """A broken invariant: the fuzzer reports it as a crash and keeps the input."""


class _Sink:
    """The write side of a connection: collects what the daemon sends."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self.eof = False
        self.late = 0

    def write(self, data: bytes) -> None:
        if self.eof or self.closed:
            self.late += 1  # checked by _serve: raising here would be lost in a task
        self.buf += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@dataclass
class Env:
    """One store, writer, Api and event loop, reused for every input of a fuzz run."""

    root: Path
    writer: StoreWriter
    api: Api
    loop: asyncio.AbstractEventLoop
    server: Server
    sandbox: Path
    inputs: int = 0
    peak: int = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, TIME_LIMIT_S))

    def in_transaction(self) -> bool:
        """Whether the store connection was left inside a transaction (it must never be)."""
        return bool(self.run(self.writer.call(lambda s: s._conn.in_transaction)))

    def tick(self) -> None:
        """Count an input; now and then empty the export sandbox and print the figures."""
        self.inputs += 1
        if self.inputs % 500 == 0:
            shutil.rmtree(self.sandbox)
            self.sandbox.mkdir(mode=0o700)
        n = self.inputs
        if (n >= 256 and n & (n - 1) == 0) or n % 5000 == 0:
            self.report()

    def report(self) -> None:
        print(
            f"palate-fuzz: {self.inputs} inputs, largest heap growth for one input "
            f"{self.peak} bytes",
            file=sys.stderr,
        )

    def close(self) -> None:
        self.writer.stop()
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _tmp_base() -> Path:
    """Where the store goes: $PALATE_FUZZ_TMP, else tmpfs, else the temp dir. libFuzzer ends
    the process without running atexit handlers, so stores of dead runs are removed here."""
    env = os.environ.get("PALATE_FUZZ_TMP")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for old in base.glob("palate-fuzz-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return base


def make_env() -> Env:
    """Build the in-process daemon. Leaves the process's umask, environment and current
    event loop as they were (pytest runs this next to other tests)."""
    old_umask = os.umask(0o077)  # as the daemon runs
    try:
        root = Path(tempfile.mkdtemp(prefix=f"palate-fuzz-{os.getpid()}-", dir=_tmp_base()))
        paths = resolve(root / "home")
        paths.ensure()
        config = dataclasses.replace(load_config(paths), key_backend="file")
        store, keys = open_store(paths, config)
    finally:
        os.umask(old_umask)
    writer = StoreWriter(store)
    writer.start()
    api = Api(writer, keys.status, paths.socket)
    loop = asyncio.new_event_loop()
    sandbox = root / "exports"
    sandbox.mkdir(mode=0o700)
    # Guard: whatever path an input names, `export` writes only inside the sandbox (the
    # harness runs as this user; an export with overwrite replaces files).
    export = api.methods["export"]

    async def sandboxed_export(params: Any) -> Any:
        return await export(sandbox_params("export", params, str(sandbox)))

    api.methods["export"] = sandboxed_export
    env = Env(root, writer, api, loop, Server(api, str(paths.socket)), sandbox)
    atexit.register(shutil.rmtree, root, True)
    atexit.register(env.report)
    return env


async def _serve(env: Env, chunks: list[bytes]) -> bytes:
    reader = asyncio.StreamReader(limit=64 * 1024)
    sink = _Sink()
    conn = Connection(env.server, reader, sink)  # type: ignore[arg-type]

    async def feed() -> None:
        for c in chunks:
            reader.feed_data(c)
            await asyncio.sleep(0)  # let the connection read: the bytes arrive in pieces
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    await conn.serve()
    await feeder
    if sink.late:
        raise Violation("the daemon wrote after closing its side")
    if not sink.closed:
        raise Violation("the connection was not closed after EOF")
    return bytes(sink.buf)


def serve_bytes(env: Env, chunks: list[bytes]) -> list[Any]:
    """Run one connection over ``chunks``; return the messages the daemon sent back."""
    out = env.run(_serve(env, chunks))
    return check_output(out)


def check_output(out: bytes) -> list[Any]:
    """Every byte the daemon sends is msgpack: responses and at most one closing error."""
    u = msgpack.Unpacker(raw=False, strict_map_key=False)
    u.feed(out)
    msgs = list(u)
    if u.tell() != len(out):
        raise Violation(f"trailing bytes in the daemon's output ({len(out) - u.tell()})")
    closed = False
    for m in msgs:
        if not isinstance(m, list) or not m:
            raise Violation(f"not a message: {m!r:.200}")
        if m[0] == protocol.RESPONSE:
            if len(m) != 4 or not isinstance(m[1], int):
                raise Violation(f"bad response shape: {m!r:.200}")
            err = m[2]
            if err is not None:
                check_error(err)
                if m[3] is not None:
                    raise Violation("a response with an error carries a result")
        elif m[0] == protocol.NOTIFICATION:
            if m[1] != "error" or len(m) != 3:
                raise Violation(f"unexpected notification: {m!r:.200}")
            check_error(m[2])
            # Requests dispatched before the error are still answered after it
            # (docs/protocol.md section 7), but there is only one closing error.
            if closed:
                raise Violation("two closing errors on one connection")
            closed = True
        else:
            raise Violation(f"unknown message type {m[0]!r}")
    return msgs


def check_error(err: Any) -> None:
    if not isinstance(err, dict) or set(err) != {"code", "message", "details"}:
        raise Violation(f"error is not {{code, message, details}}: {err!r:.200}")
    if err["code"] not in ERROR_CODES:
        raise Violation(f"undocumented error code {err['code']!r}")
    if err["code"] == "internal":
        raise Violation(f"internal error (a daemon bug): {err['message']!r}")
    if not isinstance(err["message"], str) or not isinstance(err["details"], dict):
        raise Violation(f"error fields have the wrong types: {err!r:.200}")


class MemoryBound:
    """tracemalloc peak of one input, checked against MEM_BASE + MEM_PER_BYTE * size."""

    def __init__(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(1)

    def __enter__(self) -> MemoryBound:
        tracemalloc.reset_peak()
        self.start = tracemalloc.get_traced_memory()[0]
        return self

    def check(self, size: int, env: Env) -> None:
        peak = tracemalloc.get_traced_memory()[1] - self.start
        env.peak = max(env.peak, peak)
        limit = MEM_BASE + MEM_PER_BYTE * size
        if peak > limit:
            raise Violation(f"one {size}-byte input made the daemon allocate {peak} bytes")

    def __exit__(self, *exc: Any) -> None:
        return None
