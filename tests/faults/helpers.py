"""What the fault tests share: a daemon process that can be started with an OS-level hook or
killed during start-up, the store as the project's own ``Store`` API reads it, file
fingerprints, and the random source with its seed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import conftest
from conftest import PALATE, DaemonProc
from palate.client import Client
from palate.errors import PalateError
from palate.keys import KeyManager, zero
from palate.paths import Paths
from palate.store import Store

#: No nightly run may start by itself in the middle of a fault test (a training child
#: importing MLX would also skew every timing on two cores).
NO_SCHEDULE = "[schedule]\nenabled = false\n"


def seeded(test: str) -> tuple[random.Random, int]:
    """A random source for ``test``; ``PALATE_FAULT_SEED`` replays a failed run."""
    raw = os.environ.get("PALATE_FAULT_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 31)
    print(f"{test}: PALATE_FAULT_SEED={seed}")
    return random.Random(seed), seed


class FaultDaemon(DaemonProc):
    """``DaemonProc`` that can run a hook in the child before exec (rlimits) and can be
    spawned without waiting for its socket (to kill it in the middle of start-up)."""

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(home, env)
        self.preexec_fn = preexec_fn

    def spawn(self) -> subprocess.Popen[bytes]:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed by kill9/terminate
        self.proc = subprocess.Popen(
            [*PALATE, "daemon"],
            env=self.env,
            stdout=self._log_fh,
            stderr=self._log_fh,
            preexec_fn=self.preexec_fn,
        )
        conftest._STARTED.append(self)  # reaped by conftest if the test fails
        return self.proc

    def start(self, timeout: float = 20.0) -> FaultDaemon:
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with Client(socket_path=self.paths.socket, timeout=5) as c:
                    c.hello()
                return self
            except PalateError:
                time.sleep(0.02)
        raise RuntimeError(f"daemon did not start: {self.log.read_text()}")


def run_daemon_once(env: dict[str, str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """``palate daemon`` expected to refuse to start: its exit code and stderr."""
    try:
        return subprocess.run(
            [*PALATE, "daemon"], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:  # run() has killed it
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
        raise AssertionError(f"palate daemon did not refuse within {timeout} s: {err}") from None


@dataclass
class StoreView:
    """What the store holds, read through ``Store`` with the key from ``key.json``."""

    integrity: str
    seqs: dict[str, int]
    duplicates: list[str]
    cursors: dict[str, Any] = field(default_factory=dict)
    deployed: int | None = None
    models: dict[int, str] = field(default_factory=dict)


def read_store(paths: Paths, cursor_adapter: str | None = None) -> StoreView:
    """Open the store the way the daemon and the training child do. WAL lets this run
    beside a live daemon; ``Store.close`` checkpoints, so call it while the daemon is idle."""
    dek = KeyManager(paths).unwrap()
    try:
        store = Store(paths.db_file, dek)
    finally:
        zero(dek)
    try:
        integrity = store.integrity_check()
        seqs: dict[str, int] = {}
        duplicates = []
        for ev in store.iter_events():
            if ev["id"] in seqs:
                duplicates.append(ev["id"])
            seqs[ev["id"]] = ev["seq"]
        cursors = store.get_cursors(cursor_adapter) if cursor_adapter else {}
        models = {m["version"]: m["state"] for m in store.list_models()}
        deployed = store.deployed_version()
    finally:
        store.close()
    return StoreView(integrity, seqs, duplicates, cursors, deployed, models)


def assert_acked_present(view: StoreView, acked: Mapping[str, int], where: str) -> None:
    """Every acknowledged event is stored, under the seq its acknowledgement named, once."""
    assert view.integrity == "ok", f"{where}: integrity_check says {view.integrity!r}"
    assert not view.duplicates, f"{where}: duplicate ids {view.duplicates[:5]}"
    lost = [i for i in acked if i not in view.seqs]
    assert not lost, f"{where}: {len(lost)} acknowledged events lost, e.g. {sorted(lost)[:5]}"
    moved = [i for i, s in acked.items() if view.seqs[i] != s]
    assert not moved, f"{where}: {len(moved)} events stored under another seq than acked"


def fingerprint(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` (not recursive)."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file():
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def wait_for(what: Callable[[], Any], timeout: float, message: str, every: float = 0.02) -> Any:
    """Poll real process state until ``what()`` is truthy; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


def rating(eid: str, source: str = "faults", size: int = 0) -> dict[str, Any]:
    return {
        "kind": "rating",
        "id": eid,
        "source": source,
        "prompt": f"prompt of {eid}",
        "response": f"response {eid} " + "x" * size,
        "label": 1,
    }


def pair(eid: str, source: str = "faults", size: int = 0) -> dict[str, Any]:
    return {
        "kind": "pair",
        "id": eid,
        "source": source,
        "prompt": f"prompt of {eid}",
        "chosen": f"a clear answer {eid} " + "y" * size,
        "rejected": "no",
    }
