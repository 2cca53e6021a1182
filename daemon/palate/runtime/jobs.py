"""Training runs as child processes, watched by the daemon.

The daemon never trains in its own process: a training run needs gigabytes and
minutes of both cores, and a crash or OOM there must not touch ingestion or
scoring. A run is ``python -m palate.runtime.training_child --job ID`` at low CPU priority.
The child reports JSON lines on stdout (``progress`` events, then one
``result``); the daemon relays progress to subscribers and, when the child
registered and deployed a new version, hot-swaps the scorer. Killing the child
at any moment is safe: it registers a model in a single transaction at its very
end, so there is never a half-registered version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from palate.errors import PalateError

log = logging.getLogger(__name__)

#: Niceness of the training child: it must never make the machine feel slow.
TRAIN_NICE = 10
#: How long a SIGTERM'd child gets before SIGKILL.
KILL_GRACE_S = 3.0
#: macOS's tool for the background CPU/I/O policy of a process.
TASKPOLICY = "/usr/bin/taskpolicy"
MEMORY_POLL_S = 2.0
#: Progress lines longer than this are dropped (a confused child must not flood us).
MAX_LINE = 64 * 1024


@dataclass
class Job:
    id: str
    reason: str
    started: float
    pid: int | None = None
    phase: str = "starting"
    progress: dict[str, Any] = field(default_factory=dict)
    finished: float | None = None
    outcome: str | None = None  # "done" | "failed" | "killed"
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


Listener = Callable[[str, dict[str, Any]], None]


class TrainingJobs:
    """Starts at most one training child at a time and follows it to the end."""

    def __init__(
        self,
        env: dict[str, str],
        on_result: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        budget_s: float = 4 * 3600.0,
        memory_bytes: int = 0,
    ) -> None:
        self.env = env
        self.on_result = on_result
        self.budget_s = budget_s
        self.memory_bytes = memory_bytes
        self.current: Job | None = None
        self.last: Job | None = None
        self.listeners: set[Listener] = set()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    def start(self, reason: str, extra_args: list[str] | None = None) -> Job:
        if self.current is not None:
            raise PalateError(
                "conflict",
                f"training run {self.current.id} is already running",
                {"job": self.current.id},
            )
        job = Job(
            id=time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2),
            reason=reason,
            started=time.time(),
        )
        self.current = job
        self._done = asyncio.Event()
        self._task = asyncio.create_task(self._run(job, extra_args or []))
        return job

    async def wait(self) -> Job | None:
        """Wait for the running job (if any) to finish; return it."""
        job = self.current
        if job is not None:
            await self._done.wait()
        return job or self.last

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, payload)
            except Exception:  # a broken subscriber must not break the job
                log.exception("progress listener failed")

    async def _run(self, job: Job, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "palate.runtime.training_child", "--job", job.id, *extra]
        if sys.platform == "darwin" and os.path.exists(TASKPOLICY):
            cmd = [TASKPOLICY, "-b", *cmd]  # background CPU and I/O policy (the nice of macOS)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                # The run checks it still has this parent before it registers a model.
                env={
                    **(self.env if self.env is not None else os.environ),
                    PARENT_ENV: str(os.getpid()),
                },
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_lower_priority,
                limit=MAX_LINE,
            )
            job.pid = self._proc.pid
            log.info("training run %s started (pid %d): %s", job.id, job.pid, job.reason)
            stderr_task = asyncio.create_task(self._drain_stderr(self._proc))
            guard = asyncio.create_task(self._memory_guard(job, self._proc.pid))
            try:
                await asyncio.wait_for(self._follow(job, self._proc), self.budget_s)
            except asyncio.TimeoutError:
                job.error = f"exceeded its wall-clock budget of {self.budget_s:.0f} s"
                await self._kill()
            rc = await self._proc.wait()
            guard.cancel()
            tail = await stderr_task
            if job.outcome is None:
                if rc == 0 and job.result:
                    job.outcome = "done"
                else:
                    job.outcome = "killed" if rc < 0 else "failed"
                    job.error = job.error or f"exited with {rc}: {tail[-500:]}"
        except Exception as e:  # never let a job failure escape into the daemon
            log.exception("training run %s failed to run", job.id)
            job.outcome, job.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            job.finished = time.time()
            job.phase = "finished"
            self.last, self.current, self._proc = job, None, None
            log.info(
                "training run %s %s%s", job.id, job.outcome, f": {job.error}" if job.error else ""
            )
            self._emit("job", job.to_wire())
            self._done.set()
        if job.outcome == "done":
            try:
                await self.on_result(job.result)
            except Exception:
                log.exception("handling the result of run %s failed", job.id)

    async def _follow(self, job: Job, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # over MAX_LINE: skip it
                continue
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "progress":
                job.phase = str(msg.get("phase", job.phase))
                job.progress = {k: v for k, v in msg.items() if k != "type"}
                self._emit("progress", {"job": job.id, **job.progress})
            elif msg.get("type") == "result":
                job.result = {k: v for k, v in msg.items() if k != "type"}

    async def _memory_guard(self, job: Job, pid: int) -> None:
        """Stop the child when its resident memory passes the ceiling (checked every 2 s).

        An address-space rlimit would be simpler but breaks MLX, which maps far more than it
        touches; resident memory is what makes a laptop swap.
        """
        if self.memory_bytes <= 0:
            return
        while True:
            await asyncio.sleep(MEMORY_POLL_S)
            rss = resident_bytes(pid)
            if rss is not None and rss > self.memory_bytes:
                job.error = (
                    f"used {rss / 2**30:.1f} GiB, over the memory ceiling of "
                    f"{self.memory_bytes / 2**30:.1f} GiB ([schedule] memory_gb)"
                )
                log.warning("training run %s: %s", job.id, job.error)
                await self._kill()
                return

    @staticmethod
    async def _drain_stderr(proc: asyncio.subprocess.Process) -> str:
        assert proc.stderr is not None
        tail = b""
        while chunk := await proc.stderr.read(65536):
            tail = (tail + chunk)[-4096:]
        return tail.decode("utf-8", "replace")

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def stop(self) -> None:
        """On daemon shutdown: end the child (it leaves no half-registered model)."""
        if self.current is not None:
            self.current.error = "stopped because the daemon shut down"
            await self._kill()
            if self._task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._task, KILL_GRACE_S + 2)


def resident_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (Linux /proc, else ``ps``); None when unknown."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import subprocess

        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return int(out) * 1024 if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


#: Set for a training run to the daemon's pid (see train_job.parent_alive).
PARENT_ENV = "PALATE_PARENT_PID"


def _lower_priority() -> None:
    """In the child before exec: lower CPU (and, on Linux, I/O) priority."""
    with contextlib.suppress(OSError):
        os.nice(TRAIN_NICE)
    if sys.platform.startswith("linux"):
        # prctl(PR_SET_PDEATHSIG, SIGKILL): if the daemon dies (even by kill -9), the kernel
        # kills the run, so no orphan registers or deploys a model the daemon never judged.
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        # ioprio_set(IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << 13); best effort.
        nr = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine)
        if nr is not None:
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0, 3 << 13)
