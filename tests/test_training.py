"""Training loop on a tiny random llama: learns, is deterministic, the cache is exact."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import missing  # noqa: E402
from palate.model.batching import PairExample, RatingExample, bucket_batches, encode_examples  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel  # noqa: E402
from palate.model.scoring import Scorer, group_rewards, make_streams  # noqa: E402
from palate.model.training import (  # noqa: E402
    ProgressEvent,
    TrainConfig,
    build_prefix_cache,
    train_reward_model,
)
from tiny_lm import marker_pairs, tiny_base  # noqa: E402

# min_steps=0: these tests count steps and passes exactly.
FAST = dict(lora_layers=2, lr=3e-3, batch_tokens=1024, max_tokens=64, eval_every=10, min_steps=0)


def test_learns_marker_preference_to_95_percent_heldout() -> None:
    base = tiny_base()
    events: list[ProgressEvent] = []
    res = train_reward_model(marker_pairs(300), TrainConfig(epochs=3, **FAST), events.append, base)
    test = marker_pairs(200, seed=99)
    a, b = Scorer(res.model, base.tokenizer, 64, res.calibration).score_pairs(
        [(e.prompt, e.chosen, e.rejected) for e in test]
    )
    assert (a > b).mean() >= 0.95
    phases = {e.phase for e in events}
    assert {"encode", "cache", "train", "validate", "done"} <= phases
    train_ev = [e for e in events if e.phase == "train"]
    assert all(e.tokens_per_s and e.eta_s is not None and e.total for e in train_ev)
    assert res.calibration.std > 0 and res.calibration.temperature > 0


def test_loss_decreases() -> None:
    base = tiny_base()
    res = train_reward_model(
        marker_pairs(120), TrainConfig(epochs=2, val_fraction=0, **FAST), base=base
    )
    losses = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert losses[-1] < losses[0] < 0.8


def test_same_seed_same_model() -> None:
    ex = marker_pairs(60)
    cfg = TrainConfig(epochs=1, **FAST)
    r1 = train_reward_model(ex, cfg, base=tiny_base())
    r2 = train_reward_model(ex, cfg, base=tiny_base())
    s1, s2 = r1.model.trainable_state(), r2.model.trainable_state()
    assert all(np.array_equal(np.array(s1[k]), np.array(s2[k])) for k in s1)


def test_prefix_cache_equals_uncached_path() -> None:
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    groups, _ = encode_examples(marker_pairs(40), base.tokenizer, 64)
    streams = make_streams(1)
    full = group_rewards(model, groups, 512, streams)
    for dtype, tol in (("float32", 1e-5), ("float16", 2e-3)):
        hidden = build_prefix_cache(model, groups, 700, streams, dtype)
        cached = group_rewards(model, groups, 512, streams, hidden)
        np.testing.assert_allclose(np.concatenate(cached), np.concatenate(full), atol=tol)


def test_cached_and_uncached_training_agree() -> None:
    ex = marker_pairs(60)
    base_cfg = dict(FAST, epochs=1, cache_dtype="float32", streams=1)
    r1 = train_reward_model(ex, TrainConfig(prefix_cache=True, **base_cfg), base=tiny_base())
    r2 = train_reward_model(ex, TrainConfig(prefix_cache=False, **base_cfg), base=tiny_base())
    s1, s2 = r1.model.trainable_state(), r2.model.trainable_state()
    for k in s1:
        np.testing.assert_allclose(np.array(s1[k]), np.array(s2[k]), atol=1e-3)


def test_remainder_examples_are_trained_on() -> None:
    """Every batch, including the partial last one, gives an optimizer step; a dataset
    smaller than one batch still trains (mlx-lm's iterate_batches would train on nothing)."""
    base = tiny_base()
    ex = [*marker_pairs(7), PairExample("w1 " * 30, "zz w2", "w3 w4")]
    cfg = TrainConfig(epochs=1, val_fraction=0, **dict(FAST, batch_tokens=150, lr=1e-2))
    groups, _ = encode_examples(ex, base.tokenizer, 64)
    batches = bucket_batches(groups, cfg.batch_tokens)
    assert sorted(i for b in batches for i in b) == list(range(8)) and len(batches) > 1
    assert train_reward_model(ex, cfg, base=base).metrics["steps"] == len(batches)
    init = RewardModel(tiny_base().model, cfg.lora(), seed=cfg.seed).trainable_state()
    one = train_reward_model(ex[-1:], cfg, base=tiny_base()).model.trainable_state()
    assert not np.array_equal(np.array(one["head.weight"]), np.array(init["head.weight"]))


GOOD_WORD = "w47"  # what the ratings teach (the pairs teach the marker)


def _rated(n: int, seed: int) -> list[RatingExample]:
    """Ratings on a feature the pairs never show: a response with GOOD_WORD is good."""
    out = []
    for i, p in enumerate(marker_pairs(n, seed=seed)):
        text = p.rejected.replace(GOOD_WORD, "w1")
        out.append(RatingExample(p.prompt, f"{text} {GOOD_WORD}" if i % 2 else text, i % 2))
    return out


def _rating_auc(res: Any, base: Any, ratings: list[RatingExample]) -> float:
    sc = Scorer(res.model, base.tokenizer, 64, res.calibration)
    s = np.array([sc.raw_scores(r.prompt, [r.response])[0] for r in ratings])
    y = np.array([r.label for r in ratings])
    return float((s[y == 1][:, None] > s[y == 0][None, :]).mean())


def test_pairs_and_ratings_in_one_run() -> None:
    """Both kinds train, each in its own direction: pairs on the marker, ratings on a word
    the pairs never show. Inverted rating labels would teach the opposite and fail."""
    base = tiny_base()
    pairs = marker_pairs(120)
    ratings = _rated(200, seed=5)
    # Ratings start on a plateau (a near-zero head, BCE around a moving baseline): about
    # 100 steps get past it on this model.
    res = train_reward_model(pairs + ratings, TrainConfig(epochs=8, members=1, **FAST), base=base)
    assert res.data_summary["ratings"] == 200 and res.data_summary["pairs"] == 120
    assert _rating_auc(res, base, _rated(100, seed=77)) >= 0.9
    test = [e for e in marker_pairs(150, seed=78) if GOOD_WORD not in e.chosen + e.rejected]
    a, b = Scorer(res.model, base.tokenizer, 64, res.calibration).score_pairs(
        [(e.prompt, e.chosen, e.rejected) for e in test]
    )
    assert (a > b).mean() >= 0.8  # the pairs' marker, learned alongside (chance: 0.5)


def test_empty_dataset_rejected() -> None:
    with pytest.raises(ValueError):
        train_reward_model([], TrainConfig(), base=tiny_base())


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless_dev.jsonl"


@pytest.mark.slow
def test_real_embedded_model_few_steps_reduce_loss() -> None:
    from palate.model.base_model import load_base_model

    if not DATA.exists():
        missing("shared data not present")
    base = load_base_model("builtin:smollm2-135m")
    rows = [json.loads(line) for line in DATA.open()][:24]
    ex = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    cfg = TrainConfig(
        epochs=6, val_fraction=0, max_tokens=128, batch_tokens=2048, lr=1e-3, warmup_steps=0
    )
    res = train_reward_model(ex, cfg, base=base)
    losses = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert losses[-1] < losses[0]
    mx.eval(res.model.parameters())


def test_small_data_gets_at_least_min_steps() -> None:
    """One pass over a handful of pairs is a few steps: min_steps adds passes."""
    cfg = TrainConfig(epochs=1, val_fraction=0, **dict(FAST, min_steps=12))
    res = train_reward_model(marker_pairs(30), cfg, base=tiny_base())
    assert res.metrics["steps"] >= 12 and res.metrics["epochs"] > 1
    few = train_reward_model(
        marker_pairs(30),
        TrainConfig(epochs=1, val_fraction=0, **FAST),
        base=tiny_base(),
    )
    assert few.metrics["steps"] < 12 and few.metrics["epochs"] == 1
