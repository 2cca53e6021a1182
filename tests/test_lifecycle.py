"""The whole loop with a tiny real model: ingest -> train -> gate -> deploy -> serve.

A random 2-block llama written as a GGUF (tests/tiny_gguf.py) trains in seconds on a
learnable preference: the chosen response ends with a marker word. Lengths are drawn
independently for both sides so the length baselines sit near 50%. The daemon, the training
child, the gate and the scorer are all the real ones.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError
from palate.evaluation.split import is_heldout, split_key
from palate.wire import protocol
from tiny_gguf import tiny_args, tiny_model, write_gguf

pytestmark = pytest.mark.slow

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "rho"]
MARKER = "brilliant"


def sentence(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def marker_pairs(
    n: int, tag: str, *, flip_train: bool = False, seed: int = 0
) -> list[dict[str, Any]]:
    """Pairs where the marker wins; with ``flip_train``, prompts on the training side of
    the held-out split get the labels reversed (a deliberately bad teacher), while held-out
    prompts keep the truth the candidate will be judged on."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        prompt = f"{tag} question {i}: {sentence(rnd, 4)}"
        good = f"{sentence(rnd, rnd.randint(2, 9))} {MARKER}"
        bad = sentence(rnd, rnd.randint(3, 10))
        if flip_train and not is_heldout(split_key(prompt)):
            good, bad = bad, good
        out.append(
            {
                "kind": "pair",
                "source": "test",
                "prompt": prompt,
                "chosen": good,
                "rejected": bad,
                "context": {"domain": "code" if i % 2 else "chat"},
            }
        )
    return out


@pytest.fixture
def tiny_daemon(home: Path) -> DaemonProc:
    args = tiny_args()
    gguf = write_gguf(home / "tiny.gguf", tiny_model(args), args)
    (home / "config.toml").write_text(
        f'base_model = "{gguf}"\n'
        "[train]\nepochs = 6\nmax_tokens = 64\nlora_layers = 2\nlora_rank = 8\nstreams = 1\n"
        "lr = 0.003\nwarmup_steps = 2\neval_every = 1000\npatience = 1000\n"
        # The tiny model knows nothing of the probes' English, and learns the marker rule
        # perfectly: relax the two rules that exist for real models.
        "[gate]\nprobe_floor = 0.0\nprobe_max_drop = 1.0\nsuspicious_accuracy = 1.01\n"
        "max_jump = 1.0\n"
    )
    return DaemonProc(home, daemon_env(home)).start()


def train(d: DaemonProc) -> dict[str, Any]:
    progress: list[Any] = []
    with d.client(timeout=None, on_notify=lambda m, p: progress.append((m, p))) as c:
        job: dict[str, Any] = c.train(wait=True)["job"]
    assert job["outcome"] == "done", job
    assert any(m == "progress" for m, _ in progress), "train --wait streams progress"
    return job["result"]


def test_ingest_train_gate_deploy_serve_reject_rollback(tiny_daemon: DaemonProc) -> None:
    d = tiny_daemon
    with d.client() as c:
        c.ingest_batch(marker_pairs(420, "good"))
    first = train(d)
    assert first["decision"] == "deploy", first["reasons"]
    assert first["deployed"] and first["accuracy"] >= 0.9
    v1 = first["version"]

    with d.client() as c:
        r = c.rerank("good question 999: alpha", ["beta gamma", f"delta {MARKER}", "rho"])
        assert r["version"] == v1
        assert r["order"][0] == 1 and r["p_best"][1] > 0.5
        before = c.score("good question 999: alpha", ["beta gamma", f"delta {MARKER}"])
        info = c.call("models", {"version": v1})["model"]
        assert info["meta"]["metrics"]["accuracy"] >= 0.9
        assert {"metrics", "decision", "reasons", "training"} <= set(info["meta"])

    # The report renders from the registry alone, with its plots embedded and no feedback text.
    r = d.cli("report", "--out", str(d.home / "reports"), "--json")
    assert r.returncode == 0, r.stderr
    html = Path(__import__("json").loads(r.stdout)["path"]).read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "good question" not in html and MARKER not in html
    rows = __import__("json").loads(d.cli("models", "--json").stdout)
    assert rows[0]["metrics"]["accuracy"] >= 0.9 and rows[0]["decision"] == "deploy"

    with d.client() as c:
        # A deliberately worse candidate: trained on flipped labels, judged on the truth.
        assert c.forget(all=True) == 420
        c.ingest_batch(marker_pairs(420, "flip", flip_train=True, seed=1))
    second = train(d)
    assert second["decision"] == "reject", second
    assert not second["deployed"]
    assert any("accuracy" in reason for reason in second["reasons"])
    v2 = second["version"]
    with d.client() as c:
        assert c.score("good question 999: alpha", ["x"])["version"] == v1, "v1 keeps serving"
        models = {m["version"]: m["state"] for m in c.call("models")["models"]}
        assert models == {v1: "deployed", v2: "rejected"}

        # Force the bad one in (recorded as an override), then roll back: exact scores again.
        with pytest.raises(PalateError) as ei:
            c.call("deploy", {"version": v2})
        assert ei.value.code == "conflict"
        c.call("deploy", {"version": v2, "override": True})
        swapped = c.score("good question 999: alpha", ["beta gamma", f"delta {MARKER}"])
        assert swapped["version"] == v2
        assert c.call("rollback")["deployed"] == v1
        after = c.score("good question 999: alpha", ["beta gamma", f"delta {MARKER}"])
    assert after["version"] == v1
    assert after["scores"] == before["scores"]


def test_serving_under_load_swap_busy_and_ingest(tiny_daemon: DaemonProc) -> None:
    d = tiny_daemon
    with d.client() as c:
        c.ingest_batch(marker_pairs(360, "good"))
    v1 = train(d)["version"]
    with d.client() as c:
        c.ingest_batch(marker_pairs(360, "more", seed=3))
    v2 = train(d)["version"]
    assert v2 > v1

    # Hot swap under concurrent requests: no errors, every answer names a version.
    errors: list[BaseException] = []
    versions: set[int] = set()
    stop = threading.Event()

    def hammer() -> None:
        try:
            with d.client() as c:
                while not stop.is_set():
                    versions.add(c.rerank("q", ["a", f"b {MARKER}", "c"])["version"])
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    with d.client() as c:
        for _ in range(3):
            for v in (v1, v2):
                c.call("deploy", {"version": v, "override": True, "reason": "swap test"})
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert versions <= {v1, v2} and versions

    # Saturate the scorer from raw pipelined connections; ingest must stay acknowledged.
    long = "omega " * 4000
    conns = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.paths.socket))
        s.sendall(
            b"".join(
                protocol.pack(
                    [
                        0,
                        i,
                        "rerank",
                        {"prompt": long, "candidates": [long + str(j) for j in range(16)]},
                    ]
                )
                for i in range(60)
            )
        )
        conns.append(s)
    with d.client() as c:
        t0 = time.monotonic()
        acked = c.ingest(
            {"kind": "pair", "source": "t", "prompt": "during", "chosen": "a", "rejected": "b"}
        )
        assert not acked["duplicate"]
        assert time.monotonic() - t0 < 5, "ingest must not wait behind scoring"
    codes: dict[str, int] = {}
    for s in conns[:2]:
        u = msgpack.Unpacker(raw=False)
        s.settimeout(120)
        got = 0
        while got < 60:
            u.feed(s.recv(1 << 16))
            for m in u:
                got += 1
                key = m[2]["code"] if m[2] else "ok"
                codes[key] = codes.get(key, 0) + 1
    assert codes.get("busy", 0) > 0, codes  # back-pressure, answered at once
    assert codes.get("ok", 0) > 0 and set(codes) <= {"ok", "busy"}, codes
    # Hang up on the rest: their queued work is dropped, and the queue drains.
    for s in conns:
        s.close()
    deadline = time.monotonic() + 60
    with d.client() as c:
        while c.status()["scorer"]["queued"] and time.monotonic() < deadline:
            time.sleep(0.1)
        st = c.status()["scorer"]
        assert st["queued"] == 0
        # The scorer still answers, from the deployed model, on the kind of input it learned
        # (a one-letter prompt and one-word answers are outside what the tiny model saw, and
        # its preference there is arbitrary).
        r = c.rerank("good question 999: alpha", ["beta gamma", f"delta {MARKER}"])
        assert r["order"][0] == 1 and r["version"] == v2

        # Cancellation on hang-up, measured: queue 40 requests, hang up at once; the
        # scorer must skip (not score) what it had not started.
        before = c.status()["scorer"]["scored"]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.paths.socket))
        s.sendall(
            b"".join(
                protocol.pack(
                    [
                        0,
                        i,
                        "rerank",
                        {"prompt": long, "candidates": [long + str(j) for j in range(16)]},
                    ]
                )
                for i in range(40)
            )
        )
        s.close()
        while c.status()["scorer"]["queued"] and time.monotonic() < deadline + 60:
            time.sleep(0.1)
        scored = c.status()["scorer"]["scored"] - before
        assert scored < 40 * 16 // 2, f"{scored} candidates scored for a client that hung up"


def test_sigterm_while_scoring_exits_zero_in_budget(tiny_daemon: DaemonProc) -> None:
    d = tiny_daemon
    with d.client() as c:
        c.ingest_batch(marker_pairs(360, "good"))
    train(d)
    long = "omega " * 4000
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.paths.socket))
    s.sendall(
        b"".join(
            protocol.pack(
                [0, i, "rerank", {"prompt": long, "candidates": [long + str(j) for j in range(16)]}]
            )
            for i in range(30)
        )
    )
    with d.client() as c:  # make sure scoring is really under way
        deadline = time.monotonic() + 30
        while not c.status()["scorer"]["batches"] and time.monotonic() < deadline:
            time.sleep(0.05)
    t0 = time.monotonic()
    assert d.terminate(timeout=30) == 0
    assert time.monotonic() - t0 < 20, "launchd/systemd would SIGKILL after 20 s"
    s.close()
