"""kill -9 of the training child, of the daemon while a run trains, and of the daemon right
around the registry's deploy/rollback transaction.

A tiny random GGUF base (tests/tiny_gguf.py) trains in about three seconds; a permissive
gate deploys every candidate, so the end of a run always holds the two registry
transactions (register, then deploy) that a late kill can cut. One module fixture trains
v1 and v2 on different feedback (so their scores differ) and records the scores each
serves; every test works on a copy of that home.

Afterwards the registry must hold exactly one deployed version, the one from before unless
the interrupted operation had been acknowledged, and the daemon must serve that version
with exactly the scores recorded for it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProc, daemon_env, pid_alive, wait_for
from palate.errors import PalateError

from .helpers import read_store, seeded

pytestmark = pytest.mark.slow

PROBE = ("explain recursion", ["a helpful answer brilliant", "no"])
PERMISSIVE_GATE = (
    "[gate]\nmin_heldout_pairs = 0\naccuracy_floor = 0.0\nrequire_above_chance = false\n"
    "baseline_margin = -1.0\noverall_regression_tolerance = 1.0\n"
    "slice_regression_tolerance = 1.0\nmax_jump = 1.0\nsuspicious_accuracy = 1.01\n"
    "max_length_gap = 1.0\nmax_length_spearman = 1.0\nprobe_floor = 0.0\nprobe_max_drop = 1.0\n"
    "logloss_regression_tolerance = 100.0\nrating_regression_tolerance = 1.0\n"
)
KILLS_AROUND_DEPLOY = 5
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def pairs(n: int, tag: str, seed: int) -> list[dict[str, Any]]:
    r = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(k))

    return [
        {
            "kind": "pair",
            "source": "faults",
            "prompt": f"{tag} question {i}: {words(4)}",
            "chosen": f"{words(r.randint(2, 8))} brilliant",
            "rejected": words(r.randint(2, 8)),
        }
        for i in range(n)
    ]


@dataclass
class Trained:
    home: Path
    scores: dict[int, list[float]]  # what each version serves for PROBE
    judge_s: float  # from the "evaluate" progress line to the end of a run


def score(d: DaemonProc) -> tuple[int, list[float]]:
    with d.client(timeout=60) as c:
        r = c.score(*PROBE)
    return int(r["version"]), list(r["scores"])


def registry(d: DaemonProc) -> tuple[dict[int, str], int | None]:
    with d.client() as c:
        m = c.call("models")
    states = {int(x["version"]): str(x["state"]) for x in m["models"]}
    assert list(states.values()).count("deployed") == (m["deployed"] is not None)
    return states, m["deployed"]


def train_wait(d: DaemonProc) -> tuple[dict[str, Any], float]:
    """A whole run; also how long it took from its "evaluate" line to the end."""
    seen: dict[str, float] = {}

    def on_notify(method: str, params: Any) -> None:
        if method == "progress":
            seen.setdefault(str(params.get("phase")), time.monotonic())

    with d.client(timeout=None, on_notify=on_notify) as c:
        job: dict[str, Any] = c.train(wait=True)["job"]
    assert job["outcome"] == "done", job
    return job, time.monotonic() - seen["evaluate"]


@pytest.fixture(scope="module")
def trained() -> Iterator[Trained]:
    tiny_gguf = pytest.importorskip("tiny_gguf")
    base = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    try:
        args = tiny_gguf.tiny_args()
        gguf = tiny_gguf.write_gguf(base / "tiny.gguf", tiny_gguf.tiny_model(args), args)
        (base / "config.toml").write_text(
            f'base_model = "{gguf}"\n'
            "[train]\nepochs = 2\nmax_tokens = 48\nlora_layers = 1\nstreams = 1\n"
            "eval_every = 1000\npatience = 1000\n"
            "[schedule]\nenabled = false\n" + PERMISSIVE_GATE
        )
        d = DaemonProc(base, daemon_env(base)).start()
        scores: dict[int, list[float]] = {}
        judge_s = 0.0
        for tag, seed in (("a", 1), ("b", 2)):
            with d.client() as c:
                c.ingest_batch(pairs(60, tag, seed))
            job, judge_s = train_wait(d)
            result = job["result"]
            assert result["deployed"], result
            version, s = score(d)
            assert version == result["version"]
            scores[version] = s
        assert len(scores) == 2 and len({tuple(s) for s in scores.values()}) == 2
        assert d.terminate() == 0
        yield Trained(base, scores, judge_s)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def copy_home(t: Trained, home: Path) -> DaemonProc:
    shutil.copytree(t.home, home, dirs_exist_ok=True, ignore=shutil.ignore_patterns("run", "*.log"))
    return DaemonProc(home, daemon_env(home))


def serves(d: DaemonProc, scores: dict[int, list[float]], deployed: int) -> None:
    """The daemon serves ``deployed``, with the scores recorded for it (new: recorded now)."""
    version, s = score(d)
    assert version == deployed
    if deployed in scores:
        assert s == scores[deployed], f"v{deployed} serves other scores than before"
    scores[deployed] = s


class PhaseWatch:
    """``train --wait`` in a thread; ``phase`` is set when the run reports it."""

    def __init__(self, d: DaemonProc, phase: str) -> None:
        self.event = threading.Event()
        self.result: dict[str, Any] | None = None
        self.error: PalateError | None = None

        def on_notify(method: str, params: Any) -> None:
            if method == "progress" and params.get("phase") == phase:
                self.event.set()

        def run() -> None:
            try:
                with d.client(timeout=None, on_notify=on_notify) as c:
                    self.result = c.train(wait=True)["job"]
            except PalateError as e:
                self.error = e
            self.event.set()  # finished without the phase: let the waiter see it

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def child_pid(d: DaemonProc) -> int:
    def current() -> Any:
        with d.client() as c:
            cur = c.status()["training"]["current"]
        return cur and cur.get("pid")

    return int(wait_for(current, 30, "no training child"))


def test_kill9_of_the_training_child_at_random_points(trained: Trained, home: Path) -> None:
    rnd, seed = seeded("kill9 of the training child")
    scores = dict(trained.scores)
    d = copy_home(trained, home).start()
    states, deployed = registry(d)
    assert deployed is not None
    serves(d, scores, deployed)
    outcomes: list[str] = []
    # early (reading the feedback, loading the base), at a random point of the judging and
    # registering at the end, and right after the deploy committed (the child still exiting)
    plan = [
        ("load", rnd.uniform(0, 0.4)),
        ("evaluate", rnd.uniform(0.5, 1.0) * trained.judge_s),
        ("deployed", 0.0),
    ]
    for phase, delay in plan:
        watch = PhaseWatch(d, "evaluate" if phase == "deployed" else phase)
        pid = child_pid(d)
        assert watch.event.wait(60), f"no {phase} phase"
        time.sleep(delay)
        if phase == "deployed":
            before = deployed
            wait_for(lambda: registry(d)[1] != before, 30, "no deploy", every=0.002)  # noqa: B023
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        watch.thread.join(60)
        assert watch.error is None, watch.error
        job = watch.result
        assert job is not None and job["pid"] == pid
        wait_for(lambda pid=pid: not pid_alive(pid), 10, "the killed child is still there")
        new_states, new_deployed = registry(d)
        added = {v: st for v, st in new_states.items() if v not in states}
        kept = dict(states)
        if new_deployed != deployed:
            kept[deployed] = "retired"
        assert {v: st for v, st in new_states.items() if v in states} == kept
        # at most one new version: not registered, registered, or registered and deployed
        assert len(added) <= 1, added
        assert set(added.values()) <= {"candidate", "deployed"}, added
        assert new_deployed == deployed or added == {new_deployed: "deployed"}
        what = {"candidate": "registered only", "deployed": "deployed"}.get(
            next(iter(added.values()), ""), "nothing registered"
        )
        outcomes.append(f"{phase}+{delay:.2f}s: {job['outcome']}, {what}")
        states, deployed = new_states, new_deployed
        assert deployed is not None
        # the daemon serves what the registry says, with the scores each version had
        serves(d, scores, deployed)
    assert "killed" in outcomes[0], outcomes  # the late ones may find the run finished
    print(f"seed {seed}: " + "; ".join(outcomes))
    assert d.terminate() == 0


def _kill_daemon_during(trained: Trained, home: Path, phase: str, delay: float) -> None:
    scores = dict(trained.scores)
    d = copy_home(trained, home).start()
    states, deployed = registry(d)
    assert deployed is not None
    watch = PhaseWatch(d, phase)
    pid = child_pid(d)
    assert watch.event.wait(60), f"no {phase} phase"
    time.sleep(delay)
    d.kill9()
    watch.thread.join(10)
    t0 = time.monotonic()
    # the orphaned child must stop by itself: nothing is left to report to
    wait_for(lambda: not pid_alive(pid), 30, "the training child outlived its daemon")
    gone_after = time.monotonic() - t0
    d = DaemonProc(home, daemon_env(home)).start()
    assert registry(d) == (states, deployed), f"the orphaned run changed the registry ({phase})"
    serves(d, scores, deployed)
    with d.client() as c:
        assert c.status()["training"] == {"current": None, "last": None}
    print(f"daemon killed at {phase}+{delay:.2f}s: child gone {gone_after:.2f} s later")
    assert d.terminate() == 0
    view = read_store(d.paths)
    assert view.integrity == "ok" and view.deployed == deployed


def test_kill9_of_the_daemon_while_a_run_trains(trained: Trained, home: Path) -> None:
    rnd, _ = seeded("kill9 of the daemon while training")
    _kill_daemon_during(trained, home, "load", rnd.uniform(0, 0.3))


def test_kill9_of_the_daemon_while_a_run_judges(trained: Trained, home: Path) -> None:
    rnd, _ = seeded("kill9 of the daemon while judging")
    _kill_daemon_during(trained, home, "evaluate", rnd.uniform(0, 0.1))


def _call(
    d: DaemonProc,
    method: str,
    params: dict[str, Any],
    acked: list[Any],
    errors: list[PalateError],
) -> None:
    try:
        with d.client() as c:
            acked.append(c.call(method, params))
    except PalateError as e:
        errors.append(e)


def test_kill9_of_the_daemon_around_deploy_and_rollback(trained: Trained, home: Path) -> None:
    rnd, seed = seeded("kill9 around deploy/rollback")
    scores = dict(trained.scores)
    env = daemon_env(home)
    d = copy_home(trained, home).start()
    _, deployed = registry(d)
    assert deployed is not None
    (other,) = set(scores) - {deployed}
    # how long one deploy takes from here: the kills spread over 0-1.5x of it
    t0 = time.monotonic()
    with d.client() as c:
        c.call("deploy", {"version": other, "override": True, "reason": "calibration"})
        c.call("rollback", {"reason": "calibration"})
    span = (time.monotonic() - t0) / 2
    changed = unchanged = 0
    for n in range(KILLS_AROUND_DEPLOY):
        states, deployed = registry(d)
        (other,) = set(scores) - {deployed}
        method, params = (
            ("rollback", {"reason": f"kill {n}"})
            if rnd.random() < 0.5
            else ("deploy", {"version": other, "override": True, "reason": f"kill {n}"})
        )
        acked: list[Any] = []
        errors: list[PalateError] = []
        t = threading.Thread(target=_call, args=(d, method, params, acked, errors))
        t.start()
        time.sleep(rnd.uniform(0, 1.5 * span))
        d.kill9()
        t.join(10)
        assert all(e.code == "unavailable" for e in errors), errors
        d = DaemonProc(home, env).start()
        new_states, new_deployed = registry(d)
        assert new_deployed in (deployed, other), (n, new_deployed)
        if acked:
            assert new_deployed == acked[0]["deployed"] == other, "an acknowledged deploy was lost"
        if new_deployed == deployed:
            unchanged += 1
            assert new_states == states
        else:
            changed += 1
            assert new_states == {**states, deployed: "retired", other: "deployed"}
        serves(d, scores, new_deployed)
    assert d.terminate() == 0
    assert d.paths.db_file.exists()
    view = read_store(d.paths)
    assert view.integrity == "ok" and list(view.models.values()).count("deployed") == 1
    print(
        f"seed {seed}: {KILLS_AROUND_DEPLOY} kills around deploy/rollback (one takes "
        f"{span * 1000:.1f} ms): "
        f"{changed} took effect, {unchanged} did not, every time exactly one deployed"
    )
