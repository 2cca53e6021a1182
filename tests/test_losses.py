"""Losses: BT with margin, BCE against a baseline, centering, ties counted wrong."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import math  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from palate.model.losses import LossInputs, preference_loss  # noqa: E402


def _inputs(
    pairs: list[tuple[int, int]], margin: list[float], ratings: list[int], labels: list[float]
) -> LossInputs:
    return LossInputs(
        pair_idx=mx.array(pairs, dtype=mx.int32).reshape(-1, 2),
        margin=mx.array(margin),
        pair_weight=mx.ones((len(pairs),)),
        rating_idx=mx.array(ratings, dtype=mx.int32),
        label=mx.array(labels),
        rating_weight=mx.ones((len(ratings),)),
    )


def test_bradley_terry_with_margin() -> None:
    r = mx.array([2.0, 1.0])
    t = preference_loss(r, _inputs([(0, 1)], [0.0], [], []), 0.0, 0.0, 1.0, 2.0)
    assert float(t.loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    t = preference_loss(r, _inputs([(0, 1)], [0.5], [], []), 0.0, 0.0, 1.0, 2.0)
    assert float(t.loss) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)


def test_ties_count_as_wrong() -> None:
    r = mx.array([1.0, 1.0, 3.0, 0.0])
    t = preference_loss(r, _inputs([(0, 1), (2, 3)], [0.0, 0.0], [], []), 0.0, 0.0, 2.0, 4.0)
    assert int(t.correct) == 1 and int(t.count) == 2


def test_bce_against_running_baseline_and_mixed_batch() -> None:
    r = mx.array([3.0, 1.0, 2.5])
    t = preference_loss(r, _inputs([(0, 1)], [0.0], [2], [1.0]), 2.0, 0.0, 2.0, 3.0)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.5))) / 2
    assert float(t.loss) == pytest.approx(expected, rel=1e-6)
    assert int(t.correct) == 2


def test_centering_term_and_shard_normalisation_add_up() -> None:
    r = mx.array([1.0, -3.0, 2.0, 0.5])
    whole = preference_loss(r, _inputs([(0, 1), (2, 3)], [0, 0], [], []), 0.0, 0.01, 2.0, 4.0)
    a = preference_loss(r[:2], _inputs([(0, 1)], [0], [], []), 0.0, 0.01, 2.0, 4.0)
    b = preference_loss(r[2:], _inputs([(0, 1)], [0], [], []), 0.0, 0.01, 2.0, 4.0)
    assert float(whole.loss) == pytest.approx(float(a.loss) + float(b.loss), rel=1e-6)
    no_c = preference_loss(r, _inputs([(0, 1), (2, 3)], [0, 0], [], []), 0.0, 0.0, 2.0, 4.0)
    assert float(whole.loss) - float(no_c.loss) == pytest.approx(0.01 * (1 + 9 + 4 + 0.25) / 4)
