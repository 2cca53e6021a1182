"""DPO/IPO/KTO policy adapters on a tiny random llama: losses, training, artifacts, the
evaluation and the gate, and the ``palate policy`` / ``palate generate --local`` commands."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from palate.events import RatingExample
from palate.generation.dpo import (
    PolicyTrainConfig,
    _batches,
    _prepare,
    batch_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    train_policy,
)
from palate.generation.evaluate import evaluate_policy
from palate.generation.gate import PolicyGate, decide_policy
from palate.generation.policy import (
    POLICY_FORMAT,
    encode_rows,
    lm_with_lora,
    load_policy,
    policy_artifact,
    response_logprobs,
)
from palate.model import artifacts
from palate.model.reward_model import LoraConfig
from tiny_lm import MARKER, marker_pairs, save_tiny_model_dir, tiny_base

FAST = dict(lr=1e-2, epochs=4, batch_size=8, max_tokens=96, lora_layers=2, beta=0.5)


@pytest.fixture(scope="module")
def base():  # type: ignore[no-untyped-def]
    return tiny_base(seed=1)


@pytest.fixture(scope="module")
def trained(base):  # type: ignore[no-untyped-def]
    return train_policy(marker_pairs(96), PolicyTrainConfig(**FAST), base=base)


def test_losses_by_hand() -> None:
    z = mx.zeros((1,))
    assert float(dpo_loss(z, z, z, z, 0.1)[0]) == pytest.approx(math.log(2))
    # margin m = (pc - pr) - (rc - rr) = 2: -log sigmoid(0.1 * 2)
    one = mx.array([1.0])
    want = -math.log(1 / (1 + math.exp(-0.2)))
    assert float(dpo_loss(one, -one, z, z, 0.1)[0]) == pytest.approx(want, rel=1e-5)
    smooth = float(dpo_loss(one, -one, z, z, 0.1, smoothing=0.1)[0])
    assert smooth == pytest.approx(0.9 * want + 0.1 * -math.log(1 / (1 + math.exp(0.2))), 1e-5)
    # IPO on length-averaged log-ratios: ((2/2 - 0/1) - 1/(2*0.5))^2 = 0
    assert float(ipo_loss(2 * one, z, z, z, 2 * one, one, 0.5)[0]) == pytest.approx(0.0)
    # KTO: the reference point is the batch mean (clamped at 0) and carries no gradient.
    p, r = mx.array([2.0, 0.0]), mx.array([0.0, 0.0])
    good = mx.array([1.0, 0.0])
    out = np.array(kto_loss(p, r, good, 1.0, 1.0, 2.0))
    zref = 1.0
    assert out[0] == pytest.approx(1 - 1 / (1 + math.exp(-(2.0 - zref))), 1e-5)
    assert out[1] == pytest.approx(2 * (1 - 1 / (1 + math.exp(-(zref - 0.0)))), 1e-5)


def test_untrained_adapter_is_the_base(base) -> None:  # type: ignore[no-untyped-def]
    lm = lm_with_lora(base.model, LoraConfig(layers=2))
    rows = encode_rows(
        base.tokenizer, [(p.prompt, [p.chosen, p.rejected]) for p in marker_pairs(4)], 96
    )
    a = np.array(response_logprobs(lm, rows)[0])
    b = np.array(response_logprobs(base.model, rows)[0])
    assert np.array_equal(a, b)
    names = [n for n, _ in tree_flatten(lm.trainable_parameters())]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert not tree_flatten(base.model.trainable_parameters())  # the base stays frozen


def test_prompt_tokens_are_masked(base) -> None:  # type: ignore[no-untyped-def]
    """Changing the prompt's *content* changes the log-prob of the response only through
    conditioning: a row's sum covers exactly its response tokens."""
    rows = encode_rows(base.tokenizer, [("w1 w2 w3", ["w4 w5"]), ("w1 w2 w3", ["w4 w5 w6 w7"])], 96)
    _, n = response_logprobs(base.model, rows)
    assert list(np.array(n)) == list(rows.response_len)


def test_prefix_cache_is_exact_enough(base) -> None:  # type: ignore[no-untyped-def]
    cfg = PolicyTrainConfig(**FAST)
    lm = lm_with_lora(base.model, cfg.lora())
    split = len(lm.model.layers) - cfg.lora_layers
    batches, _ = _batches(marker_pairs(8), base.tokenizer, cfg, np.random.default_rng(0))
    _prepare(lm, batches, split, True, None)
    b = batches[0]
    cached, _ = batch_loss(lm, b, split, cfg, 1.0, 1.0)
    plain = PolicyTrainConfig(**{**FAST, "prefix_cache": False})
    full, _ = batch_loss(lm, b, split, plain, 1.0, 1.0)
    assert float(cached) == pytest.approx(float(full), abs=2e-3)
    assert float(full) == pytest.approx(math.log(2), abs=1e-4)  # LoRA at zero: no margin yet


def test_dpo_learns_the_marker(base, trained) -> None:  # type: ignore[no-untyped-def]
    held = marker_pairs(48, seed=7)
    rep = evaluate_policy(
        load_policy(policy_artifact(trained.lm, base, PolicyTrainConfig(**FAST).lora()), base),
        held,
        judge=lambda prompt, texts: [float(t.split().count(MARKER)) for t in texts],
        max_tokens=96,
        win_prompts=8,
    )
    assert rep["accuracy"] >= 0.75 and rep["n"] == 48
    assert rep["mean_margin"] > 0 and rep["base_accuracy"] == 0.5
    # Its samples use the marker more than the base's: the judge counts markers.
    assert rep["win_rate"] > 0.5 and rep["win_n"] == 16
    assert rep["kl"] > 0 and rep["kl_per_token"] > 0
    assert decide_policy(rep, PolicyGate(min_pairs=10, max_kl_per_token=10.0)).action in (
        "deploy",
        "reject",
    )


def test_ipo_and_kto_train(base) -> None:  # type: ignore[no-untyped-def]
    ipo = train_policy(marker_pairs(32), PolicyTrainConfig(**{**FAST, "loss": "ipo"}), base=base)
    assert math.isfinite(ipo.metrics["final_loss"])
    ratings = []
    for p in marker_pairs(40, seed=3):
        ratings.append(RatingExample(p.prompt, p.chosen, 1.0))
        ratings.append(RatingExample(p.prompt, p.rejected, 0.0))
    kto = train_policy(ratings[:60], PolicyTrainConfig(**FAST), base=base)
    assert kto.data_summary["ratings"] == 60
    held = marker_pairs(32, seed=9)
    rows = encode_rows(base.tokenizer, [(p.prompt, [p.chosen, p.rejected]) for p in held], 96)
    d = np.array(response_logprobs(kto.lm, rows)[0]) - np.array(
        response_logprobs(base.model, rows)[0]
    )
    assert (d[0::2] > d[1::2]).mean() > 0.7  # thumbs alone teach the preference
    with pytest.raises(ValueError):
        PolicyTrainConfig(loss="hinge")


def test_artifact_round_trip_and_refusals(base, trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = PolicyTrainConfig(**FAST)
    art = policy_artifact(trained.lm, base, cfg.lora(), train_config=cfg.to_json())
    out = artifacts.save_dir(art, tmp_path / "a")
    again = load_policy(artifacts.load_dir(out, POLICY_FORMAT), base)
    rows = encode_rows(base.tokenizer, [("w1", ["w2 zz"])], 32)
    assert np.allclose(
        np.array(response_logprobs(again.lm, rows)[0]),
        np.array(response_logprobs(trained.lm, rows)[0]),
        atol=1e-5,
    )
    with pytest.raises(artifacts.ArtifactError):  # a policy is not a reward model
        artifacts.load_dir(out)
    other = tiny_base(seed=2)
    other.content_hash = "different"
    with pytest.raises(artifacts.ArtifactError) as e:
        load_policy(art, other)
    assert "different base" in e.value.message
    bad = artifacts.ModelArtifact(dict(list(art.tensors.items())[1:]), art.config)
    with pytest.raises(artifacts.ArtifactError) as e:
        load_policy(bad, base)
    assert "missing tensor" in e.value.message


def test_gate_decisions() -> None:
    good = {
        "n": 50,
        "accuracy": 0.7,
        "base_accuracy": 0.5,
        "win_rate": 0.8,
        "win_n": 32,
        "win_ci_low": 0.63,
        "win_ci_high": 0.9,
        "kl": 3.0,
        "kl_per_token": 0.05,
    }
    assert decide_policy(good).action == "deploy"
    assert decide_policy({**good, "accuracy": 0.5}).action == "reject"
    assert decide_policy({**good, "win_ci_low": 0.45}).action == "reject"
    assert (
        decide_policy({**good, "win_ci_low": 0.45}, PolicyGate(require_win_ci=False)).action
        == "deploy"
    )
    assert decide_policy({**good, "kl_per_token": 0.9}).action == "reject"
    held = decide_policy({**good, "n": 5})
    assert held.action == "hold" and "5 held-out pairs" in held.reasons[0]
    assert decide_policy({**good, "win_rate": None, "win_n": 0}).action == "hold"
    both = decide_policy({**good, "n": 5, "accuracy": 0.4})
    assert both.action == "reject"  # a reject-level failure wins over a hold


def _palate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palate.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def test_cli_train_eval_and_local_generate(tmp_path: Path) -> None:
    model = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as fh:
        for p in marker_pairs(40):
            fh.write(
                json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            )
    held = tmp_path / "held.jsonl"
    with held.open("w") as fh:
        for p in marker_pairs(24, seed=4):
            fh.write(
                json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            )
    out = tmp_path / "policy"
    r = _palate(
        "policy",
        "train",
        "--data",
        str(data),
        "--output",
        str(out),
        "--base-model",
        model,
        "--lr",
        "0.01",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--layers",
        "2",
        "--max-tokens",
        "96",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["data"]["pairs"] == 40 and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == POLICY_FORMAT and cfg["train_config"]["beta"] == 0.1
    # A reward model directory to judge with: the tiny base's LoRA + head, as trained ones.
    from palate.model.base_model import load_base_model
    from palate.model.reward_model import RewardModel
    from palate.model.scoring import Calibration

    rb = load_base_model(model)
    rm = RewardModel(rb.model, LoraConfig(layers=1))
    rdir = tmp_path / "reward"
    artifacts.save_dir(
        artifacts.artifact_from_model(
            rm, artifacts.build_config(rb, LoraConfig(layers=1), 96, Calibration())
        ),
        rdir,
    )
    r = _palate(
        "policy",
        "eval",
        "--model",
        str(out),
        "--data",
        str(held),
        "--reward-model",
        str(rdir),
        "--win-prompts",
        "4",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["n"] == 24 and ev["accuracy"] >= 0.7 and ev["win_n"] == 8
    assert ev["gate"]["action"] in ("deploy", "reject", "hold") and ev["judge"] == str(rdir)
    r = _palate(
        "generate",
        "w1 w2",
        "-n",
        "3",
        "--max-tokens",
        "6",
        "--local",
        "--reward-model",
        str(rdir),
        "--policy",
        str(out),
        "--seed",
        "1",
        "--json",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert len(g["candidates"]) == 3 and g["version"] is None
    assert g["policy"]["name"] == str(out.resolve())
    r = _palate("generate", "w1", "--local", cwd=tmp_path)
    assert r.returncode == 2 and "--reward-model" in r.stderr
    r = _palate("policy", "train", "--data", str(data), "--output", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "not empty" in r.stderr
