"""The ensemble's numpy statistics computed by hand: bootstrap weights, mean and spread,
the information in a label (BALD), the rewarduq bounds rule and the review question's text.

These are what the socket layer and the review queue read; the MLX tests in
test_ensemble.py reach them only through trained models, where a wrong constant still
passes (found by mutation testing, docs/reliability.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from palate.model.ensemble import (
    Question,
    agreement,
    bootstrap_weights,
    bounds_separate,
    member_stats,
    pair_information,
    pick_question,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _h(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_two_members_are_two_resamples_and_one_is_the_data_as_is() -> None:
    two = bootstrap_weights(500, 2, seed=1)
    assert two.shape == (2, 500) and two.dtype == np.float32
    assert not np.array_equal(two[0], two[1])  # each member its own resample
    assert (two == 0).any() and (two >= 2).any()  # Poisson(1): some left out, some repeated
    one = bootstrap_weights(5, 1, seed=1)
    assert one.dtype == np.float32 and np.array_equal(one, np.ones((1, 5)))
    assert not np.array_equal(bootstrap_weights(500, 2, seed=2), two)


def test_member_stats_by_hand() -> None:
    members = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 6.0]], dtype=np.float32)
    mean, spread = member_stats(members)
    assert mean.dtype == np.float64 and spread.dtype == np.float64
    np.testing.assert_allclose(mean, [2.0, 2.0, 3.0])
    np.testing.assert_allclose(spread, [1.0, 0.0, 3.0])  # population std over 2 members
    # Offsets (each member's validation mean) move the spread, never the mean.
    mean_o, spread_o = member_stats(members, offsets=[0.0, 2.0])
    np.testing.assert_allclose(mean_o, mean)
    np.testing.assert_allclose(spread_o, [0.0, 1.0, 2.0])
    # One member, as a column or a flat vector: its score, no spread.
    for single in (np.array([[1.5], [-2.0]]), np.array([1.5, -2.0])):
        m1, s1 = member_stats(single)
        np.testing.assert_allclose(m1, [1.5, -2.0])
        assert np.array_equal(s1, [0.0, 0.0])


def test_pair_information_by_hand() -> None:
    t = 2.0
    a, b = np.array([3.0, -1.0, 1.0, 0.5]), np.array([1.0, 1.0, 0.5, 0.5])
    d = [2.0, -2.0, 0.5, 0.0]
    p_k = [_sig(x / t) for x in d]
    p_mean = _sig(sum(d) / 4 / t)
    info = _h(sum(p_k) / 4) - sum(_h(p) for p in p_k) / 4
    got = pair_information(a, b, t)
    assert got == pytest.approx((info, p_mean, (1 + 0 + 1 + 0.5) / 4), rel=1e-9)
    assert got[0] > 0.01
    # Members that agree give no information, however unsure they are.
    same = pair_information(np.full(4, 0.2), np.zeros(4), 1.0)
    assert same[0] == pytest.approx(0.0, abs=1e-12) and same[1] == pytest.approx(_sig(0.2))
    assert same[2] == 1.0
    # A temperature of zero is clamped, not a division by zero.
    cold = pair_information(np.array([1.0, -1.0]), np.zeros(2), 0.0)
    assert all(math.isfinite(x) for x in cold)
    assert cold[0] == pytest.approx(math.log(2), abs=1e-6)  # sure members, split 1-1


def test_agreement_is_the_share_on_the_means_side() -> None:
    assert agreement(0.8, 0.7) == 0.8
    assert agreement(0.25, 0.3) == 0.75
    assert agreement(0.4, 0.5) == 0.4  # p of exactly one half: a's side


def test_bounds_separate_by_hand() -> None:
    assert bounds_separate(3.0, 0.5, 1.0, 0.5)  # 2.5 > 1.5
    assert bounds_separate(1.0, 0.5, 3.0, 0.5)  # order does not matter
    assert not bounds_separate(2.0, 0.5, 1.0, 0.5)  # 1.5 == 1.5: touching is not separate
    assert not bounds_separate(3.0, 0.5, 1.0, 0.5, width=2.0)  # 2.0 < 3.0
    assert bounds_separate(3.0, 0.5, 1.0, 0.5, width=1.9)


def test_question_text_for_each_case() -> None:
    split = Question(a=0, b=1, info=0.2, p_a_over_b=0.5, votes_a=0.6, members=5)
    assert split.why() == (
        "the 5 ensemble members split 3-2 on which is better (expected information 0.200 nats)"
    )
    pair = Question(a=0, b=1, info=0.1, p_a_over_b=0.5, votes_a=0.5, members=2)
    assert pair.why().startswith("the 2 ensemble members split 1-1 on which is better")
    agree = Question(a=0, b=1, info=1e-4, p_a_over_b=0.55, votes_a=1.0, members=2)
    assert agree.why() == (
        "the 2 members agree; the closest call among the candidates (p(a beats b) = 0.55)"
    )
    one = Question(a=0, b=1, info=0.3, p_a_over_b=0.61, votes_a=1.0, members=1)
    assert one.why() == "the closest call among the candidates (p(a beats b) = 0.61)"


def test_pick_question_prefers_information_then_the_closest_call() -> None:
    # (0, 1) is the closest call but every member agrees on it; (0, 2) and (1, 2) split the
    # two members, (0, 2) a little more evenly.
    members = np.array([[0.05, 0.05], [0.0, 0.0], [3.0, -1.0]])
    q = pick_question(members, 1.0)
    assert q is not None and (q.a, q.b) == (0, 2) and q.members == 2
    p_k = [_sig(-2.95), _sig(1.05)]
    assert q.info == pytest.approx(_h(sum(p_k) / 2) - (_h(p_k[0]) + _h(p_k[1])) / 2)
    assert q.info > pick_question(members[1:], 1.0).info  # type: ignore[union-attr]
    assert q.p_a_over_b == pytest.approx(_sig(-0.95)) and q.votes_a == 0.5
    # One member: no information anywhere, so the closest call: (1, 2), 0.2 apart.
    single = pick_question(np.array([[3.0], [0.0], [0.2]]), 1.0)
    assert single is not None and (single.a, single.b) == (1, 2)
    flat = pick_question(np.array([3.0, 0.0, 0.2]), 1.0)  # a vector: one member each
    assert flat is not None and (flat.a, flat.b) == (1, 2) and flat.members == 1
    # Equally close calls: the first pair in order.
    tie = pick_question(np.array([[0.0], [1.0], [2.0]]), 1.0)
    assert tie is not None and (tie.a, tie.b) == (0, 1)
    # Two candidates are enough; one is not.
    two = pick_question(np.array([[1.0, 2.0], [0.0, 0.0]]), 1.0)
    assert two is not None and (two.a, two.b) == (0, 1)
    assert pick_question(np.array([[1.0, 2.0]]), 1.0) is None
