"""Load and soak: many concurrent clients on one real daemon for a fixed time, then an audit.

A real ``palate daemon`` runs in a temp ``PALATE_HOME`` (file key backend, nightly training
schedule off) with a reward model deployed on the embedded base (``builtin:smollm2-135m``:
a freshly initialised LoRA + head, built as ``bench/rerank.py`` does; speed and memory do
not depend on what the weights learned). Then, over the real Unix socket:

* ``--clients`` concurrent connections (default 50) for ``--duration`` seconds (default
  300). A share ``--rerank-share`` of the clients (default 0.2) send ``rerank`` (2-8 HH
  candidates for an HH prompt); the others send feedback: ``ingest`` (one event) or, with
  probability ``--batch-share``, ``ingest_batch`` (2..``--max-batch`` events). Events are
  pair, rating and ranking events built from ``shared/data/hh_harmless_dev.jsonl``, each with
  a unique id. Every client has one request in flight and thinks ``--think-ms`` (exponential
  mean) between requests.
* Every ``--burst-every`` seconds one extra connection pipelines ``--burst`` short reranks
  at once (deadline ``--burst-timeout-ms``): more than the 64 requests a connection may have in
  flight and more than the scorer's 64-deep queue, so the daemon must answer ``busy``. These
  are reported as ``rerank-burst``.
* The daemon's RSS (``/proc/<pid>/status`` VmRSS and VmHWM), threads and open fds are
  sampled every ``--rss-every`` seconds. Reported: the median of the first minute vs the
  last minute (a third of the run each when it is shorter than 3 minutes), the least-squares
  slope in MB/min after the first minute (the model and SQLite caches fill in it), and the
  peak (sampled, and the kernel's VmHWM).

Outcomes are classified per method: ``ok``; ``busy`` (refused at once: queue full, too many in
flight; its latency is reported and must be small); ``deadline`` (``busy`` because the
request waited past its deadline); anything else is **unexpected** (any other error code, a
client-side timeout of ``--client-timeout`` s, a lost connection, or a malformed answer).

After the run (requests in flight are answered first), the daemon exports every stored event;
every acknowledged event id must be there exactly once. The daemon is then stopped with
SIGTERM and must exit 0. If the daemon died during the run, the store itself is read
afterwards instead: acknowledged events must survive a crash too.

Exit status 0 only if no acknowledged event is lost or duplicated, no unexpected error
occurred and the daemon stayed up and stopped cleanly; 1 otherwise; 130 if interrupted.

    nice -n 10 .venv/bin/python bench/load.py                       # 50 clients, 5 minutes
    nice -n 10 .venv/bin/python bench/load.py --duration 30 --clients 10 --json /tmp/l.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest import Daemon, filesystem_of, percentile
from palate.errors import PalateError
from palate.wire.client import AsyncClient, Client

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
BASE_MODEL = "builtin:smollm2-135m"
#: Outcomes that are part of the daemon's contract under overload.
EXPECTED = ("ok", "busy", "deadline")


# --- the deployed model (in a child process: this one never imports MLX) ----------------


def deploy_model(home: str, out: Any) -> None:
    """Register and deploy a fresh LoRA + head on the embedded base, as bench/rerank.py does."""
    import rerank  # loads OpenBLAS first, then MLX
    from palate.model import artifacts
    from palate.model.base_model import load_base_model
    from palate.model.reward_model import LoraConfig, RewardModel
    from palate.model.scoring import Calibration
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    t0 = time.monotonic()
    base = load_base_model(BASE_MODEL)
    paths = resolve(Path(home))
    paths.ensure()
    rm = RewardModel(base.model, LoraConfig(layers=4), seed=0)
    cfg = artifacts.build_config(base, LoraConfig(layers=4), rerank.MAX_TOKENS, Calibration())
    blob = artifacts.to_bytes(artifacts.artifact_from_model(rm, cfg))
    store = Store(paths.db_file, KeyManager(paths, "file").create())
    version = store.add_model(base_model=BASE_MODEL, artifact=blob, meta={"decision": "deploy"})
    store.deploy_model(version, how="manual", reason="load benchmark")
    store.close()
    out.put({"version": version, "artifact_bytes": len(blob), "seconds": time.monotonic() - t0})


# --- workload -----------------------------------------------------------------------------


def load_rows() -> list[dict[str, str]]:
    if not DATA.exists():
        raise SystemExit(f"the HH data file is missing: {DATA}")
    rows = []
    with DATA.open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            p, c, j = r.get("prompt", ""), r.get("chosen", ""), r.get("rejected", "")
            if p.strip() and c.strip() and j.strip() and c != j:
                rows.append({"prompt": p, "chosen": c, "rejected": j})
    return rows


class Workload:
    """Events with unique ids and rerank requests, from the HH rows (deterministic per seed)."""

    def __init__(self, rows: list[dict[str, str]], tag: str, seed: int | str) -> None:
        self.rows = rows
        self.tag = tag
        self.rnd = random.Random(seed)
        self.n = 0

    def event(self) -> dict[str, Any]:
        rnd = self.rnd
        r = rnd.choice(self.rows)
        self.n += 1
        ev: dict[str, Any] = {
            "id": f"{self.tag}-{self.n}",
            "source": "load",
            "ts": time.time(),
            "prompt": r["prompt"],
            "context": {"app": "palate-load", "domain": "chat"},
        }
        roll = rnd.random()
        if roll < 0.7:
            ev.update(kind="pair", chosen=r["chosen"], rejected=r["rejected"])
        elif roll < 0.9:
            good = rnd.random() < 0.5
            ev.update(kind="rating", response=r["chosen" if good else "rejected"])
            ev["label"] = 1 if good else -1
        else:
            other = rnd.choice(self.rows)["chosen"]
            responses = list(dict.fromkeys([r["chosen"], r["rejected"], other]))
            ev.update(kind="ranking", responses=responses)
        return ev

    def rerank(self, lo: int = 2, hi: int = 8) -> tuple[str, list[str]]:
        rnd = self.rnd
        r = rnd.choice(self.rows)
        want = rnd.randint(lo, hi)
        cands = [r["chosen"], r["rejected"]]
        while len(cands) < want:
            o = rnd.choice(self.rows)
            cands.append(o["chosen"] if rnd.random() < 0.5 else o["rejected"])
        cands = cands[:want]
        rnd.shuffle(cands)
        return r["prompt"], cands


# --- client processes ---------------------------------------------------------------------


@dataclass
class Tally:
    """One method's outcomes in one worker. Latencies in seconds."""

    ok: list[float] = field(default_factory=list)
    ok_at: list[float] = field(default_factory=list)  # completion time (epoch s) of each ok
    busy: list[float] = field(default_factory=list)
    deadline: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # first few messages
    items: int = 0  # events acknowledged, or candidates ranked

    def add_error(self, code: str, msg: str) -> None:
        self.codes[code] += 1
        if len(self.unexpected) < 5:
            self.unexpected.append(f"{code}: {msg}"[:300])


@dataclass
class Knobs:
    socket: str
    duration: float
    think_s: float
    batch_share: float
    max_batch: int
    rerank_timeout_ms: int | None
    client_timeout: float
    burst: int
    burst_every: float
    burst_timeout_ms: int
    version: int
    seed: int


def classify(e: PalateError) -> str:
    if e.code == "busy":
        return "deadline" if "deadline" in str(e) else "busy"
    return "unexpected"


class Worker:
    """Runs this process's share of the clients in one asyncio loop."""

    def __init__(self, k: Knobs, rows: list[dict[str, str]], run: str, wid: int) -> None:
        self.k = k
        self.rows = rows
        self.run = run
        self.wid = wid
        self.tallies: dict[str, Tally] = {}
        self.acked: list[tuple[str, int]] = []
        self.start = 0.0
        self.deadline = 0.0
        self.abort: Any = None

    def tally(self, method: str) -> Tally:
        return self.tallies.setdefault(method, Tally())

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.abort.is_set()

    async def _connect(self) -> AsyncClient:
        c = await AsyncClient(socket_path=self.k.socket).connect()
        await asyncio.wait_for(c.call("hello", {"client": "palate-load"}), 30)
        return c

    async def _request(
        self, c: AsyncClient, method: str, params: Mapping[str, Any], timeout: float
    ) -> tuple[str, Any, float]:
        """(outcome, result or error, latency)."""
        t0 = time.perf_counter()
        try:
            res = await asyncio.wait_for(c.call(method, params), timeout)
        except PalateError as e:
            out = classify(e)
            return out, e, time.perf_counter() - t0
        except asyncio.TimeoutError:
            err = PalateError("client_timeout", f"no answer to {method} within {timeout:g} s")
            return "unexpected", err, time.perf_counter() - t0
        except OSError as e:
            return "unexpected", PalateError("unavailable", str(e)), time.perf_counter() - t0
        return "ok", res, time.perf_counter() - t0

    def _check(self, method: str, sent: Any, res: Any) -> str | None:
        """A problem with a successful answer, or None."""
        if method == "ingest":
            if res.get("id") != sent[0]["id"] or res.get("duplicate") is not False:
                return f"bad ack {res!r} for {sent[0]['id']}"
        elif method == "ingest_batch":
            results = res.get("results") or []
            if res.get("accepted") != len(sent) or len(results) != len(sent):
                return f"bad batch ack: accepted {res.get('accepted')} of {len(sent)}"
            for ev, r in zip(sent, results, strict=True):
                if r.get("id") != ev["id"] or r.get("duplicate") is not False:
                    return f"bad ack {r!r} for {ev['id']}"
        else:
            n = len(sent)
            if sorted(res.get("order", [])) != list(range(n)) or len(res.get("scores", [])) != n:
                return f"malformed rerank answer for {n} candidates: {str(res)[:200]}"
            if res.get("version") != self.k.version:
                return f"scored by version {res.get('version')}, deployed {self.k.version}"
        return None

    async def client(self, cid: int, role: str) -> None:
        k = self.k
        wl = Workload(self.rows, f"{self.run}-{cid}", seed=f"{k.seed}-{cid}")
        rnd = random.Random(f"{k.seed}-{cid}-think")
        c: AsyncClient | None = None
        # Spread the first requests over the first think interval.
        await asyncio.sleep(rnd.random() * k.think_s)
        while self.running():
            if c is None:
                try:
                    c = await self._connect()
                except (PalateError, OSError, asyncio.TimeoutError) as e:
                    self.tally("connect").add_error(getattr(e, "code", "unavailable"), str(e))
                    await asyncio.sleep(0.5)
                    continue
            sent: Any
            if role == "rerank":
                method = "rerank"
                prompt, cands = wl.rerank()
                params: dict[str, Any] = {"prompt": prompt, "candidates": cands}
                if k.rerank_timeout_ms is not None:
                    params["timeout_ms"] = k.rerank_timeout_ms
                sent = cands
            elif rnd.random() < k.batch_share:
                method = "ingest_batch"
                sent = [wl.event() for _ in range(rnd.randint(2, k.max_batch))]
                params = {"events": sent}
            else:
                method = "ingest"
                sent = [wl.event()]
                params = {"event": sent[0]}
            outcome, res, lat = await self._request(c, method, params, k.client_timeout)
            if not self._record(self.tally(method), method, outcome, res, lat, sent):
                # The connection's state is unknown (timeout, lost): start a fresh one.
                await c.close()
                c = None
            if k.think_s > 0:
                await asyncio.sleep(rnd.expovariate(1.0 / k.think_s))
        if c is not None:
            await c.close()

    def _record(self, t: Any, method: str, outcome: str, res: Any, lat: float, sent: Any) -> bool:
        """Count one answer in ``t``; track acknowledged ids. False: an unexpected error
        (the connection's state is unknown)."""
        if outcome == "ok":
            problem = self._check(method, sent, res)
            if problem:
                t.add_error("bad_answer", problem)
                return True
            t.ok.append(lat)
            t.ok_at.append(time.time())
            if method == "ingest":
                self.acked.append((res["id"], res["seq"]))
            elif method == "ingest_batch":
                self.acked.extend((r["id"], r["seq"]) for r in res["results"])
            t.items += len(sent)
        elif outcome == "busy":
            t.busy.append(lat)
        elif outcome == "deadline":
            t.deadline.append(lat)
        else:
            t.add_error(res.code, str(res))
            return False
        return True

    async def bursts(self) -> None:
        """Every ``burst_every`` s: ``burst`` short reranks pipelined on one connection."""
        k = self.k
        wl = Workload(self.rows, f"{self.run}-burst", seed=f"{k.seed}-burst")
        await asyncio.sleep(min(k.burst_every / 2, 10.0))
        while self.running():
            t = self.tally("rerank-burst")
            try:
                c = await self._connect()
            except (PalateError, OSError, asyncio.TimeoutError) as e:
                t.add_error(getattr(e, "code", "unavailable"), str(e))
            else:
                jobs, sent = [], []
                for _ in range(k.burst):
                    prompt, cands = wl.rerank(2, 2)
                    params = {
                        "prompt": prompt,
                        "candidates": cands,
                        "timeout_ms": k.burst_timeout_ms,
                    }
                    sent.append(cands)
                    jobs.append(self._request(c, "rerank", params, k.client_timeout))
                results = await asyncio.gather(*jobs)
                for cands, (outcome, res, lat) in zip(sent, results, strict=True):
                    self._record(t, "rerank", outcome, res, lat, cands)
                await c.close()
            # Sleep until the next burst, waking early when the run ends.
            end = time.monotonic() + k.burst_every
            while self.running() and time.monotonic() < end:
                await asyncio.sleep(0.5)

    async def main(self, roles: list[tuple[int, str]], with_bursts: bool) -> None:
        tasks = [self.client(cid, role) for cid, role in roles]
        if with_bursts:
            tasks.append(self.bursts())
        await asyncio.gather(*tasks)


def worker_proc(
    k: Knobs,
    rows: list[dict[str, str]],
    run: str,
    wid: int,
    roles: list[tuple[int, str]],
    with_bursts: bool,
    ready: Any,
    go: Any,
    abort: Any,
    out: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
    w = Worker(k, rows, run, wid)
    w.abort = abort
    ready.release()
    go.wait()
    w.start = time.time()
    w.deadline = time.monotonic() + k.duration
    asyncio.run(w.main(roles, with_bursts))
    out.put(
        {
            "wid": wid,
            "start": w.start,
            "end": time.time(),
            "cpu_s": time.process_time(),
            "acked": w.acked,
            "tallies": {
                m: {
                    "ok": t.ok,
                    "ok_at": t.ok_at,
                    "busy": t.busy,
                    "deadline": t.deadline,
                    "codes": dict(t.codes),
                    "unexpected": t.unexpected,
                    "items": t.items,
                }
                for m, t in w.tallies.items()
            },
        }
    )


def read_store_ids(home: Path) -> Counter[str]:
    """Every stored event id, read through the store API (the daemon must not be running)."""
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    paths = resolve(home)
    store = Store(paths.db_file, KeyManager(paths, "file").unwrap())
    try:
        return Counter(ev["id"] for ev in store.iter_events())
    finally:
        store.close()


# --- the daemon's vital signs -------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS and VmHWM in KiB, threads, open fds; None once the process is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(rest.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return out


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) in value per minute."""
    if len(points) < 3:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


# --- reporting ----------------------------------------------------------------------------


def ms(xs: list[float], q: float) -> float | None:
    v = percentile(sorted(xs), q)
    return None if v is None else round(1000 * v, 1)


def method_summary(parts: list[dict[str, Any]], method: str, seconds: float) -> dict[str, Any]:
    ok: list[float] = []
    busy: list[float] = []
    deadline: list[float] = []
    codes: Counter[str] = Counter()
    samples: list[str] = []
    items = 0
    for p in parts:
        t = p["tallies"].get(method)
        if not t:
            continue
        ok += t["ok"]
        busy += t["busy"]
        deadline += t["deadline"]
        codes.update(t["codes"])
        samples += t["unexpected"]
        items += t["items"]
    unexpected = sum(codes.values())
    requests = len(ok) + len(busy) + len(deadline) + unexpected
    out: dict[str, Any] = {
        "requests": requests,
        "ok": len(ok),
        "per_s": round(len(ok) / seconds, 2) if seconds else None,
        "p50_ms": ms(ok, 0.50),
        "p95_ms": ms(ok, 0.95),
        "p99_ms": ms(ok, 0.99),
        "max_ms": ms(ok, 1.0),
        "busy": len(busy),
        "busy_p50_ms": ms(busy, 0.50),
        "busy_p99_ms": ms(busy, 0.99),
        "busy_max_ms": ms(busy, 1.0),
        "deadline": len(deadline),
        "deadline_p50_ms": ms(deadline, 0.50),
        "deadline_max_ms": ms(deadline, 1.0),
        "errors_by_code": {
            **({"busy": len(busy)} if busy else {}),
            **({"busy(deadline)": len(deadline)} if deadline else {}),
            **dict(codes),
        },
        "unexpected": unexpected,
        "unexpected_samples": samples[:5],
    }
    if method.startswith("ingest"):
        out["events_acked"] = items
        out["events_per_s"] = round(items / seconds, 1) if seconds else None
    elif method.startswith("rerank"):
        out["candidates_ranked"] = items
    return out


def windows(
    parts: list[dict[str, Any]], method: str, t0: float, window: float, end: float
) -> dict[str, Any]:
    """The method's ok latency in the first and the last window: does it degrade?"""
    first: list[float] = []
    last: list[float] = []
    for p in parts:
        t = p["tallies"].get(method)
        if not t:
            continue
        for lat, at in zip(t["ok"], t["ok_at"], strict=True):
            if at - t0 <= window:
                first.append(lat)
            if at - t0 >= end - window:
                last.append(lat)
    return {
        "first_p50_ms": ms(first, 0.5),
        "first_p99_ms": ms(first, 0.99),
        "last_p50_ms": ms(last, 0.5),
        "last_p99_ms": ms(last, 0.99),
        "first_ok": len(first),
        "last_ok": len(last),
    }


def longest_gap(
    parts: list[dict[str, Any]], methods: tuple[str, ...], t0: float, t1: float
) -> float:
    """The longest time (s) within the run without one successful answer to ``methods``."""
    at = sorted(x for p in parts for m in methods for x in p["tallies"].get(m, {}).get("ok_at", []))
    if not at:
        return round(t1 - t0, 2)
    gaps = [at[0] - t0, t1 - at[-1]] + [b - a for a, b in itertools.pairwise(at)]
    return round(max(gaps), 3)


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_summary(rep: dict[str, Any]) -> None:
    cfg = rep["config"]
    print(
        f"\nPalate load/soak: {cfg['clients']} clients ({cfg['rerank_clients']} rerank, "
        f"{cfg['ingest_clients']} ingest) for {cfg['duration_s']:g} s "
        f"(+{rep['run']['drain_s']:.1f} s drain); think {cfg['think_ms']:g} ms; "
        f"bursts of {cfg['burst']} every {cfg['burst_every_s']:g} s"
    )
    g = cfg.get("git") or {}
    if g:
        print(f"code: HEAD {g['head']} + {len(g['daemon_changes'])} uncommitted daemon files")
    head = (
        f"{'method':<14}{'requests':>9}{'ok':>8}{'ok/s':>8}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'busy':>6}{'busy p99':>9}{'deadln':>7}{'unexp':>6}"
    )
    print(head)
    print("-" * len(head))
    for m, s in rep["methods"].items():
        print(
            f"{m:<14}{s['requests']:>9}{s['ok']:>8}{fmt(s['per_s'], '.1f'):>8}"
            f"{fmt(s['p50_ms']):>9}{fmt(s['p95_ms']):>9}{fmt(s['p99_ms']):>9}"
            f"{fmt(s['max_ms']):>9}{s['busy']:>6}{fmt(s['busy_p99_ms']):>9}"
            f"{s['deadline']:>7}{s['unexpected']:>6}"
        )
    for m, s in rep["methods"].items():
        if s["errors_by_code"]:
            print(f"  {m} errors by code: {s['errors_by_code']}")
        for msg in s["unexpected_samples"]:
            print(f"  {m} UNEXPECTED: {msg}")
    b = rep["busy"]
    print(
        f"\nbusy replies: {b['count']} (p50 {fmt(b['p50_ms'])} ms, p99 {fmt(b['p99_ms'])} ms, "
        f"max {fmt(b['max_ms'])} ms); deadline replies: {rep['deadline']['count']}"
    )
    print(f"unexpected errors: {rep['unexpected']['count']} {rep['unexpected']['by_code'] or ''}")
    ev = rep["events"]
    print(
        f"events: {ev['acked']} acknowledged ({ev['events_per_s']}/s), {ev['read_back']} read back "
        f"via {ev['audit_via']} "
        f"(status total {ev['stored_total']}); lost {ev['lost']}, duplicated in store "
        f"{ev['duplicates_in_store']}, duplicate acks {ev['duplicate_acks']}, "
        f"stored but never acked {ev['stored_unacked']}"
    )
    for w in ("ingest", "ingest_batch", "rerank"):
        x = rep["degradation"].get(w)
        if x and x["first_ok"] and x["last_ok"]:
            print(
                f"  {w}: first {rep['rss']['window_s']:g} s p50/p99 {fmt(x['first_p50_ms'])}/"
                f"{fmt(x['first_p99_ms'])} ms -> last p50/p99 {fmt(x['last_p50_ms'])}/"
                f"{fmt(x['last_p99_ms'])} ms"
            )
    print(f"  longest stretch without an ingest ack: {rep['run']['longest_ingest_gap_s']} s")
    sc = rep["scorer"]
    if sc:
        print(
            f"  scorer: {sc['batches']} batches, {sc['candidates_scored']} candidates scored, "
            f"{sc['candidates_answered_ok']} returned in ok answers, "
            f"{sc['candidates_wasted']} computed for requests already answered busy/deadline"
        )
    r = rep["rss"]
    print(
        f"\ndaemon RSS ({len(r['samples'])} samples every {r['every_s']:g} s): "
        f"first {r['window_s']:g} s median {fmt(r['first_median_mb'])} MB, last "
        f"{r['window_s']:g} s median {fmt(r['last_median_mb'])} MB "
        f"(delta {fmt(r['delta_mb'], '+.1f')} MB); slope after the first window "
        f"{fmt(r['slope_steady_mb_per_min'], '+.2f')} MB/min "
        f"(whole run {fmt(r['slope_whole_mb_per_min'], '+.2f')}); peak sampled "
        f"{fmt(r['peak_sampled_mb'])} MB, kernel VmHWM {fmt(r['peak_hwm_mb'])} MB"
    )
    print(f"  series (MB, every ~{r['series_every_s']:g} s): {r['series_mb']}")
    d = rep["daemon"]
    print(
        f"  threads {d['threads_first']} -> {d['threads_last']} "
        f"({d['threads_after_clients_closed']} once the clients closed), "
        f"fds {d['fds_first']} -> {d['fds_last']} ({d['fds_after_clients_closed']})"
    )
    print(
        f"  daemon CPU {fmt(d['cpu_s'])} s (client processes {fmt(d['clients_cpu_s'])} s); "
        f"alive at end: {d['alive_at_end']}; exit code on SIGTERM: {d['exit_code']} "
        f"after {d['stop_s']} s; log error lines: {d['log_error_lines']}"
    )
    ld = rep["load"]
    print(
        f"load average: start {ld['start']}, end {ld['end']}; 1-min during the run mean "
        f"{fmt(ld['mean_1min'], '.2f')}, max {fmt(ld['max_1min'], '.2f')} on {ld['cpus']} CPUs"
    )
    if d.get("log_tail"):
        print("daemon log (tail):\n    " + "\n    ".join(d["log_tail"]))
    v = rep["verdict"]
    print("\nPASS" if v["ok"] else "\nFAIL: " + "; ".join(v["failures"]))


# --- main ---------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--clients", metavar="N", type=int, default=50, help="concurrent clients (default 50)"
    )
    ap.add_argument(
        "--duration", metavar="S", type=float, default=300.0, help="seconds of load (default 300)"
    )
    ap.add_argument(
        "--rerank-share",
        metavar="F",
        type=float,
        default=0.2,
        help="fraction of the clients that send rerank; the rest ingest (default 0.2)",
    )
    ap.add_argument(
        "--batch-share",
        metavar="F",
        type=float,
        default=0.25,
        help="fraction of an ingest client's requests that are ingest_batch (default 0.25)",
    )
    ap.add_argument(
        "--max-batch",
        metavar="N",
        type=int,
        default=20,
        help="ingest_batch sizes are 2..N (default 20)",
    )
    ap.add_argument(
        "--think-ms",
        metavar="MS",
        type=float,
        default=250.0,
        help="mean (exponential) pause of each client between requests (default 250)",
    )
    ap.add_argument(
        "--rerank-timeout-ms",
        metavar="MS",
        type=int,
        default=None,
        help="timeout_ms sent with each rerank (default: none, the daemon's 30 s)",
    )
    ap.add_argument(
        "--burst",
        metavar="N",
        type=int,
        default=96,
        help="reranks pipelined at once on one extra connection per burst; 0: no bursts "
        "(default 96, over the 64 in-flight and 64 queued limits)",
    )
    ap.add_argument(
        "--burst-every",
        metavar="S",
        type=float,
        default=60.0,
        help="seconds between bursts (default 60)",
    )
    ap.add_argument(
        "--burst-timeout-ms",
        metavar="MS",
        type=int,
        default=1000,
        help="timeout_ms of burst reranks (default 1000)",
    )
    ap.add_argument(
        "--client-timeout",
        metavar="S",
        type=float,
        default=120.0,
        help="a request with no answer after this many seconds counts as a hang (default 120)",
    )
    ap.add_argument(
        "--rss-every",
        metavar="S",
        type=float,
        default=2.0,
        help="seconds between RSS samples (default 2)",
    )
    ap.add_argument(
        "--procs",
        metavar="N",
        type=int,
        default=0,
        help="client processes (asyncio each); default 1 per 25 clients",
    )
    ap.add_argument(
        "--dir", metavar="DIR", type=Path, default=None, help="where the temp home goes (/tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp home (daemon log, db)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write all figures as JSON")
    ap.add_argument("--seed", metavar="N", type=int, default=0, help="workload seed")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.rerank_share <= 1:
        ap.error("--clients >= 1, --duration > 0 and 0 <= --rerank-share <= 1 are required")
    if args.max_batch < 2 or not 0 <= args.batch_share <= 1:
        ap.error("--max-batch >= 2 and 0 <= --batch-share <= 1 are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    rows = load_rows()
    base = Path(tempfile.mkdtemp(prefix="pl-", dir=args.dir or "/tmp"))
    home = base / "home"
    home.mkdir()
    daemon = Daemon(home)
    procs: list[Any] = []
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        return run(args, rows, base, home, daemon, procs, log)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
        daemon.stop()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def deploy(home: Path, log: Any) -> dict[str, Any]:
    """Build and deploy the model in a spawned child (so this process never loads MLX)."""
    log(f"deploying a fresh LoRA reward model on {BASE_MODEL} in {home} ...")
    sp = mp.get_context("spawn")
    dq = sp.Queue()
    dp = sp.Process(target=deploy_model, args=(str(home), dq))
    dp.start()
    while True:
        try:
            deployed: dict[str, Any] = dq.get(timeout=1)
            break
        except queue.Empty:
            if not dp.is_alive():
                raise RuntimeError(f"building the model failed (exit {dp.exitcode})") from None
    dp.join(30)
    log(
        f"  version {deployed['version']}, artifact {deployed['artifact_bytes'] / 1e6:.1f} MB, "
        f"{deployed['seconds']:.1f} s"
    )
    return deployed


def monitor(
    daemon: Daemon,
    procs: list[Any],
    out: Any,
    abort: Any,
    args: argparse.Namespace,
    t_go: float,
    log: Any,
) -> tuple[list[dict[str, Any]], float | None]:
    """Sample the daemon until every client process has reported: (samples, died_at)."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    samples: list[dict[str, Any]] = []
    died_at: float | None = None
    start = time.monotonic()
    end_at = start + args.duration
    next_sample, next_note = start, start + 30
    while any(p.is_alive() for p in procs) and out.qsize() < len(procs):
        now = time.monotonic()
        if now >= next_sample:
            st = proc_status(pid)
            if st is not None and daemon.proc.poll() is None:
                samples.append(
                    {"t": round(time.time() - t_go, 2), **st, "load1": os.getloadavg()[0]}
                )
            elif died_at is None:
                died_at = round(time.time() - t_go, 1)
                log(f"THE DAEMON DIED at {died_at:.1f} s (exit {daemon.proc.poll()})")
                abort.set()
            next_sample += args.rss_every
        if now >= next_note and now < end_at and samples:
            log(
                f"  {samples[-1]['t']:.0f} s: RSS {samples[-1]['VmRSS'] / 1024:.0f} MB, "
                f"load {samples[-1]['load1']:.2f}"
            )
            next_note += 30
        if now > end_at + args.client_timeout + 120:
            raise RuntimeError("client processes did not finish: see the daemon log")
        time.sleep(0.2)
    return samples, died_at


def audit(
    daemon: Daemon, home: Path, base: Path, acked: list[tuple[str, int]], log: Any
) -> dict[str, Any]:
    """Read every stored id back (export while the daemon lives, else the store itself) and
    compare with the acknowledged ones. Stops the daemon."""
    assert daemon.proc is not None
    alive = daemon.proc.poll() is None
    acked_ids = Counter(i for i, _ in acked)
    seqs = Counter(s for _, s in acked)
    stored: Counter[str] = Counter()
    stored_total: int | None = None
    read_back: int | None = None
    via = "export"
    error = ""
    if alive:
        try:
            with Client(socket_path=daemon.socket, timeout=900) as c:
                stored_total = int(c.status()["events"]["total"])
                path = base / "export.jsonl"
                t0 = time.perf_counter()
                read_back = c.export(path)
                log(f"exported {read_back} events in {time.perf_counter() - t0:.1f} s")
            with path.open(encoding="utf-8") as f:
                for line in f:
                    stored[json.loads(line)["id"]] += 1
            path.unlink()
        except (PalateError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
    t0 = time.monotonic()
    daemon.stop()  # SIGTERM; SIGKILL after 15 s
    stop_s = round(time.monotonic() - t0, 1)
    if not alive:
        # Post mortem: acknowledged events must survive even a crash; read the store itself.
        via = "store (post mortem)"
        try:
            stored = read_store_ids(home)
            stored_total = read_back = sum(stored.values())
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
    lost = [i for i in acked_ids if stored[i] == 0] if not error else []
    n = sum(acked_ids.values())
    return {
        "acked": n,
        "distinct_acked": len(acked_ids),
        "duplicate_acks": n - len(acked_ids),
        "duplicate_seqs": sum(v - 1 for v in seqs.values() if v > 1),
        "stored_total": stored_total,
        "read_back": read_back,
        "lost": len(lost),
        "lost_sample": lost[:10],
        "duplicates_in_store": sum(1 for i in acked_ids if stored[i] > 1),
        "stored_unacked": sum(1 for i in stored if i not in acked_ids),
        "audit_via": via,
        "audit_error": error,
        "stop_s": stop_s,
    }


def git_state() -> dict[str, Any]:
    """The commit and the uncommitted daemon files: what code the figures belong to."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "daemon"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"head": head, "daemon_changes": [ln.strip() for ln in dirty]}


def scorer_summary(
    before: dict[str, Any], after: dict[str, Any], msum: dict[str, Any]
) -> dict[str, Any]:
    """Candidates the scorer computed vs candidates that reached a client in an ok answer:
    the difference was computed for requests already answered ``busy`` (deadline)."""
    if not before or not after:
        return {}
    scored = after["scored"] - before["scored"]
    ok = sum(s.get("candidates_ranked", 0) for m, s in msum.items() if m.startswith("rerank"))
    return {
        "batches": after["batches"] - before["batches"],
        "candidates_scored": scored,
        "candidates_answered_ok": ok,
        "candidates_wasted": scored - ok,
    }


def rss_summary(samples: list[dict[str, Any]], seconds: float, every: float) -> dict[str, Any]:
    """First-window vs last-window median, slope after the first window, peaks."""
    window = min(60.0, seconds / 3)
    rss = [(s["t"], s["VmRSS"] / 1024) for s in samples]
    first = [v for t, v in rss if t <= window]
    last = [v for t, v in rss if seconds - window <= t <= seconds]
    first_med = statistics.median(first) if first else None
    last_med = statistics.median(last) if last else None
    stride = max(1, round(10 / every))
    return {
        "every_s": every,
        "window_s": round(window, 1),
        "first_median_mb": _r1(first_med),
        "last_median_mb": _r1(last_med),
        "delta_mb": _r1(last_med - first_med)
        if first_med is not None and last_med is not None
        else None,
        "slope_steady_mb_per_min": _r2(slope_per_min([p for p in rss if p[0] >= window])),
        "slope_whole_mb_per_min": _r2(slope_per_min(rss)),
        "peak_sampled_mb": _r1(max((v for _, v in rss), default=None)),
        "peak_hwm_mb": _r1(samples[-1]["VmHWM"] / 1024) if samples else None,
        "series_every_s": every * stride,
        "series_mb": [round(v) for _, v in rss[::stride]],
        "samples": [[t, round(v, 1)] for t, v in rss],
    }


def run(
    args: argparse.Namespace,
    rows: list[dict[str, str]],
    base: Path,
    home: Path,
    daemon: Daemon,
    procs: list[Any],
    log: Any,
) -> int:
    load_start = os.getloadavg()
    # No nightly training run may start in the middle of the measurement.
    (home / "config.toml").write_text("[schedule]\nenabled = false\n", encoding="utf-8")
    deployed = deploy(home, log)

    daemon.start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    log(f"daemon pid {pid} on {daemon.socket}; filesystem {filesystem_of(base)}")
    # Load the model now, so the run measures serving, not the one-off load.
    t0 = time.perf_counter()
    with Client(socket_path=daemon.socket, timeout=600) as c:
        limits = c.hello("palate-load")["limits"]
        c.rerank(*Workload(rows, "warm", 0).rerank(8, 8), timeout_ms=600_000)
        scorer0 = c.status().get("scorer") or {}
    warmup_s = time.perf_counter() - t0
    log(f"model loaded and first rerank in {warmup_s:.1f} s")

    n_rerank = round(args.clients * args.rerank_share)
    roles = [(i, "rerank" if i < n_rerank else "ingest") for i in range(args.clients)]
    random.Random(args.seed).shuffle(roles)
    n_procs = min(args.procs or max(1, math.ceil(args.clients / 25)), args.clients)
    knobs = Knobs(
        socket=daemon.socket,
        duration=args.duration,
        think_s=args.think_ms / 1000,
        batch_share=args.batch_share,
        max_batch=args.max_batch,
        rerank_timeout_ms=args.rerank_timeout_ms,
        client_timeout=args.client_timeout,
        burst=args.burst,
        burst_every=args.burst_every,
        burst_timeout_ms=args.burst_timeout_ms,
        version=deployed["version"],
        seed=args.seed,
    )
    run_tag = f"load{args.seed}-{secrets.token_hex(3)}"
    ctx = mp.get_context("fork")
    ready, go, abort, out = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue()
    for w in range(n_procs):
        bursts = w == 0 and args.burst > 0
        wargs = (knobs, rows, run_tag, w, roles[w::n_procs], bursts, ready, go, abort, out)
        procs.append(ctx.Process(target=worker_proc, args=wargs, daemon=True))
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=60):
            raise RuntimeError("a client process did not start within 60 s")

    log(
        f"{args.clients} clients ({n_rerank} rerank) in {n_procs} processes for {args.duration:g} s"
    )
    cpu0 = daemon.cpu_seconds()
    t_go = time.time()
    go.set()
    samples, died_at = monitor(daemon, procs, out, abort, args, t_go, log)
    try:
        parts = [out.get(timeout=60) for _ in procs]
    except queue.Empty:
        raise RuntimeError("a client process died without reporting") from None
    for p in procs:
        p.join(10)
    t_end = max(p["end"] for p in parts)
    cpu1 = daemon.cpu_seconds()
    load_end = os.getloadavg()
    alive_at_end = daemon.proc.poll() is None
    time.sleep(1.0)  # every client has closed: the daemon's fds should be back to idle
    after = proc_status(pid) or {}
    scorer1: dict[str, Any] = {}
    if alive_at_end:
        with contextlib.suppress(PalateError), Client(socket_path=daemon.socket) as c:
            scorer1 = c.status().get("scorer") or {}
    events = audit(daemon, home, base, [a for p in parts for a in p["acked"]], log)
    exit_code = daemon.proc.returncode
    log_text = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
    log_lines = log_text.splitlines()
    log_errors = [ln for ln in log_lines if "Traceback" in ln or " ERROR " in ln]

    # --- figures -------------------------------------------------------------------------
    seconds = args.duration
    methods = [
        m
        for m in ("ingest", "ingest_batch", "rerank", "rerank-burst", "connect")
        if any(m in p["tallies"] for p in parts)
    ]
    msum = {m: method_summary(parts, m, seconds) for m in methods}
    all_busy = [x for p in parts for t in p["tallies"].values() for x in t["busy"]]
    all_deadline = [x for p in parts for t in p["tallies"].values() for x in t["deadline"]]
    by_code: Counter[str] = Counter()
    for s in msum.values():
        by_code.update(
            {k: v for k, v in s["errors_by_code"].items() if k not in ("busy", "busy(deadline)")}
        )
    events["events_per_s"] = round(events["acked"] / seconds, 1)
    rss = rss_summary(samples, seconds, args.rss_every)
    loads = [s["load1"] for s in samples]
    rep: dict[str, Any] = {
        "config": {
            "clients": args.clients,
            "rerank_clients": n_rerank,
            "ingest_clients": args.clients - n_rerank,
            "procs": n_procs,
            "duration_s": seconds,
            "think_ms": args.think_ms,
            "batch_share": args.batch_share,
            "max_batch": args.max_batch,
            "rerank_timeout_ms": args.rerank_timeout_ms,
            "burst": args.burst,
            "burst_every_s": args.burst_every,
            "burst_timeout_ms": args.burst_timeout_ms,
            "client_timeout_s": args.client_timeout,
            "seed": args.seed,
            "base_model": BASE_MODEL,
            "model_version": deployed["version"],
            "data": str(DATA),
            "daemon_limits": limits,
            "filesystem": filesystem_of(base),
            "git": git_state(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "run": {
            "model_build_s": round(deployed["seconds"], 1),
            "warmup_s": round(warmup_s, 1),
            "drain_s": round(max(0.0, t_end - t_go - seconds), 1),
            "longest_ingest_gap_s": longest_gap(
                parts, ("ingest", "ingest_batch"), t_go, t_go + seconds
            ),
        },
        "methods": msum,
        "busy": {
            "count": len(all_busy),
            "p50_ms": ms(all_busy, 0.5),
            "p99_ms": ms(all_busy, 0.99),
            "max_ms": ms(all_busy, 1.0),
        },
        "deadline": {"count": len(all_deadline), "p50_ms": ms(all_deadline, 0.5)},
        "unexpected": {"count": sum(by_code.values()), "by_code": dict(by_code)},
        "events": events,
        "degradation": {
            m: windows(parts, m, t_go, rss["window_s"], seconds)
            for m in ("ingest", "ingest_batch", "rerank")
            if m in methods
        },
        "rss": rss,
        "scorer": scorer_summary(scorer0, scorer1, msum),
        "daemon": {
            "pid": pid,
            "alive_at_end": alive_at_end,
            "died_at_s": died_at,
            "exit_code": exit_code,
            "cpu_s": round(cpu1 - cpu0, 1) if cpu0 is not None and cpu1 is not None else None,
            "threads_first": samples[0]["Threads"] if samples else None,
            "threads_last": samples[-1]["Threads"] if samples else None,
            "fds_first": samples[0]["fds"] if samples else None,
            "fds_last": samples[-1]["fds"] if samples else None,
            "fds_after_clients_closed": after.get("fds"),
            "threads_after_clients_closed": after.get("Threads"),
            "stop_s": events.pop("stop_s"),
            "clients_cpu_s": round(sum(p["cpu_s"] for p in parts), 1),
            "log_error_lines": len(log_errors),
            "log_error_sample": log_errors[:5],
        },
        "load": {
            "cpus": os.cpu_count(),
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in load_end],
            "mean_1min": _r2(statistics.fmean(loads)) if loads else None,
            "max_1min": _r2(max(loads)) if loads else None,
        },
    }
    failures = []
    if events["lost"]:
        failures.append(f"{events['lost']} acknowledged events lost")
    if events["duplicates_in_store"] or events["duplicate_acks"] or events["duplicate_seqs"]:
        failures.append("duplicates (store, acks or seqs)")
    if events["audit_error"]:
        failures.append(f"the audit failed: {events['audit_error']}")
    if rep["unexpected"]["count"]:
        failures.append(f"{rep['unexpected']['count']} unexpected errors {dict(by_code)}")
    if not alive_at_end or died_at is not None:
        failures.append("the daemon died during the run")
    elif exit_code == -signal.SIGKILL:
        failures.append(f"the daemon did not exit within {rep['daemon']['stop_s']} s of SIGTERM")
    elif exit_code != 0:
        failures.append(f"the daemon exited {exit_code} on SIGTERM")
    rep["verdict"] = {"ok": not failures, "failures": failures}
    if failures or log_errors:
        rep["daemon"]["log_tail"] = log_lines[-40:]

    print_summary(rep)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0 if not failures else 1


def _r1(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _r2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


if __name__ == "__main__":
    sys.exit(main())
