"""The README's path after `train --wait`, as a new user lives it (issue 20), with a tiny real
model: the first model is rejected by the gate, and every place that then meets "no deployed
model" says what exists, why, and what the user can do; a run in progress shows in `status`
and `doctor` with its phase N of M and an ETA for the whole run.

The daemon, the training child, the gate and the CLI processes are the real ones; the base
model is the random 2-block GGUF of tests/tiny_gguf.py, taught with flipped labels so the
gate has a real reason to refuse (held-out accuracy below the floor).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProc, daemon_env, wait_for
from palate.cli.main import EXIT_CODES
from test_lifecycle import MARKER, marker_pairs
from tiny_gguf import tiny_args, tiny_model, write_gguf

pytestmark = pytest.mark.slow

CONFIG = (
    'base_model = "{gguf}"\n'
    "[train]\nepochs = {epochs}\nmax_tokens = 64\nlora_layers = 1\nlora_rank = 8\nstreams = 1\n"
    "lr = 0.003\nwarmup_steps = 2\neval_every = 1000\npatience = 1000\n"
    "[gate]\nprobe_floor = 0.0\nprobe_max_drop = 1.0\nsuspicious_accuracy = 1.01\nmax_jump = 1.0\n"
)


@pytest.fixture
def tiny(home: Path) -> tuple[DaemonProc, Path]:
    args = tiny_args()
    gguf = write_gguf(home / "tiny.gguf", tiny_model(args), args)
    (home / "config.toml").write_text(CONFIG.format(gguf=gguf, epochs=4))
    return DaemonProc(home, daemon_env(home)).start(), gguf


def steps_shown(text: str, v: int) -> None:
    assert "what you can do:" in text
    assert "`palate train --wait`" in text
    assert f"`palate deploy {v} --override`" in text
    assert f"`palate models show {v}`" in text


def test_a_rejected_first_model_is_no_dead_end(
    tiny: tuple[DaemonProc, Path], tmp_path: Path
) -> None:
    d, _ = tiny
    with d.client() as c:
        c.ingest_batch(marker_pairs(300, "flip", flip_train=True, seed=3))

    r = d.cli("train", "--wait")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^version (\d+): reject", r.stdout, re.M), r.stdout
    v = int(re.search(r"^version (\d+)", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert "\n  - " in r.stdout, "every reason of the gate"
    assert "no model is deployed, so `palate rerank` and `palate score` cannot answer" in r.stdout
    steps_shown(r.stdout, v)

    cands = tmp_path / "cands.txt"
    cands.write_text(f"beta gamma\ndelta {MARKER}\n")
    for args in (["rerank", "flip question 1", "--candidates", str(cands)], ["score", "q", "a"]):
        r = d.cli(*args)
        assert r.returncode == EXIT_CODES["no_model"], r.stderr
        assert re.search(
            rf"no model is deployed: version {v} \(.+\) was rejected by the gate", r.stderr
        )
        assert "\n  - " in r.stderr, "the gate's reasons"
        steps_shown(r.stderr, v)

    st = d.cli("status")
    assert st.returncode == 0, st.stderr
    assert re.search(rf"^model +none deployed: version {v} .*rejected by the gate", st.stdout, re.M)
    assert f"`palate deploy {v} --override`" in st.stdout
    last = rf"^training last run .*version {v} rejected by the gate$"
    assert re.search(last, st.stdout, re.M), st.stdout

    rep = d.cli("report", "--out", str(tmp_path / "reports"))
    assert rep.returncode == 0, rep.stderr
    assert f"version {v} was rejected by the gate." in rep.stdout
    steps_shown(rep.stdout, v)

    # The way out the messages name: deploy it anyway, then rerank and score answer.
    assert d.cli("deploy", str(v), "--override").returncode == 0
    one = tmp_path / "one.txt"
    one.write_text("just this one\n")
    r = d.cli("rerank", "flip question 1", "--candidates", str(one))
    assert r.returncode == 0, r.stderr
    assert "one candidate, nothing to compare it with" in r.stdout
    assert "confident" not in r.stdout and "runner-up" not in r.stdout
    r = d.cli("score", "flip question 1", "beta gamma", f"delta {MARKER}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].endswith("'beta gamma'") and lines[2].endswith(f"'delta {MARKER}'")
    text = d.cli("status").stdout
    assert re.search(rf"^model +version {v} deployed, held-out accuracy", text, re.M), text


def _current(d: DaemonProc) -> dict[str, Any] | None:
    cur: dict[str, Any] | None = json.loads(d.cli("status", "--json").stdout)["training"]["current"]
    return cur


def test_a_run_in_progress_shows_in_status_and_doctor(tiny: tuple[DaemonProc, Path]) -> None:
    d, gguf = tiny
    with d.client() as c:
        c.ingest_batch(marker_pairs(200, "long"))
    (d.home / "config.toml").write_text(CONFIG.format(gguf=gguf, epochs=3000))
    r = d.cli("train")
    assert r.returncode == 0, r.stderr
    job = wait_for(
        lambda: (
            (cur := _current(d))
            and cur["progress"].get("phase_name") == "train"
            and cur["progress"].get("overall_eta_s") is not None
            and cur
        ),
        90,
        "the run never reported its training phase with an overall ETA",
        every=0.5,
    )
    p = job["progress"]
    assert (p["phase_index"], p["phases"]) == (4, 5), p  # load, encode, cache, train, evaluate
    # >=: the tiny model's evaluation estimate can round to 0.0 s (tests/test_progress.py
    # checks that later phases are added)
    assert p["overall_eta_s"] >= p["eta_s"] > 0, "the whole run outlasts its current phase"
    assert 0 <= p["percent"] < 100

    st = d.cli("status")
    assert re.search(
        rf"^training run {job['id']} in progress: phase 4/5 train, \d+% of the phase, "
        r"whole run: ~\S+ (min|h) left$",
        st.stdout,
        re.M,
    ), st.stdout
    doc = {c["name"]: c for c in json.loads(d.cli("doctor", "--json").stdout)}
    training = doc["training"]
    assert training["status"] == "ok"
    assert training["detail"].startswith(f"run {job['id']} in progress")
    assert "phase 4 of 5 (train)" in training["detail"]
    assert "whole run about" in training["detail"]
    assert d.terminate() == 0  # stops the child; nothing registered
