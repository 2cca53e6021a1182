"""What the fault tests share: a daemon process that can be started with an OS-level hook or
killed during start-up, the store as the project's own ``Store`` API reads it, file
fingerprints, and the random source with its seed."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import PALATE
from palate.paths import Paths
from palate.store.database import Store
from palate.store.keys import KeyManager, zero

#: No nightly run may start by itself in the middle of a fault test (a training child
#: importing MLX would also skew every timing on two cores).
NO_SCHEDULE = "[schedule]\nenabled = false\n"


def seeded(test: str) -> tuple[random.Random, int]:
    """A random source for ``test``; ``PALATE_FAULT_SEED`` replays a failed run."""
    raw = os.environ.get("PALATE_FAULT_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 31)
    print(f"{test}: PALATE_FAULT_SEED={seed}")
    return random.Random(seed), seed


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
    """sha256 of every file in ``directory`` (not recursive), but the daemon's lock: it sits
    beside the database and holds only the pid of whoever started last."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != "daemon.lock":
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


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
