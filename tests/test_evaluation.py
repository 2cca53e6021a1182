"""The evaluator against hand-computed values on small constructed inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from palate.evaluation.heldout import (
    PairRecord,
    RatingRecord,
    accuracy_stats,
    calibration,
    evaluate,
    fit_temperature,
    load_probes,
    paired_bootstrap,
    rating_auc,
    spearman,
)

# score_chosen, score_rejected, len_chosen, len_rejected, source, domain
SMALL = [
    PairRecord(1.0, 0.0, 10, 5, "a", "code", "p1"),  # right, chosen longer
    PairRecord(0.0, 1.0, 5, 10, "a", "prose", "p2"),  # wrong, chosen shorter
    PairRecord(1.0, 1.0, 7, 7, "b", "code", "p3"),  # tie: wrong, equal length
    PairRecord(2.0, 1.0, 3, 1, "b", "", "p4"),  # right, chosen longer
]


def test_ties_count_as_wrong_and_accuracy() -> None:
    m = evaluate(SMALL)
    assert m["n_pairs"] == 4 and m["correct"] == 2 and m["ties"] == 1
    assert m["accuracy"] == 0.5
    const = evaluate([PairRecord(0.3, 0.3, 1, 2, pair_id=str(i)) for i in range(10)])
    assert const["accuracy"] == 0.0  # a constant model is never right
    nan = evaluate([PairRecord(float("nan"), 0.0, 1, 2)])
    assert nan["accuracy"] == 0.0
    json.dumps(nan, allow_nan=False)


def test_wilson_interval_by_hand() -> None:
    s = accuracy_stats([True] * 8 + [False] * 2)
    # p=0.8, n=10, z=1.96: centre (0.8 + 0.19208)/1.38416, half 1.96*sqrt(0.016+0.0096)/1.38416
    centre, half = 0.99208 / 1.38416, 1.96 * math.sqrt(0.016 + 0.009604) / 1.38416
    assert s["ci_low"] == pytest.approx(centre - half, abs=1e-4)
    assert s["ci_high"] == pytest.approx(centre + half, abs=1e-4)
    assert accuracy_stats([])["accuracy"] is None


def test_length_baselines_and_length_controlled_accuracy() -> None:
    m = evaluate(SMALL)
    b = m["baselines"]
    assert b["always_longer"]["accuracy"] == 0.5  # p1, p4; the equal-length tie is wrong
    assert b["always_shorter"]["accuracy"] == 0.25  # p2
    assert b["best"] == "always_longer" and b["best_accuracy"] == 0.5
    lc = m["length_controlled"]
    assert lc["chosen_longer"]["n"] == 2 and lc["chosen_longer"]["accuracy"] == 1.0
    assert lc["chosen_shorter"]["n"] == 1 and lc["chosen_shorter"]["accuracy"] == 0.0
    assert lc["equal_length"] == 1
    assert lc["accuracy"] == 0.5 and lc["gap"] == 1.0


def test_slices_by_source_and_domain() -> None:
    m = evaluate(SMALL)
    assert m["by_source"]["a"]["n"] == 2 and m["by_source"]["a"]["accuracy"] == 0.5
    assert m["by_source"]["b"]["accuracy"] == 0.5
    assert m["by_domain"]["code"]["n"] == 2 and m["by_domain"]["code"]["accuracy"] == 0.5
    assert m["by_domain"]["(none)"]["accuracy"] == 1.0
    assert m["by_domain"]["prose"]["accuracy"] == 0.0


def test_calibration_ece_and_brier_by_hand() -> None:
    ln3 = math.log(3.0)
    # p = 0.75 for both pairs: bins 0.7-0.8 (p 0.75, all won) and 0.2-0.3 (p 0.25, none won).
    c = calibration([ln3, ln3], temperature=1.0)
    assert c["ece"] == pytest.approx(0.25)
    assert c["brier"] == pytest.approx(0.0625)
    assert c["nll"] == pytest.approx(math.log(4 / 3))
    # p = 0.75 and 0.25: each bin holds one win and one loss.
    c = calibration([ln3, -ln3], temperature=1.0)
    assert c["ece"] == pytest.approx(0.25)
    assert c["brier"] == pytest.approx((0.0625 + 0.5625) / 2)
    assert c["bins"][7] == {
        "lo": 0.7,
        "hi": 0.8,
        "n": 2,
        "mean_p": pytest.approx(0.75),
        "frac_chosen": 0.5,
    }
    # Temperature divides the diff; a coin-flip model (all ties) is perfectly calibrated at 0.5.
    assert calibration([2 * ln3], temperature=2.0)["brier"] == pytest.approx(0.0625)
    zero = calibration([0.0] * 6)
    assert zero["ece"] == pytest.approx(0.0) and zero["brier"] == pytest.approx(0.25)
    assert calibration([])["ece"] is None
    with pytest.raises(ValueError):
        calibration([1.0], temperature=0.0)


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 3.0, 20000)
    first_won = rng.random(x.size) < 1 / (1 + np.exp(-x / 2.0))
    diffs = np.where(first_won, x, -x)  # chosen - rejected
    assert fit_temperature(diffs) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature([]) == 1.0 and fit_temperature([0.0, 0.0]) == 1.0


def test_spearman_by_hand() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (-1, 1, -1, 1, 0): 1 - 6*4/(5*24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2], [1, 2]) is None


def test_auc_by_hand() -> None:
    assert rating_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert rating_auc([1.0, 1.0], [1, 0]) == pytest.approx(0.5)  # a tie counts one half
    assert rating_auc([3.0, 2.0, 1.0], [1.0, 0.7, 0.2]) == pytest.approx(1.0)  # soft labels
    assert rating_auc([1.0, 2.0], [1, 1]) is None
    m = evaluate(
        SMALL,
        [
            RatingRecord(0.1, 0, 3),
            RatingRecord(0.4, 0, 3),
            RatingRecord(0.35, 1, 3),
            RatingRecord(0.8, 1, 3),
        ],
    )
    r = m["ratings"]
    assert (r["n"], r["positives"], r["negatives"]) == (4, 2, 2)
    assert r["auc"] == pytest.approx(0.75)


def test_paired_bootstrap() -> None:
    same = paired_bootstrap([True, False] * 50, [True, False] * 50)
    assert same["diff"] == 0.0 and same["ci_low"] == 0.0 == same["ci_high"]
    c = np.array([True] * 80 + [False] * 20)
    d = np.array([True] * 60 + [False] * 40)
    r = paired_bootstrap(c, d, n_boot=4000, seed=3)
    assert r["wins"] == 20 and r["losses"] == 0 and r["diff"] == pytest.approx(0.2)
    assert r["ci_low"] <= r["lower_95"] < r["diff"] < r["ci_high"]
    assert r["lower_95"] > 0.1
    assert paired_bootstrap(c, d, n_boot=4000, seed=3) == r  # deterministic
    # Same distribution as resampling pair indices the slow way.
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 100, size=(4000, 100))
    naive = c[idx].mean(1) - d[idx].mean(1)
    assert r["lower_95"] == pytest.approx(float(np.quantile(naive, 0.05)), abs=0.02)
    with pytest.raises(ValueError):
        paired_bootstrap([True], [True, False])


def test_vs_deployed_is_paired_and_checks_the_pairs() -> None:
    dep = [
        PairRecord(0.0, 1.0, p.len_chosen, p.len_rejected, p.source, p.domain, p.pair_id)
        for p in SMALL
    ]
    m = evaluate(SMALL, deployed_pairs=dep)
    o = m["vs_deployed"]["overall"]
    assert (o["candidate_accuracy"], o["deployed_accuracy"], o["wins"]) == (0.5, 0.0, 2)
    assert set(m["vs_deployed"]["slices"]) == {
        "length:chosen_longer",
        "length:chosen_shorter",
        "source:a",
        "source:b",
        "domain:(none)",
        "domain:code",
        "domain:prose",
    }
    assert m["vs_deployed"]["slices"]["length:chosen_longer"]["diff"] == 1.0
    with pytest.raises(ValueError, match="same pairs"):
        evaluate(SMALL, deployed_pairs=dep[:3])
    with pytest.raises(ValueError, match="order"):
        evaluate(SMALL, deployed_pairs=dep[::-1])


def test_metrics_are_json_and_fingerprinted() -> None:
    m = evaluate(SMALL, [RatingRecord(0.2, 1, 40)], probes=[PairRecord(1, 0, 1, 1, "probe", "x")])
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert m["pairs_fingerprint"] == evaluate(SMALL[::-1])["pairs_fingerprint"]
    assert m["pairs_fingerprint"] != evaluate(SMALL[:3])["pairs_fingerprint"]
    assert m["length_bias"]["n"] == 9
    assert m["probes"]["accuracy"] == 1.0 and m["probes"]["by_category"]["x"]["n"] == 1
    assert evaluate([])["accuracy"] is None


def test_length_bias_sees_a_length_scorer() -> None:
    pairs = [PairRecord(float(lc), float(lr), lc, lr) for lc, lr in [(5, 9), (30, 2), (7, 70)]]
    assert evaluate(pairs)["length_bias"]["spearman"] == pytest.approx(1.0)


def test_probe_set_is_shipped_and_sane() -> None:
    probes = load_probes()
    assert 70 <= len(probes) <= 100
    cats = {p.category for p in probes}
    assert cats == {"arithmetic", "on_topic", "polite", "helpful", "honest", "code"} | {
        # adversarial and shifted (issue 16): agreeing with a false premise, padding instead
        # of answering, sounding sure instead of being right, code asked for vs prose
        "sycophancy",
        "verbose_non_answer",
        "confident_wrong",
        "code_prose_shift",
    }
    assert all(sum(p.category == c for p in probes) >= 5 for c in cats)
    assert len({p.id for p in probes}) == len(probes)
    assert all(p.prompt and p.chosen and p.rejected and p.chosen != p.rejected for p in probes)
    # Length must not solve the probes: always-longer stays near chance.
    recs = [p.record(0.0, 0.0) for p in probes]
    longer = evaluate(recs)["baselines"]["always_longer"]["accuracy"]
    assert 0.35 <= longer <= 0.65
    assert recs[0].source == "probe" and recs[0].domain == probes[0].category


# -- the cluster bootstrap and the ratings' AUC (mutation-testing survivors, killed) -------


def test_cluster_codes_by_hand() -> None:
    from palate.evaluation.heldout import cluster_codes

    assert cluster_codes(["a", "b", "a", "", "", "b"]).tolist() == [0, 1, 0, 2, 3, 1]


def test_cluster_bootstrap_resamples_every_cluster_and_whole_clusters() -> None:
    from palate.evaluation.heldout import cluster_bootstrap

    # Ten singletons, one of them 1: the replicates average 0.1 (cluster 0 is drawn too).
    boot = cluster_bootstrap([1.0] + [0.0] * 9, list(range(10)), n_boot=4000, seed=1)
    assert boot.shape == (4000,) and boot.mean() == pytest.approx(0.1, abs=0.01)
    assert boot.std() == pytest.approx(math.sqrt(0.09 / 10), rel=0.1)  # sqrt(p(1-p)/n)
    # The same 40 values as 10 clusters of 4 identical copies carry the information of 10
    # values, not 40: the spread is twice that of 40 independent items.
    rng = np.random.default_rng(0)
    v = rng.normal(size=10)
    clustered = cluster_bootstrap(np.repeat(v, 4), np.repeat(np.arange(10), 4), 4000, 2)
    independent = cluster_bootstrap(np.repeat(v, 4), np.arange(40), 4000, 2)
    assert clustered.std() == pytest.approx(2 * independent.std(), rel=0.15)
    with pytest.raises(ValueError):
        cluster_bootstrap([1.0, 2.0], [0])


def test_weighted_auc_with_unit_weights_is_the_auc_with_ties() -> None:
    from palate.evaluation.heldout import _weighted_auc

    s = np.array([0.3, 0.3, 0.1, 0.9, 0.3, 0.5])
    y = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    got = _weighted_auc(s, y, np.ones((1, s.size)))[0]
    assert got == pytest.approx(rating_auc(s, y))
    # Weight 2 on an item counts it twice.
    w = np.ones((1, s.size))
    w[0, 0] = 2.0
    twice = _weighted_auc(np.append(s, 0.3), np.append(y, True), np.ones((1, s.size + 1)))
    assert _weighted_auc(s, y, w)[0] == pytest.approx(twice[0])


def test_a_label_of_one_half_counts_as_good() -> None:
    assert rating_auc([1.0, 0.0], [0.5, 0.0]) == 1.0
    assert rating_auc([1.0, 0.0], [0.49, 0.0]) is None  # both bad: no AUC
