"""Losses: BT with margin, BCE against a baseline, centering, ties counted wrong."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import math  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.model.losses import (  # noqa: E402
    LossInputs,
    ensemble_loss,
    length_correlation,
    preference_loss,
)


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


def _np_log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _by_hand(
    r: np.ndarray,
    pairs: list[tuple[int, int]],
    margin: list[float],
    pw: list[float],
    ratings: list[int],
    labels: list[float],
    rw: list[float],
    delta: float,
    center: float,
    weight_norm: float,
    rows_norm: float,
) -> tuple[float, float, int, int]:
    """preference_loss written out in numpy, term by term (the reference the mutants break)."""
    nll = 0.0
    correct = 0
    for (c, j), m, w in zip(pairs, margin, pw, strict=True):
        nll += -float(_np_log_sigmoid(np.float64(r[c] - r[j] - m))) * w
        correct += int(r[c] - r[j] > 0)
    for i, y, w in zip(ratings, labels, rw, strict=True):
        z = r[i] - delta
        nll += -(y * float(_np_log_sigmoid(z)) + (1 - y) * float(_np_log_sigmoid(-z))) * w
        correct += int(z != 0 and (z > 0) == (y >= 0.5))
    loss = nll / weight_norm + center * float((r * r).sum()) / rows_norm
    return loss, nll, correct, len(pairs) + len(ratings)


# Three pairs (not two: a pair count equal to the index width hides shape[0] vs shape[1]) with
# weights and margins; one pair ranked right by less than 1; fractional, zero and one-half
# labels; a rating exactly at the baseline (a tie); a wrong rating with a nonzero logit.
_R = np.array([2.0, 1.5, -1.0, 0.25, 3.0, 0.4, -0.7, 1.0], dtype=np.float32)
_CASE: dict = dict(
    pairs=[(0, 1), (2, 3), (4, 5)],
    margin=[0.0, 0.3, 1.0],
    pw=[1.0, 2.0, 0.5],
    ratings=[5, 6, 7, 1, 3],
    labels=[0.3, 0.0, 0.0, 0.5, 0.6],
    rw=[1.5, 0.25, 1.0, 2.0, 1.0],
    delta=1.0,
    center=0.05,
    weight_norm=9.25,
    rows_norm=8.0,
)


def _mx_inputs(case: dict) -> LossInputs:
    return LossInputs(
        pair_idx=mx.array(case["pairs"], dtype=mx.int32).reshape(-1, 2),
        margin=mx.array(case["margin"]),
        pair_weight=mx.array(case["pw"]),
        rating_idx=mx.array(case["ratings"], dtype=mx.int32),
        label=mx.array(case["labels"]),
        rating_weight=mx.array(case["rw"]),
    )


def test_preference_loss_by_hand_every_term() -> None:
    args = (_CASE["delta"], _CASE["center"], _CASE["weight_norm"], _CASE["rows_norm"])
    t = preference_loss(mx.array(_R), _mx_inputs(_CASE), *args)
    loss, nll, correct, count = _by_hand(_R.astype(np.float64), **_CASE)
    assert float(t.loss) == pytest.approx(loss, rel=1e-5)
    assert float(t.nll_sum) == pytest.approx(nll, rel=1e-5)
    # pairs: 0.5 > 0 right, -1.25 wrong, 2.6 right; ratings (logit, label): (-0.6, 0.3) right,
    # (-1.7, 0) right, (0, 0) a tie (wrong, though "not above 0" agrees with the label),
    # (0.5, 0.5) right (one half is good), (-0.75, 0.6) wrong.
    assert correct == 5 and int(t.correct) == 5
    assert int(t.count) == count == 8


def test_pairs_only_and_ratings_only_add_up_to_the_mixed_batch() -> None:
    args = (_CASE["delta"], 0.0, _CASE["weight_norm"], _CASE["rows_norm"])
    r = mx.array(_R)
    both = preference_loss(r, _mx_inputs(_CASE), *args)
    pairs_only = preference_loss(
        r, _mx_inputs({**_CASE, "ratings": [], "labels": [], "rw": []}), *args
    )
    ratings_only = preference_loss(
        r, _mx_inputs({**_CASE, "pairs": [], "margin": [], "pw": []}), *args
    )
    assert float(both.nll_sum) == pytest.approx(
        float(pairs_only.nll_sum) + float(ratings_only.nll_sum), rel=1e-6
    )
    assert int(pairs_only.count) == 3 and int(ratings_only.count) == 5
    assert int(pairs_only.correct) + int(ratings_only.correct) == int(both.correct)


def test_ensemble_loss_is_the_mean_of_each_members_bootstrap_loss() -> None:
    rng = np.random.default_rng(3)
    k = 3
    rk = (_R[:, None] + rng.normal(0, 0.5, (_R.size, k))).astype(np.float32)
    pm = rng.integers(0, 3, (3, k)).astype(np.float32)
    rm = rng.integers(0, 3, (5, k)).astype(np.float32)
    inputs = _mx_inputs(_CASE)
    inputs.member_weight = (mx.array(pm), mx.array(rm))
    args = (_CASE["delta"], _CASE["center"], _CASE["weight_norm"], _CASE["rows_norm"])
    t = ensemble_loss(mx.array(rk), inputs, *args)
    members = []
    for j in range(k):
        case = {
            **_CASE,
            "pw": list(np.array(_CASE["pw"]) * pm[:, j]),
            "rw": list(np.array(_CASE["rw"]) * rm[:, j]),
        }
        members.append(_by_hand(rk[:, j].astype(np.float64), **case)[0])
    assert float(t.loss) == pytest.approx(float(np.mean(members)), rel=1e-5)
    # The report is the member mean's plain (unresampled, uncentered) figures.
    _, nll, correct, count = _by_hand(rk.mean(axis=1).astype(np.float64), **_CASE)
    assert float(t.nll_sum) == pytest.approx(nll, rel=1e-5)
    assert int(t.correct) == correct and int(t.count) == count


def test_length_correlation_is_pearsons_r_of_the_member_mean() -> None:
    rng = np.random.default_rng(5)
    log_len = rng.normal(3.0, 1.0, 12).astype(np.float32)
    r = (0.7 * log_len + rng.normal(0, 1.0, 12)).astype(np.float32)
    want = float(np.corrcoef(r, log_len)[0, 1])
    assert float(length_correlation(mx.array(r), mx.array(log_len))) == pytest.approx(
        want, rel=1e-4
    )
    rk = np.stack([r + 1.0, r - 1.0, 3 * r], axis=1)  # member mean = (5/3) r: same r
    assert float(length_correlation(mx.array(rk), mx.array(log_len))) == pytest.approx(
        want, rel=1e-4
    )
    # Three rows are enough; two are not (0 by definition); constant lengths give 0.
    three = float(length_correlation(mx.array(r[:3]), mx.array(log_len[:3])))
    assert three == pytest.approx(float(np.corrcoef(r[:3], log_len[:3])[0, 1]), rel=1e-4)
    assert float(length_correlation(mx.array(r[:2]), mx.array(log_len[:2]))) == 0.0
    flat = float(length_correlation(mx.array(r), mx.array(np.full(12, 2.0, np.float32))))
    assert flat == pytest.approx(0.0, abs=1e-6)
