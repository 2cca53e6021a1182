"""Each gate rule with constructed metric inputs: passes, rejects and holds, with reasons."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import pytest

from palate.evaluation.gate import Decision, GatePolicy, decide
from palate.evaluation.heldout import PairRecord, RatingRecord, evaluate
from palate.evaluation.metrics import wilson_interval


def _stats(n: int, acc: float) -> dict[str, Any]:
    k = round(n * acc)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci_low": lo, "ci_high": hi}


def _paired(n: int, cand: float, dep: float, lower: float) -> dict[str, Any]:
    return {
        "n": n,
        "candidate_accuracy": cand,
        "deployed_accuracy": dep,
        "diff": cand - dep,
        "ci_low": lower - 0.01,
        "ci_high": cand - dep + 0.05,
        "lower_95": lower,
        "wins": 10,
        "losses": 5,
        "n_boot": 2000,
    }


def metrics(
    *,
    n: int = 200,
    acc: float = 0.75,
    longer: float = 0.5,
    shorter: float = 0.45,
    lc: tuple[int, float, int, float] = (100, 0.76, 100, 0.74),
    rho: float | None = 0.1,
    probes: float | None = 0.9,
    fingerprint: str | None = "fp",
) -> dict[str, Any]:
    """A complete metrics dict with the given headline numbers (the shape evaluate returns)."""
    overall = _stats(n, acc)
    best = "always_longer" if longer >= shorter else "always_shorter"
    n_long, a_long, n_short, a_short = lc
    return {
        "schema_version": 1,
        "length_unit": "chars",
        "n_pairs": n,
        "n_ratings": 0,
        "pairs_fingerprint": fingerprint,
        "accuracy": overall["accuracy"],
        "accuracy_ci": [overall["ci_low"], overall["ci_high"]],
        "correct": overall["correct"],
        "ties": 0,
        "mean_margin": 0.5,
        "baselines": {
            "always_longer": _stats(n, longer),
            "always_shorter": _stats(n, shorter),
            "best": best,
            "best_accuracy": max(longer, shorter),
        },
        "length_controlled": {
            "chosen_longer": _stats(n_long, a_long),
            "chosen_shorter": _stats(n_short, a_short),
            "equal_length": 0,
            "accuracy": (a_long + a_short) / 2,
            "gap": a_long - a_short,
        },
        "by_source": {},
        "by_domain": {},
        "calibration": {
            "temperature": 1.0,
            "n": n,
            "ece": 0.03,
            "brier": 0.18,
            "nll": 0.5,
            "binning": "10 equal-width bins, symmetrised",
            "bins": [],
        },
        "length_bias": {"spearman": rho, "n": 2 * n},
        "ratings": {"n": 0, "positives": 0, "negatives": 0, "auc": None},
        "probes": _stats(48, probes) | {"by_category": {}} if probes is not None else None,
        "vs_deployed": None,
        "length_scatter": {"length": [], "score": []},
    }


def with_deployed(
    cand: dict[str, Any], dep_acc: float, lower: float, slices: dict[str, Any] | None = None
) -> dict[str, Any]:
    c = copy.deepcopy(cand)
    c["vs_deployed"] = {
        "overall": _paired(c["n_pairs"], c["accuracy"], dep_acc, lower),
        "slices": slices or {},
    }
    return c


def check(d: Decision, name: str) -> Any:
    (c,) = [c for c in d.checks if c.name == name]
    return c


def test_a_good_first_model_deploys_with_reasons() -> None:
    d = decide(metrics(), None, GatePolicy())
    assert d.action == "deploy"
    assert all(c.status in ("pass", "skip", "info") for c in d.checks)
    assert any("75.0% on 200 pairs" in r for r in d.reasons)
    assert any("No model is deployed yet" in r for r in d.reasons)
    j = json.loads(json.dumps(d.to_json()))
    assert j["action"] == "deploy" and j["reasons"] == d.reasons
    assert [c["name"] for c in j["checks"]] == [c.name for c in d.checks]


def test_not_enough_data_holds_and_says_so() -> None:
    d = decide(metrics(n=20, acc=0.9), None, GatePolicy())
    assert d.action == "hold"
    assert d.reasons[0].startswith("Not enough data yet: 20 held-out pairs")
    assert {c.name for c in d.checks} == {"enough_data", "probe_floor"}  # nothing else judged


def test_probes_are_judged_even_without_data_and_reject_wins() -> None:
    d = decide(metrics(n=20, probes=0.3), None, GatePolicy())
    assert d.action == "reject"
    assert "Probe-set accuracy is 29.2%" in d.reasons[0]
    assert any("Not enough data yet" in r for r in d.reasons)


def test_accuracy_floor_rejects() -> None:
    d = decide(metrics(n=2000, acc=0.53, longer=0.4, shorter=0.3), None, GatePolicy())
    assert d.action == "reject"
    assert check(d, "accuracy_floor").status == "fail"
    assert any("53.0% on 2000 pairs" in r and "floor is 55.0%" in r for r in d.reasons)


def test_above_chance_rejects_small_lucky_sets() -> None:
    # 60% on 50 pairs clears the 55% floor but its CI still includes a coin flip.
    d = decide(
        metrics(n=50, acc=0.6, longer=0.3, shorter=0.3, lc=(25, 0.6, 25, 0.6)), None, GatePolicy()
    )
    assert check(d, "accuracy_floor").status == "pass"
    assert check(d, "above_chance").status == "fail"
    assert d.action == "reject" and any("not above the 50%" in r for r in d.reasons)


def test_must_beat_the_best_trivial_baseline_by_a_margin() -> None:
    d = decide(metrics(acc=0.75, longer=0.72, shorter=0.2), None, GatePolicy())
    assert d.action == "reject"
    assert any("always-longer) at 72.0%" in r and "+3.0 pts" in r for r in d.reasons)
    ok = decide(metrics(acc=0.75, longer=0.70, shorter=0.2), None, GatePolicy())
    assert ok.action == "deploy"  # exactly the margin passes


def test_suspicious_accuracy_holds() -> None:
    d = decide(metrics(acc=0.99, lc=(100, 0.99, 100, 0.99)), None, GatePolicy())
    assert d.action == "hold"
    assert any("implausibly high" in r for r in d.reasons)
    off = decide(
        metrics(acc=0.99, lc=(100, 0.99, 100, 0.99)), None, GatePolicy(suspicious_accuracy=None)
    )
    assert off.action == "deploy"


def test_length_gap_rejects_a_length_shortcut() -> None:
    d = decide(metrics(lc=(100, 0.95, 100, 0.55)), None, GatePolicy())
    assert d.action == "reject"
    assert any("95.0% when the chosen response is longer and 55.0%" in r for r in d.reasons)
    small = decide(metrics(lc=(190, 0.95, 10, 0.1)), None, GatePolicy())
    assert check(small, "length_gap").status == "skip"
    assert "10 with it shorter" in check(small, "length_gap").message


def test_length_correlation_holds() -> None:
    d = decide(metrics(rho=0.71), None, GatePolicy())
    assert d.action == "hold"
    assert d.reasons == [check(d, "length_correlation").message]
    assert "+0.71" in d.reasons[0] and "±0.50" in d.reasons[0]
    assert decide(metrics(rho=-0.5), None, GatePolicy()).action == "deploy"


def test_overall_regression_rejects_only_a_significant_drop() -> None:
    # -5 pts with a bootstrap SE of 1.8 pts (lower bound -8 pts): z = -2.7, p = 0.003.
    cand = with_deployed(metrics(acc=0.70), dep_acc=0.75, lower=-0.08)
    d = decide(cand, metrics(acc=0.75), GatePolicy())
    assert d.action == "reject"
    c = check(d, "no_regression")
    assert c.status == "fail" and c.value == pytest.approx(-0.05)
    assert "70.0% vs 75.0% (-5.0 pts" in d.reasons[0] and "significantly worse" in d.reasons[0]
    # The same 1-pt dip an equal retrain shows on a bad night is noise, not a regression
    # (the old fixed -2 pts bound on the lower 95% bound rejected it).
    noise = with_deployed(metrics(acc=0.74), dep_acc=0.75, lower=-0.045)
    assert decide(noise, metrics(acc=0.75), GatePolicy()).action == "deploy"
    # A tolerance forgives drops up to its size: -5 pts is within 6 pts.
    lenient = decide(cand, metrics(acc=0.75), GatePolicy(overall_regression_tolerance=0.06))
    assert lenient.action == "deploy"
    # The p-value is the normal tail at the bootstrap SE: p = Phi(-0.05 / se).
    se = 0.03 / 1.6449
    assert f"p = {0.5 * math.erfc(0.05 / se / math.sqrt(2)):.3g}" in c.message


def test_the_log_loss_comparison_catches_what_accuracy_misses() -> None:
    cand = with_deployed(metrics(acc=0.74), dep_acc=0.75, lower=-0.045)
    cand["vs_deployed"]["overall"]["logloss"] = {
        "n": 200,
        "candidate": 0.60,
        "deployed": 0.55,
        "diff": -0.05,
        "se": 0.015,
    }
    d = decide(cand, metrics(acc=0.75), GatePolicy())
    assert d.action == "reject"
    assert check(d, "no_regression").status == "pass"
    ll = check(d, "no_regression_logloss")
    assert ll.status == "fail" and "0.600 vs 0.550 nats" in ll.message
    # Holm over the 2 tests on all pairs: the adjusted p is twice the smaller p.
    p = 0.5 * math.erfc(0.05 / 0.015 / math.sqrt(2))
    assert f"p = {p:.3g}, {2 * p:.3g} after Holm's correction over the 2 test(s)" in ll.message
    ok = decide(cand, metrics(acc=0.75), GatePolicy(logloss_regression_tolerance=0.06))
    assert ok.action == "deploy"


def test_slices_are_corrected_for_multiple_comparisons() -> None:
    # One slice 2.6 pts worse than its tolerance with SE 1.6 pts: p = 0.052 -> rejected at 0.1.
    one = {"source:a": _paired(100, 0.704, 0.75, -0.046 - 1.6449 * 0.016)}
    slices_one = with_deployed(metrics(acc=0.76), 0.75, 0.0, slices=one)
    d1 = decide(slices_one, metrics(acc=0.75), GatePolicy())
    assert check(d1, "no_regression[source:a]").status == "fail"
    # Three such slices: Holm's step-down needs p <= 0.1/3 for the smallest; none is.
    three = {f"source:{k}": one["source:a"] for k in "abc"}
    d3 = decide(with_deployed(metrics(acc=0.76), 0.75, 0.0, three), metrics(acc=0.75), GatePolicy())
    assert d3.action == "deploy"
    assert all(check(d3, f"no_regression[source:{k}]").status == "pass" for k in "abc")
    assert "over the 3 test(s) on slices" in check(d3, "no_regression[source:a]").message
    # A slice that holds every pair is the whole set: not tested twice.
    every = {"source:all": _paired(200, 0.70, 0.75, -0.08)}
    de = decide(with_deployed(metrics(acc=0.76), 0.75, 0.0, every), metrics(), GatePolicy())
    assert check(de, "no_regression[source:all]").status == "skip"


def test_slice_regression_rejects_only_slices_big_enough_to_judge() -> None:
    slices = {
        "source:editor": _paired(80, 0.6, 0.75, -0.25),
        "domain:code": _paired(12, 0.2, 0.9, -0.9),
    }
    cand = with_deployed(metrics(acc=0.76), dep_acc=0.75, lower=0.0, slices=slices)
    d = decide(cand, metrics(acc=0.75), GatePolicy())
    assert d.action == "reject"
    assert check(d, "no_regression[source:editor]").status == "fail"
    assert check(d, "no_regression[domain:code]").status == "skip"
    assert d.reasons == [check(d, "no_regression[source:editor]").message]
    assert "source 'editor' (80 pairs)" in d.reasons[0]
    lenient = decide(cand, metrics(acc=0.75), GatePolicy(min_slice_pairs=100))
    assert lenient.action == "deploy"


def test_a_large_jump_holds() -> None:
    cand = with_deployed(metrics(acc=0.85, lc=(100, 0.85, 100, 0.85)), dep_acc=0.65, lower=0.15)
    d = decide(cand, metrics(acc=0.65), GatePolicy())
    assert d.action == "hold"
    assert d.reasons == [check(d, "jump").message]
    assert "+20.0 pts" in d.reasons[0]


def test_reject_wins_over_hold() -> None:
    slices = {"source:x": _paired(60, 0.5, 0.8, -0.4)}
    cand = with_deployed(metrics(acc=0.9, lc=(100, 0.9, 100, 0.9)), 0.6, 0.2, slices)
    d = decide(cand, metrics(acc=0.6), GatePolicy())
    assert d.action == "reject"
    assert check(d, "jump").status == "fail"
    assert len(d.reasons) == 2 and "source 'x'" in d.reasons[0] and "+30.0 pts" in d.reasons[1]


def test_probe_accuracy_must_not_drop() -> None:
    cand = with_deployed(metrics(probes=0.85), 0.75, 0.0)
    d = decide(cand, metrics(probes=0.95), GatePolicy())
    assert d.action == "reject"
    assert any("deployed model's 95.8%" in r for r in d.reasons)
    small_drop = decide(
        with_deployed(metrics(probes=0.9), 0.75, 0.0), metrics(probes=0.92), GatePolicy()
    )
    assert small_drop.action == "deploy"  # one probe pair (2.1 pts) is within tolerance
    floor = decide(metrics(probes=0.29), None, GatePolicy())  # 14/48: upper bound 41%
    assert floor.action == "reject" and check(floor, "probe_floor").status == "fail"
    assert "even its upper 95% bound" in check(floor, "probe_floor").message


def test_probes_at_chance_are_noise_not_a_broken_model() -> None:
    """A model trained on a taste the probes know nothing of scores near 50% on them; the
    floor must not reject it on a coin flip (the month on the embedded model: 35-39 of 80,
    every night rejected by a fixed 50% bound). Clearly below chance still rejects."""
    near = decide(metrics(probes=0.44), None, GatePolicy())  # 21/48: upper bound 56%
    assert check(near, "probe_floor").status == "pass" and near.action == "deploy"
    assert "within the noise" in check(near, "probe_floor").message
    assert check(decide(metrics(probes=0.9), None, GatePolicy()), "probe_floor").status == "pass"


def test_missing_probes_hold() -> None:
    d = decide(metrics(probes=None), None, GatePolicy())
    assert d.action == "hold" and "No probe-set results" in d.reasons[0]


def test_uncomparable_inputs_hold() -> None:
    no_pairing = decide(metrics(), metrics(), GatePolicy())
    assert no_pairing.action == "hold"
    assert "no paired comparison" in no_pairing.reasons[0]
    other_set = decide(
        with_deployed(metrics(), 0.75, 0.0), metrics(fingerprint="other"), GatePolicy()
    )
    assert other_set.action == "hold" and "different held-out sets" in other_set.reasons[0]


def test_end_to_end_with_evaluate() -> None:
    """The real evaluator's output is what the gate reads."""
    pairs, dep = [], []
    for i in range(300):
        lc, lr = (100 + i % 7, 80) if i % 2 else (60, 90 + i % 5)
        good = i % 5 != 0  # 80% right; the deployed model 70%, never better on a pair
        pairs.append(PairRecord(1.0 if good else -1.0, 0.0, lc, lr, "s", "d", f"e{i}"))
        dep_good = i % 5 != 0 and i % 10 != 1
        dep.append(PairRecord(1.0 if dep_good else -1.0, 0.0, lc, lr, "s", "d", f"e{i}"))
    probe = [PairRecord(1.0, 0.0, 5, 5, "probe", "x", f"p{i}") for i in range(40)]
    dep_m = evaluate(dep, probes=probe)
    cand_m = evaluate(pairs, probes=probe, deployed_pairs=dep)
    d = decide(cand_m, dep_m, GatePolicy())
    assert d.action == "deploy", d.reasons
    worse = decide(evaluate(dep, probes=probe, deployed_pairs=pairs), cand_m, GatePolicy())
    assert worse.action == "reject"


def test_policy_documents_every_knob() -> None:
    from dataclasses import fields

    for f in fields(GatePolicy):
        assert f.metadata.get("help"), f.name
    assert GatePolicy().to_json()["min_heldout_pairs"] == 50


def test_zero_minimum_judges_what_little_there_is() -> None:
    """min_heldout_pairs=0 means "never hold for lack of data": with no pairs only the
    probes decide; one right pair is judged by every rule (and fails above-chance)."""
    none = decide(evaluate([]), None, GatePolicy(min_heldout_pairs=0))
    assert none.action == "hold" and check(none, "enough_data").status == "pass"
    assert {c.name for c in none.checks} == {"enough_data", "probes"}  # no probes: hold
    probed = decide(evaluate([], probes=PROBES), None, GatePolicy(min_heldout_pairs=0))
    assert probed.action == "deploy"
    assert {c.name for c in probed.checks} == {"enough_data", "probe_floor", "probe_categories"}
    one = decide(
        evaluate([PairRecord(1.0, 0.0, 1, 2, pair_id="a")], probes=PROBES),
        None,
        GatePolicy(min_heldout_pairs=0),
    )
    assert check(one, "enough_data").status == "pass"
    assert check(one, "above_chance").status == "fail"  # Wilson low of 1/1 is 0.21
    assert one.action == "reject"


PROBES = [PairRecord(1.0, 0.0, 5, 5, "probe", "x", f"p{i}") for i in range(48)]


def test_probe_slack_is_whole_probes() -> None:
    """The doc promises slack for two of the 48 probes: 4 pts is 1.92 probes, rounded up."""
    dep = metrics(probes=1.0)
    two = with_deployed(metrics(probes=46 / 48), 0.75, 0.0)
    assert decide(two, dep, GatePolicy()).action == "deploy"
    c = check(decide(two, dep, GatePolicy()), "probe_drop")
    assert "2 probe(s) lost" in c.message and "at most 2 of 48" in c.message
    three = with_deployed(metrics(probes=45 / 48), 0.75, 0.0)
    d = decide(three, dep, GatePolicy())
    assert d.action == "reject" and check(d, "probe_drop").status == "fail"


# -- ratings ----------------------------------------------------------------------------


def ratings(n: int, auc_signal: float, seed: int = 0, length_signal: float = 0.0) -> list[Any]:
    """n ratings, half good: score = signal * label + noise; length optionally tracks the
    label too (a length rule then separates them)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    score = auc_signal * y + rng.normal(size=n)
    length = (100 + 300 * length_signal * y + rng.integers(0, 100, n)).astype(int)
    return [
        RatingRecord(float(score[i]), float(y[i]), int(length[i]), "tabby", "", f"r{i}", f"c{i}")
        for i in range(n)
    ]


def test_a_user_who_only_sends_ratings_is_judged() -> None:
    """Continue, Tabby and voice send only ratings: the gate must not say "not enough data"
    forever. A model whose scores separate good from bad deploys."""
    m = evaluate([], ratings(300, 1.5), probes=PROBES)
    d = decide(m, None, GatePolicy())
    assert d.action == "deploy", d.reasons
    assert check(d, "enough_data").status == "pass"
    msg = check(d, "enough_data").message
    assert msg.startswith("300 held-out ratings (150 good, 150 bad)")
    assert "Pairs: 0 held out, 50 needed" in msg
    assert check(d, "rating_above_chance").status == "pass"
    assert check(d, "rating_beats_length").status == "pass"
    assert "Calibration on the held-out ratings" in check(d, "calibration").message
    # Too few ratings: hold, and the message says how many are needed.
    few = decide(evaluate([], ratings(60, 1.5), probes=PROBES), None, GatePolicy())
    assert few.action == "hold" and "judged with at least 100" in few.reasons[0]


def test_ratings_at_chance_or_explained_by_length_reject() -> None:
    chance = decide(evaluate([], ratings(300, 0.0, seed=1), probes=PROBES), None, GatePolicy())
    assert chance.action == "reject"
    assert check(chance, "rating_above_chance").status == "fail"
    # Scores that track the label no better than length does.
    by_len = decide(
        evaluate([], ratings(300, 1.0, length_signal=1.0), probes=PROBES), None, GatePolicy()
    )
    assert by_len.action == "reject"
    c = check(by_len, "rating_beats_length")
    assert c.status == "fail" and "longer is better" in c.message


def test_ratings_are_compared_with_the_deployed_model() -> None:
    good, bad = ratings(400, 2.0, seed=3), ratings(400, 0.5, seed=3)
    dep_m = evaluate([], good, probes=PROBES)
    worse = evaluate([], bad, probes=PROBES, deployed_ratings=good)
    d = decide(worse, dep_m, GatePolicy())
    assert d.action == "reject"
    c = check(d, "no_regression_ratings")
    assert c.status == "fail" and c.value is not None and c.value < -0.1
    same = evaluate([], good, probes=PROBES, deployed_ratings=good)
    assert decide(same, dep_m, GatePolicy()).action == "deploy"
    # No paired comparison on the ratings: cannot rule out a regression.
    unpaired = decide(evaluate([], good, probes=PROBES), dep_m, GatePolicy())
    assert unpaired.action == "hold" and "same ratings" in unpaired.reasons[0]


def test_probe_categories_are_reported_weakest_first_with_the_ensembles_doubt() -> None:
    probes = [PairRecord(1.0, 0.0, 5, 5, "probe", "easy", f"e{i}") for i in range(8)] + [
        PairRecord(0.0 if i < 6 else 1.0, 0.5, 5, 5, "probe", "sycophancy", f"s{i}")
        for i in range(8)
    ]
    m = evaluate([], probes=probes)
    m["ensemble"] = {
        "probes": {
            "by_category": {
                "easy": {"n": 8, "accuracy": 1.0, "mean_spread": 0.1, "unsure": 0},
                "sycophancy": {"n": 8, "accuracy": 0.25, "mean_spread": 1.7, "unsure": 5},
            }
        }
    }
    info = check(decide(m, None, GatePolicy(min_heldout_pairs=0)), "probe_categories")
    assert info.status == "info" and info.on_fail == "none" and info.value == 0.25
    assert info.message.index("sycophancy 25") < info.message.index("easy 100")
    assert "disagree most on: sycophancy (spread 1.70)" in info.message


# -- killed mutants (docs/reliability.md, mutation testing) -------------------------------


def test_holm_by_hand() -> None:
    from palate.evaluation.gate import _holm

    # Sorted p = 0.01, 0.04, 0.045 over m = 3: 3 * 0.01, max(0.03, 2 * 0.04), max(0.08, 0.045).
    assert _holm([0.01, 0.04, 0.045]) == pytest.approx([0.03, 0.08, 0.08])
    assert _holm([0.04, 0.01]) == pytest.approx([0.04, 0.02])  # order of the input kept
    assert _holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1
    assert _holm([]) == []


def test_checks_record_their_value_and_threshold() -> None:
    """The registry keeps each check's number and bound (the report and `palate models`
    show them), not only the sentence."""
    d = decide(metrics(acc=0.75, longer=0.5, shorter=0.45), None, GatePolicy())
    assert (check(d, "accuracy_floor").value, check(d, "accuracy_floor").threshold) == (
        0.75,
        0.55,
    )
    above = check(d, "above_chance")
    assert above.value == pytest.approx(_stats(200, 0.75)["ci_low"]) and above.threshold == 0.5
    base = check(d, "beats_baselines")
    assert base.value == pytest.approx(0.25) and base.threshold == 0.05
    sus = check(d, "suspicious_accuracy")
    assert (sus.value, sus.threshold) == (0.75, 0.98)
    m = evaluate([], ratings(300, 1.5), probes=PROBES)
    r = decide(m, None, GatePolicy())
    rc = check(r, "rating_above_chance")
    assert rc.value == m["ratings"]["ci_low"] and rc.threshold == 0.5
    rb = check(r, "rating_beats_length")
    assert rb.value == pytest.approx(m["ratings"]["auc"] - m["ratings"]["length_auc"])
    assert rb.threshold == 0.02
    assert "95% CI of the difference" in rb.message and "95% CI" in rc.message


def test_thresholds_are_inclusive_where_documented() -> None:
    # Exactly at the suspicious bound holds ("at or above").
    at = decide(metrics(acc=0.98, lc=(100, 0.98, 100, 0.98)), None, GatePolicy())
    assert check(at, "suspicious_accuracy").status == "fail"
    # An AUC whose lower bound is exactly 0.5 is not above chance.
    m = evaluate([], ratings(300, 1.5), probes=PROBES)
    m["ratings"]["ci_low"] = 0.5
    assert check(decide(m, None, GatePolicy()), "rating_above_chance").status == "fail"
    # The accuracy comparison's message carries its interval.
    cand = with_deployed(metrics(acc=0.70), dep_acc=0.75, lower=-0.08)
    c = check(decide(cand, metrics(acc=0.75), GatePolicy()), "no_regression")
    assert "; 95% CI -9.0 pts to " in c.message


def test_slice_labels() -> None:
    from palate.evaluation.gate import _slice_label

    assert _slice_label("length:chosen_longer") == "pairs where the chosen response is longer"
    assert _slice_label("source:a:b") == "source 'a:b'"  # a name may hold a colon
