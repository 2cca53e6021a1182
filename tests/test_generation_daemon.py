"""``generate`` and ``policy_register`` through a real daemon, its socket and the CLI.

A tiny random llama written as a GGUF (tests/tiny_gguf.py) is the base; a reward model on it
is put into the encrypted store before the daemon starts (as bench/rerank.py does), so the
daemon serves exactly what a user's would: the deployed reward model, its base, the MLX
thread. A policy adapter trained in process on the same base goes through the registry.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError
from tiny_gguf import tiny_args, tiny_model, write_gguf

pytestmark = pytest.mark.slow

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rnd.choice(WORDS) for _ in range(3))
        out.append(
            {
                "prompt": f"question {i}: {words}",
                "chosen": f"{rnd.choice(WORDS)} the the",
                "rejected": f"{rnd.choice(WORDS)} {rnd.choice(WORDS)}",
            }
        )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny GGUF base, a reward model on it, and a trained policy adapter directory."""
    from palate.events import PairExample
    from palate.generation.dpo import PolicyTrainConfig, train_policy
    from palate.generation.policy import policy_artifact
    from palate.model import artifacts
    from palate.model.base_model import load_base_model
    from palate.model.reward_model import LoraConfig, RewardModel
    from palate.model.scoring import Calibration

    root = tmp_path_factory.mktemp("gen")
    args = tiny_args()
    gguf = write_gguf(root / "tiny.gguf", tiny_model(args), args)
    base = load_base_model(str(gguf))
    lora = LoraConfig(layers=1)
    rm = RewardModel(base.model, lora, seed=0)
    blob = artifacts.to_bytes(
        artifacts.artifact_from_model(rm, artifacts.build_config(base, lora, 128, Calibration()))
    )
    config = PolicyTrainConfig(
        base_model=str(gguf), lr=1e-2, epochs=2, lora_layers=1, max_tokens=96
    )
    examples = [PairExample(p["prompt"], p["chosen"], p["rejected"]) for p in _pairs(24)]
    result = train_policy(examples, config, base=base)
    adapter = root / "adapter"
    artifacts.save_dir(
        policy_artifact(result.lm, base, config.lora(), train_config=config.to_json()), adapter
    )
    return {"gguf": gguf, "reward": blob, "adapter": adapter}


@pytest.fixture
def gen_daemon(home: Path, world: dict[str, Any]) -> DaemonProc:
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    (home / "config.toml").write_text(f'base_model = "{world["gguf"]}"\n')
    paths = resolve(home)
    paths.ensure()
    store = Store(paths.db_file, KeyManager(paths, "file").create())
    v = store.add_model(
        base_model=str(world["gguf"]), artifact=world["reward"], meta={"decision": "deploy"}
    )
    store.deploy_model(v, how="manual", reason="test")
    store.close()
    d = DaemonProc(home, daemon_env(home)).start()
    d.reward_version = v  # type: ignore[attr-defined]
    return d


def test_generate_over_the_socket(gen_daemon: DaemonProc) -> None:
    d = gen_daemon
    with d.client(timeout=120) as c:
        assert "generate" in c.hello()["methods"]
        out = c.call(
            "generate", {"prompt": "question: alpha beta", "n": 5, "max_tokens": 12, "seed": 7}
        )
        assert out["version"] == d.reward_version  # type: ignore[attr-defined]
        assert len(out["candidates"]) == len(out["scores"]) == len(out["finish"]) == 5
        assert out["best"] == out["candidates"][out["best_index"]]
        assert out["scores"][out["best_index"]] == max(out["scores"])
        assert out["policy"]["name"] == "base" and out["strategy"] == "best"
        assert "uncertainty" not in out or len(out["uncertainty"]) == 5
        # The candidates are scored exactly as `score` scores them.
        again = c.score("question: alpha beta", out["candidates"])
        assert again["scores"] == pytest.approx(out["scores"], abs=1e-4)
        # Same seed, same candidates.
        same = c.call(
            "generate", {"prompt": "question: alpha beta", "n": 5, "max_tokens": 12, "seed": 7}
        )
        assert same["candidates"] == out["candidates"]
        soft = c.call(
            "generate",
            {
                "prompt": "question: alpha beta",
                "n": 4,
                "max_tokens": 8,
                "strategy": "soft",
                "lambda": 0.5,
                "seed": 1,
            },
        )
        assert sum(soft["probabilities"]) == pytest.approx(1.0)
        lb = c.call("generate", {"prompt": "x", "n": 3, "max_tokens": 4, "strategy": "lower_bound"})
        assert "lower_bounds" in lb or "note" in lb
        for bad in (
            {"n": 0},
            {"strategy": "worst"},
            {"policy": "relative/dir"},
            {"temperature": -1},
            {"extra": 1},
        ):
            with pytest.raises(PalateError) as e:
                c.call("generate", {"prompt": "x", **bad})
            assert e.value.code == "invalid_request"


def test_policy_register_deploy_and_generate(gen_daemon: DaemonProc, world: dict[str, Any]) -> None:
    d = gen_daemon
    pairs = _pairs(24, seed=5)
    with d.client(timeout=600) as c:
        reg = c.call("policy_register", {"path": str(world["adapter"]), "pairs": pairs})
        v = reg["version"]
        assert reg["decision"] in ("deploy", "reject", "hold")
        m = reg["metrics"]
        assert m["n"] == 24 and 0.0 <= m["accuracy"] <= 1.0 and m["win_n"] > 0
        assert {c["name"] for c in reg["checks"]} == {
            "heldout_pairs",
            "implicit_accuracy",
            "win_rate",
            "kl",
        }
        models = c.call("models")
        row = next(r for r in models["models"] if r["version"] == v)
        assert row["meta"]["kind"] == "policy"
        assert models["deployed"] == d.reward_version  # type: ignore[attr-defined]
        if not reg["deployed"]:
            with pytest.raises(PalateError) as e:
                c.call("deploy", {"version": v})
            assert e.value.code == "conflict"
            dep = c.call("deploy", {"version": v, "override": True})
            assert dep["kind"] == "policy"
        models = c.call("models")
        assert models["policy_deployed"] == v
        assert models["deployed"] == d.reward_version  # the scorer did not move
        out = c.call("generate", {"prompt": "question 1: alpha", "n": 3, "max_tokens": 8})
        assert out["policy"]["version"] == v
        base = c.call(
            "generate", {"prompt": "question 1: alpha", "n": 3, "max_tokens": 8, "policy": "base"}
        )
        assert base["policy"]["name"] == "base"
        by_dir = c.call(
            "generate",
            {
                "prompt": "question 1: alpha",
                "n": 2,
                "max_tokens": 4,
                "policy": str(world["adapter"]),
            },
        )
        assert by_dir["policy"]["version"] is None
    # The CLI, as a user runs it.
    r = d.cli("generate", "question 2: beta", "-n", "3", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["candidates"]) == 3 and out["policy"]["version"] == v
    r = d.cli("policy", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert listed["deployed"] == v and [p["version"] for p in listed["policies"]] == [v]
