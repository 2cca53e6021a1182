"""Calibration and best-checkpoint selection of a training run (tiny random llama)."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.evaluation.metrics import fit_temperature  # noqa: E402
from palate.model.batching import RatingExample  # noqa: E402
from palate.model.training import MIN_CALIBRATION, TrainConfig, train_reward_model  # noqa: E402
from tiny_lm import marker_pairs, tiny_base  # noqa: E402

FAST = dict(lora_layers=2, batch_tokens=1024, max_tokens=64, min_steps=0, members=1)


def test_fit_temperature_on_ratings_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logit = rng.normal(0.0, 3.0, 20000)  # reward - baseline
    good = (rng.random(logit.size) < 1 / (1 + np.exp(-logit / 2.5))).astype(float)
    assert fit_temperature(logit, good) == pytest.approx(2.5, rel=0.1)
    # Pairs are the special case "label 1": the same answer as without labels.
    d = rng.normal(1.0, 2.0, 500)
    assert fit_temperature(d, np.ones_like(d)) == pytest.approx(fit_temperature(d))
    with pytest.raises(ValueError):
        fit_temperature([1.0, 2.0], [1.0])


def test_ratings_only_users_get_a_fitted_temperature_and_offset() -> None:
    pairs = marker_pairs(160)
    ratings = [RatingExample(p.prompt, p.chosen, 1.0) for p in pairs[:80]]
    ratings += [RatingExample(p.prompt, p.rejected, 0.0) for p in pairs[80:]]
    res = train_reward_model(
        ratings, TrainConfig(epochs=3, lr=3e-3, eval_every=10, **FAST), base=tiny_base()
    )
    src = res.metrics["calibration_source"]
    assert src.startswith("validation ratings ("), src
    assert res.calibration.temperature != 1.0  # fitted, not the default
    assert res.calibration.offset == pytest.approx(res.metrics["running_baseline"])


def test_too_little_validation_data_leaves_t_at_one_and_says_so() -> None:
    # 20 examples, a 10% validation share: fewer than MIN_CALIBRATION validate.
    res = train_reward_model(
        marker_pairs(20), TrainConfig(epochs=2, lr=3e-3, **FAST), base=tiny_base()
    )
    assert res.data_summary["validation"] < MIN_CALIBRATION
    assert res.calibration.temperature == 1.0
    assert res.metrics["calibration_source"].startswith("none:")


def test_the_best_validation_checkpoint_is_the_model_returned() -> None:
    """A run that overfits (high learning rate, many passes, no early stop): the model
    returned is the one with the lowest validation loss, not the last one."""
    cfg = TrainConfig(
        epochs=12, lr=2e-2, eval_every=2, patience=1000, warmup_steps=0, val_fraction=0.3, **FAST
    )
    res = train_reward_model(marker_pairs(60), cfg, base=tiny_base())
    vals = [h for h in res.history if "val_loss" in h]
    best = min(vals, key=lambda h: h["val_loss"])
    assert res.metrics["best_step"] == best["step"] < res.metrics["steps"]
    assert vals[-1]["val_loss"] > best["val_loss"]  # the last checkpoint was worse
    assert res.metrics["val_loss"] == pytest.approx(best["val_loss"])
    # Pairs only, so the loss does not depend on the running baseline: re-evaluated on the
    # validation set (the calibration pass), the returned weights give the best loss.
    assert res.metrics["calibration_source"].startswith("validation pairs")
    assert res.metrics["calibration_loss"] == pytest.approx(best["val_loss"], rel=1e-4)
