"""Ensembles on a tiny random llama: identical members are certain, trained members differ,
the numpy and MLX paths agree on every member, artifacts keep members and offsets."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.model import artifacts  # noqa: E402
from palate.model.batching import RatingExample  # noqa: E402
from palate.model.ensemble import bootstrap_weights  # noqa: E402
from palate.model.losses import LossInputs, ensemble_loss, preference_loss  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel  # noqa: E402
from palate.model.scoring import Calibration, Scorer  # noqa: E402
from palate.model.training import TrainConfig, train_reward_model  # noqa: E402
from tiny_lm import WORDS, marker_pairs, tiny_base  # noqa: E402

PROMPT = "Human: " + " ".join(WORDS[:7])
RESPONSES = [" ".join(WORDS[i : i + k]) for i, k in [(0, 3), (4, 9), (2, 5), (11, 1)]]


def _model(members: int, rows: np.ndarray | None = None) -> tuple[RewardModel, object]:
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0, members=members)
    if rows is not None:
        model.head.weight = mx.array(rows.astype(np.float32))
        model.head.bias = mx.zeros((members,))
    return model, base


def test_uncertainty_is_zero_when_every_member_is_the_same_head() -> None:
    row = np.random.default_rng(1).normal(size=(1, 64))
    single, base = _model(1, row)
    same, _ = _model(3, np.repeat(row, 3, axis=0))
    for cpu in (True, False):
        one = Scorer(single, base.tokenizer, 64, cpu_forward=cpu).score(PROMPT, RESPONSES)  # type: ignore[attr-defined]
        three = Scorer(same, base.tokenizer, 64, cpu_forward=cpu).score(PROMPT, RESPONSES)  # type: ignore[attr-defined]
        assert three.uncertainty == [0.0] * len(RESPONSES)
        assert one.uncertainty == [0.0] * len(RESPONSES)
        np.testing.assert_allclose(three.raw, one.raw, atol=1e-5)
        assert np.asarray(three.members).shape == (len(RESPONSES), 3)


def test_different_members_disagree_and_both_paths_agree() -> None:
    rows = np.random.default_rng(2).normal(size=(4, 64))
    model, base = _model(4, rows)
    cpu = Scorer(model, base.tokenizer, 64, cpu_forward=True)  # type: ignore[attr-defined]
    mlx = Scorer(model, base.tokenizer, 64, cpu_forward=False)  # type: ignore[attr-defined]
    assert cpu.engine is not None and mlx.engine is None
    a, b = cpu.score(PROMPT, RESPONSES), mlx.score(PROMPT, RESPONSES)
    np.testing.assert_allclose(a.members, b.members, atol=1e-4)
    m = np.asarray(a.members)
    np.testing.assert_allclose(a.raw, m.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(a.uncertainty, m.std(axis=1), atol=1e-6)
    assert min(a.uncertainty) > 0
    # Per-member offsets are taken out of the spread, not out of the score.
    offsets = tuple(float(x) for x in m.mean(axis=0))
    shifted = Scorer(model, base.tokenizer, 64, Calibration(member_offsets=offsets))  # type: ignore[attr-defined]
    c = shifted.score(PROMPT, RESPONSES)
    assert c.raw == pytest.approx(a.raw)
    np.testing.assert_allclose(c.uncertainty, (m - np.array(offsets)).std(axis=1), atol=1e-6)


def test_bootstrap_weights_are_seeded_resamples() -> None:
    w = bootstrap_weights(2000, 5, seed=3)
    assert w.shape == (5, 2000) and w.min() >= 0
    assert np.all(np.abs(w.mean(axis=1) - 1.0) < 0.1)  # Poisson(1): the data set's size
    assert (w == 0).mean() == pytest.approx(np.exp(-1), abs=0.03)  # ~37% left out per member
    assert np.array_equal(w, bootstrap_weights(2000, 5, seed=3))
    assert not np.array_equal(w[0], w[1])
    assert np.array_equal(bootstrap_weights(7, 1, seed=3), np.ones((1, 7)))


def test_ensemble_loss_of_identical_members_is_the_single_loss() -> None:
    r = mx.array(np.random.default_rng(4).normal(size=6).astype(np.float32))
    li = LossInputs(
        pair_idx=mx.array([[0, 1], [2, 3]]),
        margin=mx.array([0.0, 0.5]),
        pair_weight=mx.array([1.0, 2.0]),
        rating_idx=mx.array([4, 5]),
        label=mx.array([1.0, 0.0]),
        rating_weight=mx.array([1.0, 1.0]),
    )
    single = preference_loss(r, li, 0.1, 0.01, 5.0, 6.0)
    ones = (mx.ones((2, 3)), mx.ones((2, 3)))
    stacked = mx.stack([r, r, r], axis=1)
    ens = ensemble_loss(
        stacked, LossInputs(**{**li.__dict__, "member_weight": ones}), 0.1, 0.01, 5.0, 6.0
    )
    assert float(ens.loss) == pytest.approx(float(single.loss), rel=1e-6)
    # A member that never sees pair 1 (bootstrap weight 0) is not pushed by it.
    drop = (mx.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), mx.ones((2, 3)))
    ens2 = ensemble_loss(
        stacked, LossInputs(**{**li.__dict__, "member_weight": drop}), 0.1, 0.01, 5.0, 6.0
    )
    assert float(ens2.loss) < float(ens.loss)


def test_trained_ensemble_members_differ_and_round_trip(tmp_path: object) -> None:
    base = tiny_base()
    cfg = TrainConfig(
        lora_layers=2,
        lr=3e-3,
        batch_tokens=1024,
        max_tokens=64,
        eval_every=10,
        min_steps=20,
        members=3,
    )
    # pairs and thumbs (ratings, as editors and voice send them) in one run
    pairs = marker_pairs(120)
    ratings = [
        RatingExample(p.prompt, p.chosen if i % 2 else p.rejected, float(i % 2))
        for i, p in enumerate(marker_pairs(40, seed=7))
    ]
    res = train_reward_model([*pairs, *ratings], cfg, base=base)
    assert res.model.members == 3 and len(res.calibration.member_offsets) == 3
    assert res.data_summary["ratings"] == 40
    heads = np.asarray(res.model.head.weight)
    assert heads.shape == (3, 64) and not np.allclose(heads[0], heads[1])
    art = artifacts.artifact_from_model(
        res.model,
        artifacts.build_config(base, cfg.lora(), 64, res.calibration, train_config=cfg.to_json()),
    )
    assert art.config["ensemble"]["members"] == 3 and art.config["head"]["outputs"] == 3
    loaded = artifacts.load_model(artifacts.from_bytes(artifacts.to_bytes(art)), base)
    assert loaded.calibration.member_offsets == pytest.approx(res.calibration.member_offsets)
    test = marker_pairs(30, seed=9)
    before = Scorer(res.model, base.tokenizer, 64, res.calibration).score(
        test[0].prompt, [test[0].chosen, test[0].rejected]
    )
    after = loaded.scorer().score(test[0].prompt, [test[0].chosen, test[0].rejected])
    assert after.raw == before.raw and after.uncertainty == before.uncertainty
    assert max(after.uncertainty) > 0
    # Accuracy of the mean is what the trainer reports and the gate judges.
    a, b = loaded.scorer().score_pairs([(e.prompt, e.chosen, e.rejected) for e in test])
    am, bm = loaded.scorer().score_pairs_members([(e.prompt, e.chosen, e.rejected) for e in test])
    np.testing.assert_allclose(a, am.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(b, bm.mean(axis=1), atol=1e-6)
    assert am.shape == (30, 3)


def test_coverage_accuracy_puts_the_surest_pairs_first() -> None:
    from palate.evaluation.selective import coverage_accuracy, pair_confidence, selective_report

    # 3 members; pairs 0-3 agreed and right, 4-5 split (one of them wrong), 6-7 agreed but wrong
    chosen = np.array(
        [
            [3, 3, 3],
            [2, 2, 2],
            [2.5, 2, 3],
            [4, 4, 4],
            [1, -1, 0.5],
            [1, -2, -1],
            [-1, -1, -1],
            [-0.5, -0.5, -0.5],
        ],
        dtype=np.float64,
    )
    rejected = np.zeros_like(chosen)
    mean, conf = pair_confidence(chosen, rejected)
    assert list(np.argsort(-conf)[:4]) == [3, 0, 2, 1]
    assert conf[4] < 0 and conf[5] < 0  # the members' bounds straddle zero
    curve = coverage_accuracy(mean > 0, conf)
    assert curve[-1] == [1.0, 0.625] and curve[4] == [0.5, 1.0]
    rep = selective_report(chosen, rejected, 1.0, categories=["x"] * 4 + ["y"] * 4)
    assert rep["members"] == 3 and rep["selective_accuracy_50"] == 1.0
    assert rep["by_category"]["y"]["unsure"] == 2 and rep["by_category"]["x"]["unsure"] == 0
    assert rep["by_category"]["y"]["mean_spread"] > rep["by_category"]["x"]["mean_spread"] - 1
    # One member: confidence is the margin alone, and the spread is 0.
    single = selective_report(chosen[:, :1], rejected[:, :1], 1.0)
    assert single["members"] == 1 and single["mean_spread"] == 0.0
