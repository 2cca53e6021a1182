"""Runs each enabled adapter as a child process and keeps it running.

Why child processes: an adapter is plugin code reading files the user does not
control. A crash, a memory leak or a hang in one must never reach the socket,
the store or another adapter, so each runs as ``python -m
palate.adapters.runner NAME`` and only talks to the daemon through the socket.

* A child that exits is restarted after an exponential backoff
  (``backoff_initial`` doubling up to ``backoff_max``); the count resets once a
  child has run ``stable_after`` seconds, so a flaky adapter is not punished
  forever.
* A child that exits with 78 (the adapter cannot be found, loaded or configured)
  is marked ``failed`` and left alone, with a warning: restarting cannot fix a
  typo in config.toml.
* ``snapshot()`` reports, per adapter: state, pid, restarts, last_event_ts,
  events, bad_records and last_error, for ``palate status``.
* Children get a pipe on stdin that is never written; if the daemon dies, even
  by kill -9, the pipe closes and the child stops itself (no orphans).
* Children get the daemon's own path resolution pinned (``Paths.child_env``:
  ``PALATE_HOME`` and ``PALATE_SOCKET``), so they connect to the socket the
  daemon serves whatever layout it chose (``$XDG_RUNTIME_DIR/palate/`` by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from palate.adapters.runner import EXIT_LOAD_FAILED
from palate.paths import Paths, resolve

log = logging.getLogger("palate.runtime.supervisor")

#: An adapter log is cut back to empty when it grows past this at a (re)start.
MAX_LOG_BYTES = 5_000_000


@dataclass
class AdapterState:
    """What ``palate status`` shows for one adapter."""

    name: str
    state: str = "starting"  # starting | running | backoff | failed | stopped
    pid: int | None = None
    restarts: int = 0
    last_event_ts: float | None = None
    events: int = 0
    bad_records: int = 0
    last_error: str | None = None
    since: float | None = None
    #: True once the child reached the daemon's socket, False while it cannot (None: not yet).
    connected: bool | None = None
    socket: str | None = None


class Supervisor:
    """Starts, watches and restarts adapter processes; ``start``/``stop`` from the daemon."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        home: Path | None = None,
        paths: Paths | None = None,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        stable_after: float = 60.0,
    ) -> None:
        self.names = list(dict.fromkeys(names))
        if paths is None and home is not None:
            paths = resolve(home)
        self.home = paths.home if paths is not None else None
        self.log_dir = log_dir
        self.env = dict(os.environ if env is None else env)
        if paths is not None:
            self.env.update(paths.child_env())
        self.env["PALATE_SUPERVISED"] = "1"
        self.python = python
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.states = {n: AdapterState(n) for n in self.names}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        #: Called with each backoff delay chosen (tests and metrics observe it here).
        self.on_backoff: Callable[[float], None] | None = None
        #: Adapters whose current run reported its own error (kept over the exit code).
        self._reported: set[str] = set()

    @classmethod
    def from_config(cls, paths: Any, config: Any, **kw: Any) -> Supervisor:
        """The supervisor for ``config.adapters.enabled()`` in the home ``paths``."""
        return cls(
            config.adapters.enabled(),
            paths=paths,
            log_dir=paths.log_dir / "adapters",
            **kw,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start every adapter's watch loop; returns at once (children start in the background)."""
        if self.log_dir is not None:
            self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in self.names:
            self._tasks.append(asyncio.create_task(self._watch(name), name=f"adapter:{name}"))
        if self.names:
            log.info("supervising adapters: %s", ", ".join(self.names))

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every child, SIGKILL those still alive after ``timeout`` seconds."""
        self._stopping.set()
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in self._procs.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                for name, proc in list(self._procs.items()):
                    if proc.returncode is None:
                        log.warning("adapter %s ignored SIGTERM for %.1f s; killing", name, timeout)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.wait(pending, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for st in self.states.values():
            if st.state != "failed":
                st.state, st.pid = "stopped", None

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-adapter state, JSON/msgpack-ready, in name order."""
        return [asdict(self.states[n]) for n in sorted(self.states)]

    def rescan(self, name: str) -> bool:
        """Ask a running adapter to reconcile now (SIGUSR1); False if it is not running."""
        proc = self._procs.get(name)
        if proc is None or proc.returncode is not None:
            return False
        proc.send_signal(signal.SIGUSR1)
        return True

    # -- one adapter -----------------------------------------------------------------

    def _log_file(self, name: str) -> IO[bytes] | int:
        if self.log_dir is None:
            return asyncio.subprocess.DEVNULL
        path = self.log_dir / f"{name}.log"
        with contextlib.suppress(OSError):
            if path.stat().st_size > MAX_LOG_BYTES:
                path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "ab")

    async def _watch(self, name: str) -> None:
        st = self.states[name]
        failures = 0
        while not self._stopping.is_set():
            st.state, st.since, st.connected = "starting", time.time(), None
            started = time.monotonic()
            logf = self._log_file(name)
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "palate.adapters.runner", name,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=logf,
                    env=self.env,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                proc = None
                st.last_error = f"cannot start: {e}"
            finally:
                if not isinstance(logf, int):
                    logf.close()
            rc: int | None = None
            self._reported.discard(name)
            if proc is not None:
                self._procs[name] = proc
                st.pid = proc.pid
                await self._read_status(st, proc)
                rc = await proc.wait()
                self._procs.pop(name, None)
                st.pid = None
            if self._stopping.is_set():
                st.state = "stopped"
                return
            if rc == EXIT_LOAD_FAILED:
                st.state = "failed"
                log.warning("adapter %s skipped: %s", name, st.last_error or "failed to load")
                return
            if time.monotonic() - started >= self.stable_after:
                failures = 0
            failures += 1
            st.restarts += 1
            if rc is not None and name not in self._reported:
                st.last_error = _exit_reason(rc)
            delay = min(self.backoff_max, self.backoff_initial * 2 ** (failures - 1))
            st.state, st.since = "backoff", time.time()
            if self.on_backoff is not None:
                self.on_backoff(delay)
            log.warning(
                "adapter %s exited (%s); restart %d in %.1f s",
                name, st.last_error, st.restarts, delay,
            )  # fmt: skip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        st.state = "stopped"

    async def _read_status(self, st: AdapterState, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            kind = msg.get("type")
            if kind == "ready":
                st.state, st.since = "running", time.time()
            elif kind == "emitted":
                st.events += int(msg.get("events", 0))
                st.last_event_ts = float(msg.get("ts", time.time()))
            elif kind == "connected":
                st.connected, st.socket = True, str(msg.get("socket", ""))[:300] or None
            elif kind == "unavailable":
                st.connected = False
                st.last_error = str(msg.get("message", ""))[:500]
            elif kind == "bad":
                st.bad_records += 1
            elif kind in ("error", "load_failed"):
                st.last_error = str(msg.get("message", ""))[:500]
                self._reported.add(st.name)
                if kind == "error":
                    st.state = "crashed"


def _exit_reason(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
        return f"killed by signal {-rc}"
    return f"exited with code {rc}"
