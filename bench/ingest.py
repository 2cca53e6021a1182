"""Ingest benchmark: a real daemon against raw sqlite3 and raw SQLCipher, in one run.

What it measures (issue 2, "Benchmark"):

* ``ingest`` (one event per request, wait for the ack) with 1 and 16 clients,
* ``ingest_batch`` (``--batch`` events per request) with 1 and 16 clients,
* p50/p99 ack latency of each, and of single events paced at ``--rate``/s (low load),
* the anchors: the same rows inserted by raw ``sqlite3`` and raw ``sqlcipher3``
  (same table and indexes, WAL, synchronous=FULL, one commit per ``--batch`` rows).

Every ack is a durable commit (the daemon's contract), so the anchors commit just
as durably. Clients are separate processes with their own connections. The
database lives under ``--dir`` (default: the system temp dir); a tmpfs there makes
fsync free and the figures meaningless, so the filesystem is reported.

    .venv/bin/python bench/ingest.py            # ~1.5 minutes (12 s per mode)
    .venv/bin/python bench/ingest.py --quick    # ~25 s (2.5 s per mode)
    .venv/bin/python bench/ingest.py --json     # machine-readable

Goals: >= 20,000 events/s with 16 clients, >= 50% of raw SQLCipher batched-insert
throughput, p99 single-event ack under 5 ms at low load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import sqlcipher3.dbapi2 as sqlcipher

from palate.events import validate_event
from palate.store.database import MIGRATIONS
from palate.wire.client import Client

GOAL_EVENTS_PER_S = 20_000
GOAL_RATIO = 0.5
GOAL_P99_MS = 5.0

_WORDS = (
    "the a of to and in that it is was for on are as with his they at be this from have or "
    "by one had not but what all were when we there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has more her two "
    "like him see time could no make than first been its who now people my made over did down "
    "only way find use may water long little very after words called just where most know "
    "function return value error model reward answer question helpful harmless please explain"
)
WORDS = _WORDS.split()


# --- workload -------------------------------------------------------------------


def text_pool(seed: int, n: int = 256) -> list[str]:
    """Texts of 200-800 characters made of common words (deterministic per seed)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        target = rnd.randint(200, 800)
        words: list[str] = []
        size = 0
        while size < target:
            w = rnd.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        out.append(" ".join(words)[:target].strip() + ".")
    return out


def events(tag: str, seed: int) -> Iterator[dict[str, Any]]:
    """An endless stream of distinct pair events with unique ids."""
    pool = text_pool(seed)
    n = len(pool)
    i = 0
    while True:
        yield {
            "id": f"{tag}-{i}",
            "kind": "pair",
            "source": "bench",
            "ts": time.time(),
            "prompt": pool[i % n],
            "chosen": pool[(i * 7 + 1) % n],
            "rejected": pool[(i * 13 + 2) % n] + " (worse)",
            "context": {"app": "bench", "domain": "writing"},
        }
        i += 1


def anchor_rows(n: int = 5_000) -> list[tuple[Any, ...]]:
    """A pool of the rows the daemon would store: validated, packed, ready.

    The anchors cycle through it, giving each row a fresh unique id.
    """
    now = time.time()
    out = []
    for ev, _ in zip(events("anchor", 99), range(n), strict=False):
        canon = validate_event(ev, now=now)
        body = msgpack.packb(canon, use_bin_type=True)
        out.append((canon["id"], canon["kind"], canon["source"], canon["ts"], now, body))
    return out


# --- results --------------------------------------------------------------------


@dataclass
class Result:
    name: str
    clients: int
    events: int
    seconds: float
    events_per_s: float
    requests: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    errors: int = 0
    events_per_commit: float | None = None
    daemon_cpu_pct: float | None = None
    daemon_cpu_us_per_event: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    k = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return sorted_ms[k]


# --- client processes -------------------------------------------------------------


def client_worker(
    sock: str,
    tag: str,
    seed: int,
    batch: int,
    rate: float,
    seconds: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """One client process: connect, wait for the start, send until the deadline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
    gen = events(tag, seed)
    lat: list[float] = []
    sent = errors = 0
    first_error = ""
    with Client(socket_path=sock, timeout=30) as c:
        c.hello("bench")
        ready.release()
        go.wait()
        start = time.monotonic()
        deadline = start + seconds
        interval = 1.0 / rate if rate > 0 else 0.0
        next_at = start
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if interval:
                if now < next_at:
                    time.sleep(next_at - now)
                next_at += interval
            t0 = time.perf_counter()
            try:
                if batch > 1:
                    c.ingest_batch([next(gen) for _ in range(batch)])
                else:
                    c.ingest(next(gen))
            except Exception as e:
                errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"[:200]
                continue
            lat.append(time.perf_counter() - t0)
            sent += max(batch, 1)
        end = time.monotonic()
    out.put(
        {
            "start": start,
            "end": end,
            "events": sent,
            "lat": lat,
            "errors": errors,
            "first_error": first_error,
        }
    )


def run_clients(
    sock: str, key: str, name: str, clients: int, batch: int, seconds: float, rate: float = 0.0
) -> Result:
    ctx = mp.get_context("fork")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    run_tag = secrets.token_hex(4)
    procs = [
        ctx.Process(
            target=client_worker,
            args=(sock, f"{run_tag}-{key}-{i}", i, batch, rate, seconds, ready, go, out),
            daemon=True,
        )
        for i in range(clients)
    ]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            if not ready.acquire(timeout=30):
                raise RuntimeError(f"{name}: a client did not connect within 30 s")
        go.set()
        parts = [out.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    t0 = min(p["start"] for p in parts)
    t1 = max(p["end"] for p in parts)
    n = sum(p["events"] for p in parts)
    lat = sorted(x * 1000 for p in parts for x in p["lat"])
    first_errors = [p["first_error"] for p in parts if p["first_error"]]
    return Result(
        name=name,
        clients=clients,
        events=n,
        seconds=round(t1 - t0, 3),
        events_per_s=round(n / (t1 - t0), 1),
        requests=len(lat),
        p50_ms=_r(percentile(lat, 0.50)),
        p99_ms=_r(percentile(lat, 0.99)),
        max_ms=_r(lat[-1] if lat else None),
        errors=sum(p["errors"] for p in parts),
        notes={
            "batch": batch,
            **({"rate_per_s": rate} if rate else {}),
            **({"first_error": first_errors[0]} if first_errors else {}),
        },
    )


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# --- anchors ----------------------------------------------------------------------


def anchor(
    name: str,
    connect: Callable[[str], Any],
    path: Path,
    rows: list[tuple[Any, ...]],
    batch: int,
    seconds: float,
) -> Result:
    """Raw batched inserts of the daemon's rows into the daemon's schema, durably."""
    conn = connect(str(path))
    conn.isolation_level = None
    for pragma in (
        "journal_mode = WAL",
        "synchronous = FULL",
        "temp_store = MEMORY",
        "secure_delete = ON",
    ):
        conn.execute(f"PRAGMA {pragma}").fetchall()
    for stmt in filter(str.strip, MIGRATIONS[0][2].split(";")):
        conn.execute(stmt)
    sql = (
        "INSERT INTO events (id, kind, source, ts, received, body) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO NOTHING"
    )
    lat: list[float] = []
    n = 0
    pool = len(rows)
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        chunk = [(f"a{n + j}", *rows[(n + j) % pool][1:]) for j in range(batch)]
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, chunk)
        conn.execute("COMMIT")
        lat.append(time.perf_counter() - t0)
        n += batch
    took = time.monotonic() - start
    conn.close()
    ms = sorted(x * 1000 for x in lat)
    return Result(
        name=name,
        clients=1,
        events=n,
        seconds=round(took, 3),
        events_per_s=round(n / took, 1),
        requests=len(ms),
        p50_ms=_r(percentile(ms, 0.5)),
        p99_ms=_r(percentile(ms, 0.99)),
        max_ms=_r(ms[-1] if ms else None),
        events_per_commit=float(batch),
        notes={"batch": batch},
    )


def sqlcipher_connect(path: str) -> Any:
    conn = sqlcipher.connect(path, isolation_level=None)
    conn.execute("PRAGMA cipher_log_level = NONE")
    conn.execute(f"PRAGMA key = \"x'{secrets.token_hex(32)}'\"")
    return conn


# --- the daemon -------------------------------------------------------------------


class Daemon:
    """``palate daemon`` in its own session, stderr to a file; stopped with SIGTERM."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.log = home / "daemon-stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = ""

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ, PALATE_HOME=str(self.home), PALATE_KEY_BACKEND="file")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "palate.cli", "daemon"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=fh,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            for line in text.splitlines():
                if " ready on " in line:
                    self.socket = line.split(" ready on ", 1)[1].strip()
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not start:\n{self.log.read_text(errors='replace')}")

    def status(self) -> dict[str, Any]:
        with Client(socket_path=self.socket) as c:
            return c.status()

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the daemon has used so far (Linux only)."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


# --- reporting --------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if str(path).startswith(mnt) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def table(results: list[Result]) -> str:
    head = (
        f"{'mode':<28}{'clients':>8}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'ev/commit':>10}{'cpu %':>7}{'cpu us/ev':>10}{'errors':>7}"
    )
    lines = [head, "-" * len(head)]

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in results:
        lines.append(
            f"{r.name:<28}{r.clients:>8}{r.events_per_s:>11,.0f}{f(r.p50_ms, '.2f'):>9}"
            f"{f(r.p99_ms, '.2f'):>9}{f(r.max_ms, '.1f'):>9}"
            f"{f(r.events_per_commit, '.1f'):>10}{f(r.daemon_cpu_pct, '.0f'):>7}"
            f"{f(r.daemon_cpu_us_per_event, '.0f'):>10}{r.errors:>7}"
        )
    return "\n".join(lines)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl-C: unwind through main's cleanup."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (~30 s in all)")
    ap.add_argument("--seconds", type=float, help="seconds per mode (default 12, quick 2.5)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument(
        "--batch",
        type=int,
        default=100,
        help="events per ingest_batch and per anchor commit (default 100)",
    )
    ap.add_argument("--rate", type=float, default=100.0, help="paced low-load events/s")
    ap.add_argument("--dir", type=Path, default=None, help="where the temp home goes")
    ap.add_argument(
        "--modes",
        default="all",
        help="comma list of: single1,single16,batch1,batch16,paced,anchors (default all)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    secs = args.seconds or (2.5 if args.quick else 12.0)
    modes = (
        {"single1", "single16", "batch1", "batch16", "paced", "anchors"}
        if args.modes == "all"
        else set(args.modes.split(","))
    )

    # Ctrl-C and SIGTERM unwind through the cleanup below (even if started with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="pb-", dir=args.dir))
    home = base / "home"
    home.mkdir()
    daemon = Daemon(home)
    results: list[Result] = []
    load_start = os.getloadavg()
    meta: dict[str, Any] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite3": sqlite3.sqlite_version,
        "sqlcipher": sqlcipher.sqlite_version,
        "dir": str(base),
        "filesystem": filesystem_of(base),
        "seconds_per_mode": secs,
        "batch": args.batch,
    }
    log = (lambda *_: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        daemon.start()
        assert daemon.proc is not None
        meta["daemon_pid"] = daemon.proc.pid
        log(
            f"daemon pid {daemon.proc.pid} on {daemon.socket}; fs {meta['filesystem']}; "
            f"{secs:g} s per mode"
        )
        plan: list[tuple[str, int, int, float]] = [
            ("single1", 1, 1, 0.0),
            ("single16", args.clients, 1, 0.0),
            ("batch1", 1, args.batch, 0.0),
            ("batch16", args.clients, args.batch, 0.0),
            ("paced", 1, 1, args.rate),
        ]
        for key, clients, batch, rate in plan:
            if key not in modes:
                continue
            name = {
                "single1": "ingest",
                "single16": "ingest",
                "batch1": f"ingest_batch({batch})",
                "batch16": f"ingest_batch({batch})",
                "paced": f"ingest paced {rate:g}/s",
            }[key]
            log(f"running {name} x{clients} ...")
            before = daemon.status()["daemon"]["commits"]
            cpu0 = daemon.cpu_seconds()
            r = run_clients(daemon.socket, key, name, clients, batch, secs, rate)
            cpu1 = daemon.cpu_seconds()
            commits = daemon.status()["daemon"]["commits"] - before
            r.events_per_commit = round(r.events / commits, 1) if commits else None
            if cpu0 is not None and cpu1 is not None and r.events:
                r.daemon_cpu_pct = round(100 * (cpu1 - cpu0) / r.seconds, 1)
                r.daemon_cpu_us_per_event = round(1e6 * (cpu1 - cpu0) / r.events, 1)
            r.notes["key"] = key
            results.append(r)
        daemon.stop()
        if "anchors" in modes:
            log("building anchor rows ...")
            rows = anchor_rows()
            for nm, connect in (
                ("raw sqlite3", sqlite3.connect),
                ("raw sqlcipher3", sqlcipher_connect),
            ):
                log(f"running {nm} batch {args.batch} ...")
                r = anchor(
                    f"{nm} batch {args.batch}",
                    connect,
                    base / f"{nm[4:]}.db",
                    rows,
                    args.batch,
                    secs,
                )
                r.notes["key"] = nm.split()[1]
                results.append(r)
            # The latency floor of one acknowledged event: one row, one durable commit.
            log("running raw sqlcipher3 batch 1 ...")
            r = anchor(
                "raw sqlcipher3 batch 1",
                sqlcipher_connect,
                base / "floor.db",
                rows,
                1,
                min(secs, 5.0),
            )
            r.notes["key"] = "sqlcipher3_1"
            results.append(r)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    meta["loadavg_start"] = [round(x, 2) for x in load_start]
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    by = {r.notes.get("key"): r for r in results}
    summary: dict[str, Any] = {}
    ciph = by.get("sqlcipher3")
    for k in ("single16", "batch16"):
        if k in by:
            summary[f"{k}_events_per_s"] = by[k].events_per_s
            summary[f"{k}_meets_{GOAL_EVENTS_PER_S}"] = by[k].events_per_s >= GOAL_EVENTS_PER_S
            if ciph:
                ratio = by[k].events_per_s / ciph.events_per_s
                summary[f"{k}_vs_raw_sqlcipher"] = round(ratio, 3)
                summary[f"{k}_meets_ratio_{GOAL_RATIO}"] = ratio >= GOAL_RATIO
    if ciph and "sqlite3" in by:
        summary["raw_sqlcipher_vs_raw_sqlite3"] = round(
            ciph.events_per_s / by["sqlite3"].events_per_s, 3
        )
    if "paced" in by and by["paced"].p99_ms is not None:
        summary["paced_p99_ms"] = by["paced"].p99_ms
        summary[f"paced_p99_under_{GOAL_P99_MS}ms"] = by["paced"].p99_ms < GOAL_P99_MS
        if "sqlcipher3_1" in by:
            summary["raw_single_commit_p99_ms"] = by["sqlcipher3_1"].p99_ms
    for r in results:
        if "first_error" in r.notes:
            summary[f"{r.notes['key']}_first_error"] = r.notes["first_error"]

    if args.json:
        print(
            json.dumps(
                {"meta": meta, "results": [asdict(r) for r in results], "summary": summary},
                indent=2,
            )
        )
        return 0
    print(table(results))
    print("  (cpu %, cpu us/ev: the daemon process's CPU; anchors run in this process)")
    print()
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(
        f"\n  load average {meta['loadavg_start']} -> {meta['loadavg_end']} on "
        f"{meta['cpus']} CPUs; filesystem {meta['filesystem']}; "
        f"sqlite {meta['sqlite3']}, sqlcipher {meta['sqlcipher']}"
    )
    if meta["filesystem"] in ("tmpfs", "ramfs"):
        print("  WARNING: the temp dir is in memory, fsync is free: use --dir on a real disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
