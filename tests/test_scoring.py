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


def _scorer(max_tokens: int = 64, streams: int = 1, cpu_forward: bool = True) -> Scorer:
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    model.head.weight = mx.random.normal((1, 64), key=mx.random.key(1))  # separates responses
    return Scorer(
        model,
        base.tokenizer,
        max_tokens,
        Calibration(0.5, 2.0, 1.5),
        n_streams=streams,
        cpu_forward=cpu_forward,
    )


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
    """Two MLX streams (the shards of one batch run in parallel) give the scores of one.

    On CPU a Scorer runs the numpy engine by default, which has no streams: the MLX path is
    forced here, and the numpy engine is held to the same scores."""
    prompt = "w1 w2 w3"
    responses = [f"w{i} w{i + 1}" for i in range(8)]
    one = _scorer(streams=1, cpu_forward=False)
    two = _scorer(streams=2, cpu_forward=False)
    assert one.engine is None and two.engine is None and len(two.streams) == 2
    a = one.raw_scores(prompt, responses)
    b = two.raw_scores(prompt, responses)
    np.testing.assert_allclose(a, b, atol=1e-4)
    engine = _scorer(streams=1)
    if engine.engine is not None:
        np.testing.assert_allclose(engine.raw_scores(prompt, responses), a, atol=1e-4)


def test_lora_dropout_does_not_make_scores_random() -> None:
    """LoRA dropout acts in training only: scoring twice gives the same scores, equal to the
    numpy engine's (which has no dropout), and the model is back in training mode after."""
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(layers=2, dropout=0.5), seed=0)
    model.head.weight = mx.random.normal((1, 64))
    for layer in model.layers[-2:]:  # non-zero LoRA B, so dropout on its input matters
        layer.self_attn.q_proj.lora_b = mx.random.normal(layer.self_attn.q_proj.lora_b.shape)
        layer.mlp.up_proj.lora_b = mx.random.normal(layer.mlp.up_proj.lora_b.shape)
    assert model.training
    sc = Scorer(model, base.tokenizer, 64, cpu_forward=False)
    responses = [f"w{i} w{i + 3} w{i + 5}" for i in range(6)]
    a = sc.raw_scores("w1 w2", responses)
    b = sc.raw_scores("w1 w2", responses)
    np.testing.assert_array_equal(a, b)
    assert model.training  # restored: training still drops out
    numpy = Scorer(model, base.tokenizer, 64)
    if numpy.engine is not None:
        np.testing.assert_allclose(numpy.raw_scores("w1 w2", responses), a, atol=1e-4)


def test_z_scores_and_probability() -> None:
    c = Calibration(mean=1.0, std=2.0, temperature=0.5)
    assert c.z(np.array([3.0]))[0] == pytest.approx(1.0)
    assert c.prob(1.0, 0.5) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert c.prob(0.5, 1.0) == pytest.approx(1 / (1 + math.exp(1.0)))
    # p(good) is taken against the rating baseline (the offset), at the same temperature.
    g = Calibration(temperature=2.0, offset=0.5)
    assert g.prob_good(1.5) == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert g.prob_good(-0.5) == pytest.approx(1 / (1 + math.exp(0.5)))
    assert g.prob_good(0.5) == 0.5
    # Far apart: 0 or 1, never an OverflowError from exp().
    assert c.prob(-1e6, 0.0) == 0.0 and c.prob(1e6, 0.0) == 1.0
    assert g.prob_good(-1e6) == 0.0 and g.prob_good(1e6) == 1.0


def test_score_many_keeps_empty_requests_in_place() -> None:
    sc = _scorer()
    prompt = "Human: " + " ".join(WORDS[:5])
    res = sc.score_many([(prompt, []), (prompt, ["w1 w2", "w3"]), ("w9", [])])
    assert [len(r.raw) for r in res] == [0, 2, 0]
    assert res[0].raw == [] and res[0].z == [] and res[0].truncated == []
    assert res[2].truncated == [] and res[1].truncated == [False, False]
    np.testing.assert_allclose(res[1].raw, sc.score(prompt, ["w1 w2", "w3"]).raw, atol=1e-5)
    # z against the calibration's mean 0.5 and std 2.0 (see _scorer)
    np.testing.assert_allclose(res[1].z, (np.array(res[1].raw) - 0.5) / 2.0, rtol=1e-6)


def test_fit_temperature_recovers_scale() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 3, 20000)
    won = rng.random(20000) < 1 / (1 + np.exp(-true_logit / 2.0))
    diffs = np.where(won, true_logit, -true_logit)  # diff of (first=winner) pairs
    assert fit_temperature(diffs) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(np.array([])) == 1.0
