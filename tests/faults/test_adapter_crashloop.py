"""An adapter that crashes as soon as it runs, supervised by the real daemon.

``Crashy`` (tests/plugins_support) sends one event and raises, every time. The daemon's own
supervisor must restart it after 1, 2, 4 ... seconds (doubling, capped at backoff_max),
report it in ``status``, and keep answering ingest and status at full speed meanwhile.

The gaps are measured from outside: the exit time the daemon reports (``since`` of the
``backoff`` state) to the moment a new adapter pid shows up. The cap itself (300 s by
default, not configurable) is beyond a test's time; tests/test_supervisor.py checks it on
a supervisor with a small ``backoff_max``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

from adapter_harness import SUPPORT
from conftest import DaemonProc, daemon_env
from palate.errors import PalateError

from .helpers import NO_SCHEDULE, assert_acked_present, rating, read_store

RESTARTS = 3  # gaps of 1, 2 and 4 s


def test_crash_looping_adapter_backs_off_while_the_daemon_serves(home: Path) -> None:
    (home / "config.toml").write_text(
        NO_SCHEDULE + '[adapters.crashy]\nenabled = true\nmodule = "palate_test_plugins:Crashy"\n'
    )
    pythonpath = os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")])
    d = DaemonProc(home, daemon_env(home, PYTHONPATH=pythonpath)).start()

    acked: dict[str, int] = {}
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        n = 0
        with d.client(timeout=10) as c:
            while not stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    res = c.ingest(rating(f"i{n}"))
                    acked[res["id"]] = res["seq"]
                except PalateError as e:
                    failures.append(f"{e.code}: {e.message}")
                latencies.append(time.monotonic() - t0)
                time.sleep(0.01)

    writer = threading.Thread(target=ingest, daemon=True)
    writer.start()

    # Watch the supervisor through status: (exit time, restart count) and new pids.
    exits: dict[int, float] = {}  # restarts -> when that child exited (daemon's clock)
    started: dict[int, float] = {}  # restarts so far -> when the next pid appeared
    seen_pids: set[int] = set()
    states: set[str] = set()
    status_lat: list[float] = []
    snapshot: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    with d.client() as c:
        while len(started) <= RESTARTS and time.monotonic() < deadline:
            t0 = time.monotonic()
            (snapshot,) = c.status()["adapters"]
            status_lat.append(time.monotonic() - t0)
            states.add(snapshot["state"])
            if snapshot["state"] == "backoff":
                exits.setdefault(snapshot["restarts"], snapshot["since"])
            pid = snapshot["pid"]
            if pid is not None and pid not in seen_pids:
                seen_pids.add(pid)
                started.setdefault(snapshot["restarts"], time.time())
            time.sleep(0.02)
    stop.set()
    writer.join(10)
    assert d.alive(), "the daemon died with its adapter"

    gaps = [started[r] - exits[r] for r in range(1, RESTARTS + 1) if r in started and r in exits]
    assert len(gaps) == RESTARTS, (exits, started, states)
    expected = [min(300.0, 2.0 ** (r - 1)) for r in range(1, RESTARTS + 1)]
    for gap, want in zip(gaps, expected, strict=True):
        assert want - 0.1 <= gap <= want + 1.5, (gaps, expected)  # never early, not much late
    assert all(b > a * 1.5 for a, b in itertools.pairwise(gaps)), gaps
    assert {"backoff"} <= states and snapshot["restarts"] >= RESTARTS
    assert "boom" in (snapshot["last_error"] or "")

    # the daemon kept serving at full speed meanwhile
    assert not failures, failures[:3]
    assert len(acked) > 100
    assert max(latencies) < 2.0 and max(status_lat) < 2.0, (max(latencies), max(status_lat))
    with d.client() as c:
        by_source = c.status()["events"]["by_source"]
    assert by_source.get("crashy") == 1, by_source  # the same event on every restart: once
    assert d.terminate() == 0
    assert_acked_present(read_store(d.paths), acked, "after the crash loop")
    print(
        f"restart gaps {', '.join(f'{g:.2f}' for g in gaps)} s (expected {expected}); "
        f"{len(acked)} events acked meanwhile, ingest latency max "
        f"{max(latencies) * 1000:.0f} ms, status max {max(status_lat) * 1000:.0f} ms"
    )
