"""Scoring: batch invariance, calibration, z-scores."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import math  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.evaluation.metrics import fit_temperature  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel  # noqa: E402
from palate.model.scoring import Calibration, Scorer  # noqa: E402
from tiny_lm import WORDS, tiny_base  # noqa: E402


def _scorer(max_tokens: int = 64, streams: int = 1) -> Scorer:
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    model.head.weight = mx.random.normal((1, 64))  # a head that separates responses
    return Scorer(model, base.tokenizer, max_tokens, Calibration(0.5, 2.0, 1.5), n_streams=streams)


def test_score_alone_equals_score_in_padded_batch() -> None:
    sc = _scorer()
    prompt = "Human: " + " ".join(WORDS[:9])
    responses = [" ".join(WORDS[i : i + k]) for i, k in [(0, 2), (5, 17), (3, 9), (20, 1)]]
    batch = sc.raw_scores(prompt, responses)
    alone = np.array([sc.raw_scores(prompt, [r])[0] for r in responses])
    np.testing.assert_allclose(batch, alone, atol=1e-4)
    other = sc.raw_scores(prompt, [responses[2], "w40 " * 30])[0]
    assert abs(other - alone[2]) < 1e-4
    many = sc.score_pairs([(prompt, responses[0], responses[1]), ("w7 w8", "w1", "w2 w3")])
    assert abs(many[0][0] - alone[0]) < 1e-4 and abs(many[1][0] - alone[1]) < 1e-4


def test_truncated_response_scored_independently_of_neighbours() -> None:
    sc = _scorer(max_tokens=24)
    prompt = "Human: " + " ".join(WORDS * 2)
    short, long = "w1 w2", " ".join(WORDS[:30])
    res = sc.score(prompt, [short, long])
    assert res.truncated == [True, True]
    assert abs(res.raw[0] - sc.raw_scores(prompt, [short])[0]) < 1e-4


def test_two_streams_same_scores() -> None:
    prompt = "w1 w2 w3"
    responses = [f"w{i} w{i + 1}" for i in range(8)]
    a = _scorer(streams=1).raw_scores(prompt, responses)
    b = _scorer(streams=2).raw_scores(prompt, responses)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_z_scores_and_probability() -> None:
    c = Calibration(mean=1.0, std=2.0, temperature=0.5)
    assert c.z(np.array([3.0]))[0] == pytest.approx(1.0)
    assert c.prob(1.0, 0.5) == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_fit_temperature_recovers_scale() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 3, 20000)
    won = rng.random(20000) < 1 / (1 + np.exp(-true_logit / 2.0))
    diffs = np.where(won, true_logit, -true_logit)  # diff of (first=winner) pairs
    assert fit_temperature(diffs) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(np.array([])) == 1.0
