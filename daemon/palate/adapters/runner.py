"""``python -m palate.adapters.runner NAME``: one adapter in its own process.

The supervisor starts this once per enabled adapter. Isolation is the point: an
adapter that crashes, leaks or hangs is a child process that can be killed and
restarted with backoff, while the daemon keeps serving.

Channels: stdout carries status lines (JSON, one per line: ``ready``,
``emitted``, ``bad``, ``error``) for the supervisor; the real stdout is kept for
that alone and file descriptor 1 is pointed at stderr, so a stray ``print`` in
a plugin cannot corrupt the channel. stderr is the adapter's log.

Exit codes: 0 clean stop, 1 crashed (restart with backoff), 78 (EX_CONFIG) the
adapter cannot be loaded or configured (skipped, not restarted).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import IO

from palate.adapters import AdapterContext, AdapterError, check_options, load_adapter, stderr_logger
from palate.adapters.redaction import Redactor
from palate.config import load_config
from palate.errors import PalateError
from palate.paths import resolve

EXIT_CRASHED = 1
EXIT_LOAD_FAILED = 78


def _status_stream() -> IO[str]:
    """Keep the real stdout for status lines; send fd 1 (stray prints) to stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", encoding="utf-8", buffering=1)


def build_context(name: str, *, status: IO[str] | None = None) -> tuple[AdapterContext, object]:
    """Load config and the adapter; return (context, adapter). Raises AdapterError."""
    paths = resolve()
    try:
        config = load_config(paths)
    except PalateError as e:
        raise AdapterError(e.message) from e
    options = config.adapters.options(name)
    adapter = load_adapter(name, options.get("module"))
    options = check_options(adapter, options)
    ctx = AdapterContext(
        name,
        options=options,
        home=paths.home,
        socket=paths.socket,
        redactor=Redactor(config.adapters.deny_for(name)),
        status=status,
        logger=stderr_logger(name, config.log_level),
    )
    return ctx, adapter


def run(name: str, *, status: IO[str] | None = None) -> int:
    """Run adapter ``name`` until SIGTERM/SIGINT; return the process exit code."""
    try:
        ctx, adapter = build_context(name, status=status)
    except AdapterError as e:
        print(f"palate adapter {name}: {e}", file=sys.stderr, flush=True)
        if status is not None:
            status.write(_line("load_failed", str(e)))
            status.flush()
        return EXIT_LOAD_FAILED

    def stop(signum: int, frame: FrameType | None) -> None:
        ctx.stop.set()
        ctx.wake.set()

    def wake(signum: int, frame: FrameType | None) -> None:
        ctx.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, wake)
    if os.environ.get("PALATE_SUPERVISED") == "1":
        _stop_when_parent_dies(ctx)
    ctx.notify("ready", pid=os.getpid())
    try:
        adapter.run(ctx)  # type: ignore[attr-defined]
    except PalateError as e:
        if ctx.stop.is_set() and e.code == "unavailable":
            return 0  # the daemon went away while we were stopping anyway
        ctx.log.error("adapter stopped on a daemon error: %s", e.message)
        ctx.notify("error", message=f"{e.code}: {e.message}"[:500])
        return EXIT_CRASHED
    except Exception as e:
        traceback.print_exc()
        ctx.notify("error", message=f"{type(e).__name__}: {e}"[:500])
        return EXIT_CRASHED
    finally:
        ctx.close()
    return 0


def _stop_when_parent_dies(ctx: AdapterContext) -> None:
    """The supervisor holds our stdin pipe open; EOF means it is gone (even kill -9)."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        ctx.stop.set()
        ctx.wake.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _line(kind: str, message: str) -> str:
    import json
    import time

    return json.dumps({"type": kind, "ts": time.time(), "message": message[:500]}) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m palate.adapters.runner NAME", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(args[0], status=_status_stream()))


if __name__ == "__main__":
    main()
