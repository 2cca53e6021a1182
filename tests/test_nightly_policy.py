"""The optional nightly policy run (issue 18): ``[policy] nightly = true`` makes the nightly run
(runtime.training_child._run, on a real encrypted store and a tiny random GGUF base) train a
DPO policy adapter after the reward model, judge it on the held-out pairs with the deployed
reward model, gate it and register it as a ``policy`` version.

- off (the default) nothing but the reward model is trained or registered;
- on, with enough pairs, a policy version is registered with its report, checks and decision,
  and the run's result records it;
- with fewer held-out pairs than the policy gate needs, or ratings only, it is skipped with
  the reason;
- a failing policy trainer leaves the reward model's result as it was and records the error.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palate.config import Config, PolicyConfig, load_config
from palate.errors import PalateError
from palate.evaluation.gate import GatePolicy
from palate.evaluation.split import example_key, split_items
from palate.events import PairExample, RatingExample
from palate.generation import dpo, gate
from palate.generation.policy import POLICY_FORMAT
from palate.model import artifacts
from palate.paths import resolve
from palate.runtime import training_child
from palate.store.database import POLICY_KIND, IngestGroup, Store
from store_events import pair_events
from tiny_gguf import tiny_args, tiny_model, write_gguf

TRAIN: dict[str, Any] = {
    "lora_layers": 1, "max_tokens": 64, "min_steps": 5, "members": 1, "epochs": 1,
    "lr": 3e-3, "batch_tokens": 1024, "frozen_cache_mb": 0,
}  # fmt: skip
#: A small, fast policy run: 64 examples, one epoch, 4 win-rate prompts (8 judged samples,
#: the gate's minimum).
POLICY = PolicyConfig(
    nightly=True,
    max_examples=64,
    win_prompts=4,
    train={"lr": 1e-2, "epochs": 1, "batch_size": 8, "lora_layers": 1, "max_tokens": 64},
)
KEY = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A tiny base and a store of 160 pairs (29 held out) whose first night's reward
    model is deployed: the judge a policy run needs. Tests work on copies of the store."""
    d = tmp_path_factory.mktemp("nightly-policy")
    args = tiny_args()
    gguf = str(write_gguf(d / "tiny.gguf", tiny_model(args), args))
    mp = pytest.MonkeyPatch()
    mp.setattr(training_child, "say", lambda *a, **k: None)  # no daemon to read it
    store = Store(d / "p.db", KEY)
    try:
        store.ingest([IngestGroup(pair_events(160, seed=1, prompt_words=4, response_words=3))])
        first = training_child._run(
            store, Config(base_model=gguf, train=TRAIN), "n0", True, GatePolicy()
        )
        if store.deployed_version() != first["version"]:
            store.deploy_model(first["version"], how="override", reason="test judge")
    finally:
        store.close()
        mp.undo()
    yield gguf, d / "p.db"


@pytest.fixture()
def store(
    seeded: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    monkeypatch.setattr(training_child, "say", lambda *a, **k: None)
    for f in seeded[1].parent.glob("p.db*"):
        shutil.copy(f, tmp_path / f.name)
    s = Store(tmp_path / "p.db", KEY)
    yield s
    s.close()


def night(store: Store, cfg: Config, name: str) -> dict[str, Any]:
    return training_child._run(store, cfg, name, True, GatePolicy())


def policies(store: Store) -> list[dict[str, Any]]:
    return [m for m in store.list_models() if m["meta"].get("kind") == POLICY_KIND]


def test_off_by_default_trains_no_policy(
    seeded: tuple[str, Path], store: Store, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[policy]\nnightly = false\nlr = 1e-4\n", encoding="utf-8")
    cfg = load_config(resolve(home))
    assert cfg.policy.nightly is False and dict(cfg.policy.train) == {"lr": 1e-4}
    assert Config().policy.nightly is False  # no [policy] table: off
    for bad in ('nightly = "yes"', "nightly = 1", "max_examples = 0", "win_prompts = true"):
        (home / "config.toml").write_text(f"[policy]\n{bad}\n", encoding="utf-8")
        with pytest.raises(PalateError, match=r"\[policy\]"):
            load_config(resolve(home))
    result = night(store, Config(base_model=seeded[0], train=TRAIN, policy=cfg.policy), "off")
    assert "policy" not in result
    assert policies(store) == [] and store.deployed_policy() is None


def test_on_registers_a_gated_policy_version_and_records_it(
    seeded: tuple[str, Path], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real = dpo.train_policy

    def spy(examples: Any, *a: Any, **k: Any) -> Any:
        seen.extend(examples)
        return real(examples, *a, **k)

    monkeypatch.setattr(dpo, "train_policy", spy)
    result = night(store, Config(base_model=seeded[0], train=TRAIN, policy=POLICY), "on")
    out = result["policy"]
    assert "error" not in out and "skipped" not in out, out
    assert out["version"] != result["version"] and out["decision"] in ("deploy", "reject", "hold")
    store.get_model(result["version"])  # the reward model's version stands beside it
    info, blob = store.get_model(out["version"])
    meta = info["meta"]
    assert meta["kind"] == POLICY_KIND and meta["decision"] == out["decision"]
    assert meta["reasons"] == out["reasons"] and meta["source"] == "nightly:on"
    assert {c["name"] for c in meta["checks"]} == {"heldout_pairs", "implicit_accuracy",
                                                   "win_rate", "kl"}  # fmt: skip
    report = meta["metrics"]
    assert report["n"] >= 20 and report["win_n"] == 8  # held-out pairs; 4 prompts x 2 samples
    assert meta["judge"] == out["judge"] == store.deployed_version()  # the deployed RM judged
    training = meta["training"]
    assert training["examples"] == 64 and training["of_train"] > 64  # the newest 64
    assert training["config"]["lr"] == 1e-2 and training["config"]["base_model"] == seeded[0]
    art = artifacts.from_bytes(blob, POLICY_FORMAT)
    assert art.config["format"] == POLICY_FORMAT
    # It trained on the reward model's training side only: never on a held-out row.
    held = {example_key(e) for e in split_items(training_child.load_examples(store),
            key=example_key).heldout}  # fmt: skip
    assert len(seen) == 64 and held and not held & {example_key(e) for e in seen}
    assert store.deployed_policy() == (out["version"] if out["decision"] == "deploy" else None)


def test_a_passing_policy_gate_deploys_it_for_generation_unless_no_deploy(
    seeded: tuple[str, Path], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny random adapter fails the real gate (its samples drift far from the base's):
    # this test is about what happens after the gate, so the gate passes it.
    monkeypatch.setattr(
        gate, "decide_policy", lambda report, g=None: gate.PolicyDecision("deploy", ["ok"], [])
    )
    cfg = Config(base_model=seeded[0], train=TRAIN, policy=POLICY)
    held = training_child._run(store, cfg, "no-deploy", False, GatePolicy())["policy"]
    assert held["decision"] == "deploy" and held["deployed"] is False
    assert store.deployed_policy() is None
    out = night(store, cfg, "deploy")["policy"]
    assert out["deployed"] is True and store.deployed_policy() == out["version"]
    assert store.get_model(out["version"])[0]["state"] == "candidate"  # never the reward model


def test_too_few_pairs_or_ratings_only_is_skipped_with_the_reason(
    seeded: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training_child, "say", lambda *a, **k: None)
    store = Store(tmp_path / "few.db", KEY)
    try:
        store.ingest([IngestGroup(pair_events(40, seed=5, prompt_words=4, response_words=3))])
        result = night(store, Config(base_model=seeded[0], train=TRAIN, policy=POLICY), "few")
        assert "the policy gate needs 20" in result["policy"]["skipped"]
        assert result["version"] is not None and policies(store) == []
        # Ratings only: no pair to train on (nor to judge on), so nothing is trained.
        night_data = training_child.Night(
            base=None,  # type: ignore[arg-type]  # never reached
            base_spec=seeded[0],
            train=[RatingExample(f"q{i}", "a", float(i % 2)) for i in range(50)],
            held_pairs=[PairExample("q", "a", "b")] * 25,
            seqs={},
            forgets=store.forget_count(),
            data_seq=0,
        )
        cfg = Config(base_model=seeded[0], policy=POLICY)
        out = training_child.nightly_policy(store, cfg, "ratings", True, night_data)
        assert out == {"skipped": "no training-side pairs (ratings only)"}
    finally:
        store.close()


def test_a_failing_policy_trainer_keeps_the_reward_models_result(
    seeded: tuple[str, Path], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("policy trainer exploded")

    monkeypatch.setattr(dpo, "train_policy", boom)
    before = store.deployed_version()
    result = night(store, Config(base_model=seeded[0], train=TRAIN, policy=POLICY), "boom")
    assert result["policy"] == {"error": "RuntimeError: policy trainer exploded"}
    info, _ = store.get_model(result["version"])  # registered, with its own decision
    assert info["meta"]["decision"] == result["decision"] and info["meta"].get("kind") is None
    want = result["version"] if result["deployed"] else before
    assert store.deployed_version() == want
    assert policies(store) == [] and store.deployed_policy() is None


def test_status_names_the_policy_outcome() -> None:
    from palate.cli.service import _run_line
    from palate.service.checks_daemon import job_as_result

    job = {"id": "j", "finished": 1.7e9, "outcome": "done", "result": {"version": 4,
           "decision": "hold", "deployed": False, "policy": {"version": 5, "decision":
           "reject", "deployed": False}}}  # fmt: skip
    line = _run_line(job_as_result(job))
    assert "version 4 held by the gate" in line and "policy version 5 rejected by its gate" in line
    skipped = {**job, "result": {**job["result"], "policy": {"skipped": "12 held-out pairs"}}}
    assert "policy run skipped: 12 held-out pairs" in _run_line(job_as_result(skipped))
    assert "policy" not in _run_line(job_as_result({**job, "result": {"version": 4}}))
