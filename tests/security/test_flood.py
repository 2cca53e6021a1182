"""A local flooder must not starve a well-behaved client.

The flooder is its own process (tests/security/flooder.py): it holds every connection the
daemon allows, or keeps ``max_in_flight`` requests outstanding on many connections, or
trickles never-ending frames (slow-loris), or parks nearly-full 4 MiB partial frames. While
it does, a well-behaved client (this test process: a new connection per call, as the CLI
does) must still get ``status`` and ``ingest`` answered, each within ``BOUND_S``. The
latencies (median and worst) and the daemon's RSS are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProc, module_daemon
from palate.wire import protocol

FLOODER = Path(__file__).with_name("flooder.py")
#: Worst acceptable answer time for the good client, per call (connect + request + answer).
BOUND_S = 2.0
#: Under an in-flight flood the good client's store work queues behind the flooder's in the
#: store thread's one FIFO queue (writer.py, up to 4096 jobs): its wait grows with the
#: flooder's connections x max_in_flight x the cost of one job. Measured on the 2-core CI
#: machine with 16 flooding connections: status ~2-4.5 s, ingest ~0.6-1.5 s. This bound is
#: that envelope, not a goal: a fair (per-connection round-robin) store queue would bring it
#: down to BOUND_S.
INFLIGHT_BOUND_S = 10.0
CALLS = 10


@pytest.fixture(scope="module")
def flood_daemon() -> Iterator[DaemonProc]:
    with module_daemon("pf-") as d:
        yield d


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def good_client(d: DaemonProc, tag: str, calls: int = CALLS) -> dict[str, float]:
    """calls x (status, ingest), each on a fresh connection; milliseconds per call."""
    lat: dict[str, list[float]] = {"status": [], "ingest": []}
    for i in range(calls):
        for method in ("status", "ingest"):
            t0 = time.monotonic()
            with d.client(timeout=30) as c:
                if method == "status":
                    assert c.status()["daemon"]["pid"] == d.proc.pid  # type: ignore[union-attr]
                else:
                    ev = {
                        "kind": "pair",
                        "source": "good",
                        "prompt": f"{tag} {i} {time.time()}",
                        "chosen": "a",
                        "rejected": "b",
                    }
                    assert not c.ingest(ev)["duplicate"]
            lat[method].append(time.monotonic() - t0)
    return {
        f"{m}_{k}": round(f(v) * 1000, 1)
        for m, v in lat.items()
        for k, f in (("p50_ms", statistics.median), ("max_ms", max))
    }


class Flood:
    def __init__(self, d: DaemonProc, mode: str, n: int | None = None) -> None:
        args = [sys.executable, str(FLOODER), mode, str(d.paths.socket)]
        if n is not None:
            args.append(str(n))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), line
        self.connections = int(line.split()[1])

    def stop(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.proc.wait(30)
        sent, answers, busy, refused = map(int, line.split()[1:])
        return {"sent": sent, "answers": answers, "busy": busy, "refused": refused}


def run_flood(
    d: DaemonProc, mode: str, n: int | None = None, bound_s: float = BOUND_S, calls: int = CALLS
) -> dict[str, object]:
    base = good_client(d, f"{mode}-before")
    rss_before = rss_mb(d.proc.pid)[0]  # type: ignore[union-attr]
    flood = Flood(d, mode, n)
    try:
        time.sleep(0.5)  # let the flood settle in
        during = good_client(d, mode, calls)
        rss = rss_mb(d.proc.pid)  # type: ignore[union-attr]
    finally:
        counts = flood.stop()
    figures = {
        "mode": mode,
        "flood_connections": flood.connections,
        "baseline": base,
        "during": during,
        "daemon_rss_mb": rss,
        "rss_before_mb": rss_before,
        **counts,
    }
    print(f"\nflood {figures}")
    assert d.alive()
    worst = max(v for k, v in during.items() if k.endswith("max_ms"))
    assert worst <= bound_s * 1000, f"{mode}: the good client waited {worst} ms: {figures}"
    return figures


def test_connection_flood(flood_daemon: DaemonProc) -> None:
    """The flooder holds every connection: the good client's connection is let in (the
    flooder's least recently active one is closed to make room), not refused `busy`."""
    f = run_flood(flood_daemon, "idle", protocol.MAX_CONNECTIONS + 10)
    assert f["flood_connections"] >= protocol.MAX_CONNECTIONS - 1  # it really held them all


def test_slowloris_flood(flood_daemon: DaemonProc) -> None:
    run_flood(flood_daemon, "slowloris", protocol.MAX_CONNECTIONS)


def test_in_flight_flood(flood_daemon: DaemonProc) -> None:
    f = run_flood(flood_daemon, "inflight", 16, bound_s=INFLIGHT_BOUND_S, calls=4)
    assert f["answers"] > 0  # it was really being served (and flooding)


def test_partial_frames_flood(flood_daemon: DaemonProc) -> None:
    f = run_flood(flood_daemon, "partial", 32)
    rss, _hwm = f["daemon_rss_mb"]  # type: ignore[misc]
    grown = rss - f["rss_before_mb"]  # type: ignore[operator]
    # An unfinished message costs its bytes only (no decoded objects), held twice: by the
    # decoder and by the scanner that finds where messages end (server.Connection). So at
    # most 2 x max_frame_bytes per connection: 32 x 8 MiB here, up to 1 GiB at the
    # 128-connection limit.
    per_conn = 2 * protocol.MAX_FRAME_BYTES / 2**20
    assert grown < 32 * per_conn * 1.5, f"32 parked 4 MiB frames grew the daemon {grown:.0f} MiB"


def test_daemon_still_serving_after_floods(flood_daemon: DaemonProc) -> None:
    time.sleep(1.5)  # closed flood connections are reaped asynchronously
    with flood_daemon.client() as c:
        st = c.status()
    assert st["events"]["total"] >= 4 * CALLS
