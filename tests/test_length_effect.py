"""The length effect in the held-out metrics (issue 15): length_corr and the length-controlled
accuracy, on constructed scores whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from palate.evaluation.heldout import PairRecord, evaluate, length_effect


def test_a_brevity_shortcut_is_exposed() -> None:
    # A model that just prefers the shorter answer: right on every chosen-shorter pair, wrong
    # on every chosen-longer one. 3 of 4 pairs are chosen-shorter, so plain accuracy is 75%,
    # but the controlled accuracy is chance and the correlation is strongly negative.
    lc = np.array([10, 20, 30, 50], dtype=float)
    lr = np.array([40, 60, 90, 20], dtype=float)
    sc, sr = -lc / 10, -lr / 10
    le = length_effect(sc, sr, lc, lr)
    assert le["n_chosen_shorter"] == 3 and le["n_chosen_longer"] == 1
    assert le["accuracy_chosen_shorter"] == 1.0 and le["accuracy_chosen_longer"] == 0.0
    assert le["length_controlled_accuracy"] == 0.5
    assert le["length_corr"] == pytest.approx(-1.0)


def test_a_content_judge_has_no_length_effect() -> None:
    rng = np.random.default_rng(0)
    n = 400
    lc, lr = rng.integers(5, 500, n).astype(float), rng.integers(5, 500, n).astype(float)
    margin = rng.normal(1.0, 1.0, n)  # independent of the lengths
    le = length_effect(margin, np.zeros(n), lc, lr)
    assert abs(le["length_corr"]) < 0.15
    correct = margin > 0
    want = (correct[lc > lr].mean() + correct[lc < lr].mean()) / 2
    assert le["length_controlled_accuracy"] == pytest.approx(want)


def test_undefined_cases_are_none_and_ties_are_wrong() -> None:
    le = length_effect([1.0, 1.0], [1.0, 0.0], [5, 7], [3, 4])  # all chosen-longer, one tie
    assert le["accuracy_chosen_longer"] == 0.5 and le["n_chosen_shorter"] == 0
    assert le["accuracy_chosen_shorter"] is None and le["length_controlled_accuracy"] is None
    assert length_effect([1.0, 1.0, 1.0], [0.0] * 3, [5, 6, 7], [1, 1, 1])["length_corr"] is None
    with pytest.raises(ValueError, match="one length difference per margin"):
        length_effect([1.0], [0.0], [1, 2], [0, 0])


def test_evaluate_reports_the_length_keys() -> None:
    pairs = [
        PairRecord(1.0, 0.0, 10, 40, pair_id="a"),
        PairRecord(0.0, 1.0, 50, 20, pair_id="b"),
        PairRecord(2.0, 0.5, 5, 80, pair_id="c"),
        PairRecord(1.0, 0.0, 30, 30, pair_id="d"),  # equal length: in neither subset
    ]
    m = evaluate(pairs, n_boot=50)
    json.dumps(m, allow_nan=False)
    assert m["n_chosen_shorter"] == 2 and m["n_chosen_longer"] == 1
    assert m["accuracy_chosen_longer"] == 0.0 and m["accuracy_chosen_shorter"] == 1.0
    assert m["length_controlled_accuracy"] == m["length_controlled"]["accuracy"] == 0.5
    want = np.corrcoef([1.0, -1.0, 1.5, 1.0], [-30.0, 30.0, -75.0, 0.0])[0, 1]
    assert m["length_corr"] == pytest.approx(want) and want < -0.8
