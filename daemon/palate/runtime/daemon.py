"""The daemon process: one lock, one store thread, one socket, clean shutdown.

Start-up order is chosen so a failure never harms data: take the lock (so two
daemons never share a database), unwrap the key (creating one only for a brand
new home), open and migrate the store, and only then bind the socket. On
SIGTERM/SIGINT it stops accepting, lets in-flight requests finish, commits and
checkpoints the store and exits 0, well inside launchd's 20 s budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path
from typing import Any

from palate import __version__
from palate.config import Config, load_config
from palate.errors import PalateError
from palate.paths import Paths, ensure_private_dir, resolve
from palate.runtime.api import Api
from palate.runtime.jobs import TrainingJobs
from palate.runtime.scheduler import Scheduler, WriterState
from palate.runtime.server import Server
from palate.runtime.serving import ScoringService, store_loader
from palate.runtime.supervisor import Supervisor
from palate.store.database import Store, check_key
from palate.store.keys import NO_RECOVERY_WARNING, KeyManager, protect_process, zero
from palate.store.writer import StoreWriter

log = logging.getLogger("palate")

#: Seconds to let in-flight requests finish on SIGTERM; the store then gets at most
#: STORE_CLOSE_S to commit and checkpoint; with the adapters' grace the total stays under 10 s.
SHUTDOWN_BUDGET_S = 4.0
STORE_CLOSE_S = 3.0
#: Adapters get this long to finish an in-flight batch before they are killed.
ADAPTERS_STOP_S = 2.0


class DaemonLock:
    """An flock on ``daemon.lock``: held for the daemon's whole life.

    The kernel drops the lock when the process dies, even by kill -9, so a stale
    socket file left behind is detected as stale (lock free) and replaced.

    The daemon takes two: :func:`data_lock`, next to the database, is what keeps two
    daemons (or a daemon and ``palate key rotate --rekey``) off one database whatever
    their environment says (the run dir depends on ``XDG_RUNTIME_DIR``); the one in the run
    dir guards the socket there, so a daemon never unlinks a socket another one serves.
    """

    def __init__(self, path: Path, what: str = "this home") -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PalateError(
                    "conflict",
                    f"another Palate process (pid {holder}) already runs for {self.what}; "
                    f"stop it first (kill {holder})",
                    {"pid": holder},
                ) from None
            raise
        # The pid is only for the message above (unbuffered, so nothing is left to flush at
        # close): a full disk must not stop the start here.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def data_lock(paths: Paths) -> DaemonLock:
    """The lock beside the database: one process at a time may own the data."""
    return DaemonLock(paths.data_dir / "daemon.lock", f"the data in {paths.data_dir}")


def setup_logging(paths: Paths, level: str, *, stderr: bool = True) -> None:
    """Log to a 0600 rotating file in the home and to stderr (launchd/systemd capture it).

    Log lines never contain event text or key material: only counts, ids of
    errors and state changes.
    """
    root = logging.getLogger("palate")
    root.setLevel(level.upper())
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    old = os.umask(0o077)
    try:
        fh = logging.handlers.RotatingFileHandler(
            paths.log_dir / "daemon.log", maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
    finally:
        os.umask(old)
    fh.setFormatter(fmt)
    root.handlers = [fh]
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)


def open_store(paths: Paths, config: Config) -> tuple[Store, KeyManager]:
    """Unwrap (or, for a new home, create) the key and open the store with it."""
    keys = KeyManager(paths, config.key_backend)
    if keys.exists():
        if paths.db_file.exists():
            # A rekey interrupted by a crash: finish it or undo it (we hold the data lock).
            keys.settle(lambda dek: check_key(paths.db_file, dek))
        dek = keys.unwrap()
    elif paths.db_file.exists():
        raise PalateError(
            "key_error",
            f"the database {paths.db_file} exists but its key file {paths.key_file} is missing; "
            "run `palate key recover` with your recovery kit (or restore key.json from a "
            "backup). No new key was created.",
        )
    else:
        dek = keys.create()
    try:
        if paths.db_file.exists():
            # Every page, read-only, before the first write: damage anywhere is reported
            # here, with the file exactly as it was (docs/security.md).
            check_key(paths.db_file, dek, thorough=True)
        store = Store(paths.db_file, dek)
    finally:
        zero(dek)
    return store, keys


class Daemon:
    def __init__(self, paths: Paths, config: Config) -> None:
        self.paths = paths
        self.config = config
        self._stop = asyncio.Event()

    async def run(self) -> None:
        store, keys = open_store(self.paths, self.config)
        writer = StoreWriter(store)
        writer.start()
        status = keys.status()
        if status.warning:
            log.warning("%s", status.warning)
        if status.recovery == "none":
            log.warning("%s", NO_RECOVERY_WARNING)
        api = Api(writer, keys.status, self.paths.socket)
        await api.load_pause()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.socket)  # stale: we hold the lock, so nobody serves it
        server = Server(api, str(self.paths.socket))
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # Adapters are child processes that talk to us over the socket like any client,
        # so they start only once the socket serves.
        supervisor = Supervisor.from_config(self.paths, self.config)
        api.adapter_states = supervisor.snapshot
        await supervisor.start()

        def fetch(version: int | None) -> tuple[dict[str, Any], bytes] | None:
            # Runs on the scoring thread; the read itself runs on the store thread.
            def read(s: Store) -> tuple[dict[str, Any], bytes] | None:
                v = s.deployed_version() if version is None else version
                return None if v is None else s.get_model(v)

            return asyncio.run_coroutine_threadsafe(writer.call(read), loop).result(60)

        serving = ScoringService(store_loader(fetch), idle_unload_s=self.config.idle_unload_s)
        serving.start()
        api.serving = serving

        async def swap(version: int) -> None:
            serving.deployed(version)

        api.on_deploy.append(swap)

        async def on_result(result: dict[str, Any]) -> None:
            if result.get("deployed"):
                await api._deployed(int(result["version"]))

        jobs = TrainingJobs(
            dict(os.environ, **self.paths.child_env()),
            on_result,
            budget_s=self.config.schedule.budget_h * 3600,
            memory_bytes=int(self.config.schedule.memory_gb * 2**30),
        )
        api.jobs = jobs
        followers: set[asyncio.Task[None]] = set()

        async def follow_registry() -> None:
            # A child killed after its deploy committed (even while it was exiting) never
            # reports it: serve what the registry says, not what the child managed to say.
            version = await writer.call(lambda s: s.deployed_version())
            loaded = serving.status()["version"]
            if version is not None and loaded is not None and version != loaded:
                log.warning("a training run deployed version %d without reporting it", version)
                await api._deployed(version)

        def after_run(kind: str, payload: dict[str, Any]) -> None:
            if kind == "job" and payload.get("outcome") != "done":
                task = loop.create_task(follow_registry())
                followers.add(task)
                task.add_done_callback(followers.discard)

        jobs.listeners.add(after_run)
        scheduler = Scheduler(self.config.schedule, jobs, WriterState(writer))
        await scheduler.start()
        api.scheduler = scheduler
        log.info(
            "palate %s listening on %s (key backend: %s)",
            __version__,
            self.paths.socket,
            status.backend,
        )
        print(
            f"palate daemon {__version__} ready on {self.paths.socket}", file=sys.stderr, flush=True
        )
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down")
            await scheduler.stop()  # first: no new run may start while we stop
            await jobs.stop()  # a killed training child leaves no half-registered model
            await loop.run_in_executor(None, serving.stop)
            await supervisor.stop(ADAPTERS_STOP_S)  # before the server: let them finish a batch
            await server.stop(SHUTDOWN_BUDGET_S)
            await asyncio.get_running_loop().run_in_executor(None, writer.stop, STORE_CLOSE_S)
            log.info("stopped cleanly")

    def stop(self) -> None:
        self._stop.set()


def _exit_during_startup(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_daemon(home: Path | None = None, *, log_level: str | None = None) -> None:
    """Run in the foreground until SIGTERM/SIGINT. Raises PalateError on start-up failure."""
    # Until the event loop takes over, a SIGTERM during start-up still means "exit 0":
    # nothing has been acknowledged yet, and the lock and files are released by the OS.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_during_startup)
    # Everything the daemon creates (logs, rotated logs, exports, temp files) is private.
    os.umask(0o077)
    paths = resolve(home)
    paths.ensure()
    paths.use_private_tmp()
    config = load_config(paths)
    setup_logging(paths, log_level or config.log_level)
    # This process will hold the data key: no core dumps, no debugger attach.
    log.info("key memory protection: %s", ", ".join(protect_process()) or "none available")
    owner = data_lock(paths)
    owner.acquire()
    lock = DaemonLock(paths.lock_file, f"the socket directory {paths.run_dir}")
    try:
        ensure_private_dir(paths.socket.parent)
        lock.acquire()
        asyncio.run(Daemon(paths, config).run())
    finally:
        lock.release()
        owner.release()
