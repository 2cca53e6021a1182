"""Fault tests of the training child and the daemon around it, with real processes.

A tiny random GGUF base model (tests/tiny_gguf.py) makes a real training run take seconds.
The child is killed with SIGKILL mid-run: the registry must be exactly as before, the
deployed model must keep serving, and the next run must succeed. SIGTERM to the daemon
while feedback pours in (or while a run trains) must exit 0 within launchd's budget with
every acknowledged event still stored.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProc, daemon_env, pid_alive, wait_for
from palate.errors import PalateError

pytestmark = pytest.mark.slow

#: launchd sends SIGKILL 20 s after SIGTERM (ExitTimeOut); systemd's TimeoutStopSec=20.
STOP_BUDGET_S = 20.0
PROMPTS = ["how do I sort a list", "explain recursion", "what is a monad", "fix this bug"]


def pair(i: int, tag: str = "e") -> dict[str, Any]:
    return {
        "kind": "pair",
        "id": f"{tag}{i}",
        "source": "test",
        "ts": time.time(),
        "prompt": f"{PROMPTS[i % 4]} ({i})",
        "chosen": "a clear, correct and helpful answer " * (1 + i % 3),
        "rejected": "no " * (1 + i % 5),
    }


def write_config(home: Path, gguf: Path, epochs: int) -> None:
    (home / "config.toml").write_text(
        f'base_model = "{gguf}"\n'
        f"[train]\nepochs = {epochs}\nmax_tokens = 64\nlora_layers = 1\nstreams = 1\n"
        "eval_every = 1000\npatience = 1000\n"
    )


@pytest.fixture
def tiny_home(home: Path) -> tuple[Path, Path]:
    tiny_gguf = pytest.importorskip("tiny_gguf")
    args = tiny_gguf.tiny_args()
    gguf = tiny_gguf.write_gguf(home / "tiny.gguf", tiny_gguf.tiny_model(args), args)
    write_config(home, gguf, epochs=2)
    return home, gguf


def registry(d: DaemonProc) -> tuple[list[tuple[int, str]], int | None]:
    with d.client() as c:
        m = c.call("models", {})
    return [(x["version"], x["state"]) for x in m["models"]], m["deployed"]


def score(d: DaemonProc) -> dict[str, Any]:
    """Score with the deployed model through the daemon's scorer."""
    with d.client() as c:
        r: dict[str, Any] = c.score("explain recursion", ["a helpful answer", "no"])
    return r


def review(d: DaemonProc) -> list[dict[str, Any]]:
    with d.client() as c:
        items: list[dict[str, Any]] = c.review_list()["items"]
    return items


def training(d: DaemonProc) -> dict[str, Any]:
    with d.client() as c:
        t: dict[str, Any] = c.status()["training"]
    return t


def test_sigkill_mid_run_leaves_registry_consistent_and_serving(
    tiny_home: tuple[Path, Path],
) -> None:
    home, gguf = tiny_home
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        c.ingest_batch([pair(i) for i in range(80)])
        first = c.train(wait=True)["job"]
        assert first["outcome"] == "done", first
        v1 = first["result"]["version"]
        # queued before any model could score it ...
        early = c.call("review_add", {"prompt": "say hi", "candidates": ["hi there", "no"]})
        assert early["queued"] and c.review_list()["items"][0]["info"] is None
        c.call("deploy", {"version": v1, "override": True, "reason": "test baseline"})
        # The run trained and judged an ensemble (issue 16): its own metrics are registered.
        ens = c.call("models", {"version": v1})["model"]["meta"]["metrics"]["ensemble"]
        assert ens["heldout"]["members"] == 5 and len(ens["heldout"]["coverage_accuracy"]) == 10
        assert "sycophancy" in ens["probes"]["by_category"]
    before = score(d)
    assert before["version"] == v1
    assert before["members"] == 5 and len(before["uncertainty"]) == 2
    # ... and re-scored by the deployed ensemble in the background after the deploy
    rescored = wait_for(
        lambda: [it for it in review(d) if it["id"] == early["id"] and it["version"] == v1],
        60,
        "the queue was not re-scored after the deploy",
    )
    assert rescored[0]["info"] is not None and rescored[0]["members"] == 5
    with d.client() as c:  # the review queue, fed by a real ensemble's rerank
        cands = ["a helpful answer", "no", "maybe later"]
        r = c.rerank("explain recursion", cands, remember=True, lower_bound=1.0)
        assert r["ranked_by"] == "lower_bound" and len(r["lower_bounds"]) == 3
        assert r["review_id"] and r["members"] == 5 and min(r["uncertainty"]) > 0
        (item,) = [it for it in c.review_list()["items"] if it["id"] == r["review_id"]]
        assert item["version"] == v1 and item["info"] >= 0
        assert {item["a"], item["b"]} <= set(cands) and item["members"] == 5
        assert c.review_answer(item["id"], "b")["event"]["id"]
    cand_file = home / "cands.txt"
    cand_file.write_text("a short answer\nanother answer entirely\n")
    args = ["--candidates", str(cand_file), "--lower-bound", "1", "--remember"]
    out = d.cli("rerank", "explain lists", *args)
    assert out.returncode == 0, out.stderr
    assert "±" in out.stdout and "queued for review as q-" in out.stdout
    models_before, deployed_before = registry(d)

    # a long run this time: the child reads config.toml when it starts
    write_config(home, gguf, epochs=400)
    with d.client() as c:
        job = c.train()["job"]
    running = wait_for(
        lambda: (t := training(d)["current"]) and t.get("phase") == "train" and t,
        60,
        "the child never reported the train phase",
    )
    assert running["id"] == job["id"]
    os.kill(running["pid"], signal.SIGKILL)
    last = wait_for(
        lambda: (t := training(d)["last"]) and t["id"] == job["id"] and t,
        30,
        "the daemon did not notice the kill",
    )
    assert last["outcome"] == "killed"
    assert training(d)["current"] is None

    assert registry(d) == (models_before, deployed_before)  # no half-registered version
    after = score(d)  # the deployed model still serves, with the same scores
    assert after["version"] == v1 and after["scores"] == pytest.approx(before["scores"])

    write_config(home, gguf, epochs=2)
    with d.client() as c:
        nxt = c.train(wait=True)["job"]
    assert nxt["outcome"] == "done", nxt
    models_after, deployed_after = registry(d)
    assert len(models_after) == len(models_before) + 1
    assert models_after[0][0] == nxt["result"]["version"] > v1
    assert deployed_after in (v1, nxt["result"]["version"])
    assert d.terminate() == 0


def test_sigterm_during_a_run_exits_zero_and_stops_the_child(
    tiny_home: tuple[Path, Path],
) -> None:
    home, gguf = tiny_home
    write_config(home, gguf, epochs=400)
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        c.ingest_batch([pair(i) for i in range(80)])
        c.train()
    child = wait_for(
        lambda: (t := training(d)["current"]) and t.get("pid") and t,
        30,
        "no training child",
    )
    assert d.terminate(timeout=STOP_BUDGET_S) == 0
    wait_for(lambda: not pid_alive(child["pid"]), 5, "the training child outlived the daemon")
    d2 = DaemonProc(home, daemon_env(home)).start()
    assert registry(d2) == ([], None)
    assert d2.terminate() == 0


def test_sigterm_during_ingest_loses_nothing_acknowledged(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    acked: list[str] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def pour(worker: int) -> None:
        n = 0
        try:
            with d.client() as c:
                while True:
                    batch = [pair(n + k, f"w{worker}-") for k in range(25)]
                    c.ingest_batch(batch)
                    acked.extend(e["id"] for e in batch)  # only after the ack
                    n += 25
                    started.set()
        except (PalateError, OSError) as e:  # the daemon went away: expected
            errors.append(e)

    threads = [threading.Thread(target=pour, args=(w,), daemon=True) for w in range(3)]
    for t in threads:
        t.start()
    assert started.wait(30)
    wait_for(lambda: len(acked) >= 300, 30, "ingest too slow")
    assert d.terminate(timeout=STOP_BUDGET_S) == 0
    for t in threads:
        t.join(10)
    assert len(errors) == 3  # every client saw the daemon go, none hung
    acked_ids = list(acked)

    d2 = DaemonProc(home, daemon_env(home)).start()
    with d2.client() as c:
        for i in range(0, len(acked_ids), 1000):
            chunk = acked_ids[i : i + 1000]
            # resending is harmless: every acknowledged id must come back as a duplicate
            events = [dict(pair(int(x.split("-")[1]), x.split("-")[0] + "-"), id=x) for x in chunk]
            r = c.ingest_batch(events)
            assert r["accepted"] == 0 and r["duplicates"] == len(chunk)
    assert len(set(acked_ids)) == len(acked_ids)
    assert d2.terminate() == 0


def test_memory_ceiling_stops_the_child(tiny_home: tuple[Path, Path]) -> None:
    home, _ = tiny_home
    with (home / "config.toml").open("a") as fh:
        fh.write("[schedule]\nmemory_gb = 0.05\n")  # far below what importing MLX needs
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        c.ingest_batch([pair(i) for i in range(40)])
        job = c.train(wait=True)["job"]
        assert job["outcome"] == "killed", job
        assert "memory ceiling" in job["error"]
        assert c.call("models")["models"] == []  # nothing half-registered
    assert d.terminate() == 0
