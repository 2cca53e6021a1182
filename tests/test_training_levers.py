"""Issue 15's training levers on the tiny llama: early stopping keeps the best checkpoint, and
the length levers take a planted length shortcut out of the model."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import dataclasses  # noqa: E402
import random  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.evaluation.heldout import length_effect  # noqa: E402
from palate.model.batching import EncodedGroup, PairExample  # noqa: E402
from palate.model.scoring import Scorer  # noqa: E402
from palate.model.training import (  # noqa: E402
    MAX_BALANCE_WEIGHT,
    ProgressEvent,
    TrainConfig,
    TrainResult,
    length_balance_weights,
    train_reward_model,
)
from tiny_lm import MARKER, WORDS, tiny_base  # noqa: E402

FAST: dict[str, Any] = dict(
    lora_layers=2, lr=3e-3, batch_tokens=1024, max_tokens=64, eval_every=10, min_steps=0, members=1
)


def planted(n: int, seed: int, p_short: float, marker: bool = True) -> list[PairExample]:
    """Pairs of a short (2-4 words) and a long (9-14 words) answer; the chosen one is the
    short one with probability ``p_short`` and, with ``marker``, carries the marker word
    (the content signal). ``p_short`` 0.5 gives a test set without a length preference."""
    rnd = random.Random(seed)

    def w(k: int) -> list[str]:
        return [rnd.choice(WORDS) for _ in range(k)]

    out = []
    for _ in range(n):
        prompt = "Human: " + " ".join(w(rnd.randint(3, 8)))
        s, long_ = w(rnd.randint(2, 4)), w(rnd.randint(9, 14))
        good, bad = (s, long_) if rnd.random() < p_short else (long_, s)
        if marker:
            good.insert(rnd.randint(0, len(good)), MARKER)
        out.append(PairExample(prompt, " ".join(good), " ".join(bad)))
    return out


def _length_effect(res: TrainResult, base: Any, test: list[PairExample]) -> dict[str, Any]:
    a, b = Scorer(res.model, base.tokenizer, 64, res.calibration).score_pairs(
        [(e.prompt, e.chosen, e.rejected) for e in test]
    )
    return length_effect(
        a, b, [len(e.chosen.split()) for e in test], [len(e.rejected.split()) for e in test]
    )


def test_length_balance_learns_content_not_length() -> None:
    # Training: the chosen answer (the one with the marker) is the shorter in 90% of pairs.
    # Tested on pairs where it is shorter half the time.
    train, test = planted(200, 0, 0.9), planted(200, 99, 0.5)
    unbalanced = TrainConfig(epochs=3, length_balance=False, **FAST)
    plain = _length_effect(
        train_reward_model(train, unbalanced, base=(b0 := tiny_base())), b0, test
    )
    cfg = TrainConfig(epochs=3, length_balance=True, **FAST)
    balanced = _length_effect(train_reward_model(train, cfg, base=(b1 := tiny_base())), b1, test)
    # Without the lever the shortcut shows: worse on chosen-longer pairs, margin vs length < 0.
    assert plain["accuracy_chosen_longer"] < 0.85 and plain["length_corr"] < -0.3
    assert balanced["accuracy_chosen_longer"] >= 0.9
    assert balanced["length_controlled_accuracy"] > plain["length_controlled_accuracy"] + 0.05
    assert abs(balanced["length_corr"]) < abs(plain["length_corr"]) - 0.15


def test_length_head_and_decorrelation_remove_a_pure_length_preference() -> None:
    # The only signal is length (the shorter always wins): a plain model becomes a length
    # meter; the length head plus the correlation penalty leave far less of it in the score.
    train, test = planted(200, 0, 1.0, marker=False), planted(200, 99, 0.5, marker=False)
    plain = _length_effect(
        train_reward_model(train, TrainConfig(epochs=3, **FAST), base=(b0 := tiny_base())), b0, test
    )
    cfg = TrainConfig(epochs=3, length_head=True, length_decorr=5.0, **FAST)
    res = train_reward_model(train, cfg, base=(b1 := tiny_base()))
    lever = _length_effect(res, b1, test)
    assert plain["length_corr"] < -0.8
    assert abs(lever["length_corr"]) < 0.5
    # The head absorbed the preference for short answers (a negative coefficient).
    assert res.metrics["length_head_weight"] < -0.5
    assert res.metrics["validation_length"]["n_chosen_shorter"] > 0


def test_balance_weights() -> None:
    def pair(lc: int, lr: int) -> EncodedGroup:
        ones = np.ones
        return EncodedGroup(prompt=ones(1, np.int32), responses=[ones(lc), ones(lr)], kind="pair")

    groups = [pair(2, 5)] * 6 + [pair(5, 2)] * 2 + [pair(3, 3)]
    w = length_balance_weights(groups)
    assert w[:6] == [pytest.approx(4 / 6)] * 6 and w[6:8] == [2.0, 2.0] and w[8] == 1.0
    assert sum(w[:6]) == pytest.approx(sum(w[6:8]))  # each side weighs the same
    assert sum(w[:8]) == pytest.approx(8)  # and the total is unchanged
    few = [pair(2, 5)] * 40 + [pair(5, 2)]
    assert max(length_balance_weights(few)) == MAX_BALANCE_WEIGHT
    assert length_balance_weights([pair(2, 5)] * 3) == [1.0] * 3  # one side only: nothing to do


def test_early_stopping_keeps_the_best_checkpoint() -> None:
    # Random preferences: nothing generalises, so the validation loss rises as the model
    # memorises, and patience must stop the run well before its last step.
    rnd = random.Random(3)
    data = [
        PairExample(
            "Human: " + " ".join(rnd.choice(WORDS) for _ in range(5)),
            " ".join(rnd.choice(WORDS) for _ in range(4)),
            " ".join(rnd.choice(WORDS) for _ in range(4)),
        )
        for _ in range(240)
    ]
    events: list[ProgressEvent] = []
    cfg = TrainConfig(
        epochs=30, val_fraction=0.3, lora_layers=2, lr=1e-2, batch_tokens=512, max_tokens=64,
        eval_every=5, patience=2, min_delta=0.0, min_steps=0, members=1, warmup_steps=0,
    )  # fmt: skip
    res = train_reward_model(data, cfg, events.append, tiny_base())
    m = res.metrics
    assert m["stopped_early"] and m["steps"] < m["total_steps"]
    assert m["best_step"] < m["steps"]
    # The model returned is the best checkpoint: its validation loss is the best one seen.
    val = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert m["validations"] == len(val) and m["val_loss"] == min(val)
    assert m["calibration_loss"] == pytest.approx(m["val_loss"], rel=1e-5)
    # The validation events name the best step; the last one says why it stopped.
    notes = [e.message for e in events if e.phase == "validate"]
    assert f"best step {m['best_step']}" in notes[-1] and "stopping" in notes[-1]
    # Never before min_steps (a small data set's first passes), best checkpoint kept still.
    floor = m["steps"] + 10
    late = train_reward_model(data, dataclasses.replace(cfg, min_steps=floor), base=tiny_base())
    assert late.metrics["steps"] >= floor
    assert late.metrics["calibration_loss"] == pytest.approx(late.metrics["val_loss"], rel=1e-5)
