"""The evaluation gate: may this candidate replace the deployed model? A pure function.

``decide(candidate, deployed, policy)`` reads two metrics dicts from ``evaluation.evaluate``
and answers ``deploy``, ``reject`` or ``hold`` with every check it ran. No I/O and no clock,
so the same inputs always give the same verdict, and the registry can store the inputs next to
the decision and anyone can re-run it.

- ``reject``: the candidate is measurably not good enough (below a floor, no better than a
  trivial baseline, worse than the deployed model, length-gamed, or fails the probes). The
  deployed model keeps serving.
- ``hold``: the gate will not decide on its own: too little held-out data, a suspiciously large
  jump, inputs that cannot be compared, or a length correlation that may or may not be genuine.
  Nothing changes until the user looks (``palate deploy V`` is the recorded override).
- ``deploy``: every check passed.

Any failing reject-level check wins over hold-level ones: a model that is both suspicious and
worse is rejected. Each check's message is a sentence with its numbers; docs/evaluation.md
explains every knob of :class:`GatePolicy` and why its default is what it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from palate.evaluation.metrics import wilson_interval
from palate.evaluation.split import MIN_HELDOUT_PAIRS, heldout_status

#: One-sided 95%: the probe floor fails only when the probes are significantly below it.
PROBE_FLOOR_Z = 1.645

__all__ = ["Check", "Decision", "GatePolicy", "decide"]

Action = Literal["deploy", "reject", "hold"]
Status = Literal["pass", "fail", "skip", "info"]
Metrics = Mapping[str, Any]

_EPS = 1e-9  # float slack so "exactly at the threshold" passes
#: Held-out ratings enough to judge a model without pairs. A rating carries less than a pair
#: (it has no partner to be right about); with 100 ratings, 30+ of the rarer class, the 95%
#: interval of an AUC of 0.70 is about +-0.11, as wide as 50 pairs give an accuracy.
MIN_HELDOUT_RATINGS = 100


def _h(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GatePolicy:
    """Every gate knob, with its default and the reason beside it (docs/evaluation.md)."""

    min_heldout_pairs: int = _h(
        MIN_HELDOUT_PAIRS, "below this many held-out pairs the gate holds: 'not enough data yet'"
    )
    accuracy_floor: float = _h(0.55, "held-out pairwise accuracy must be at least this")
    require_above_chance: bool = _h(
        True, "the 95% Wilson lower bound of accuracy must exceed 50% (not a coin flip)"
    )
    baseline_margin: float = _h(
        0.05, "accuracy must beat the best of always-longer/always-shorter by this much"
    )
    min_heldout_ratings: int = _h(
        MIN_HELDOUT_RATINGS,
        "held-out ratings that are enough to judge on their own (users who send only ratings)",
    )
    min_rating_class: int = _h(
        15, "ratings are judged only with at least this many good AND this many bad ones"
    )
    rating_require_above_chance: bool = _h(
        True, "the 95% bootstrap lower bound of the ratings' AUC must exceed 0.5"
    )
    rating_baseline_margin: float = _h(
        0.02, "the ratings' AUC must beat the best length-only rule's AUC by this much"
    )
    min_slice_pairs: int = _h(
        50, "a source/domain/length slice is judged for regression only with this many pairs"
    )
    regression_alpha: float = _h(
        0.10,
        "family-wise level of the regression tests: a test rejects only when its one-sided "
        "p-value, Holm-adjusted over every test run against the deployed model, is <= this",
    )
    overall_regression_tolerance: float = _h(
        0.0,
        "accuracy drop (vs the deployed model, all pairs) that is never a regression; a "
        "larger drop rejects only when significant (regression_alpha)",
    )
    slice_regression_tolerance: float = _h(
        0.02, "the same for every slice with >= min_slice_pairs pairs"
    )
    logloss_regression_tolerance: float = _h(
        0.0,
        "increase of the pairs' log loss (nats per pair, each model at its fitted "
        "temperature) that is never a regression; a larger one rejects only when significant",
    )
    rating_regression_tolerance: float = _h(
        0.0, "drop of the ratings' AUC that is never a regression; larger: tested as above"
    )
    max_jump: float = _h(
        0.15, "an accuracy gain over the deployed model larger than this is held as suspicious"
    )
    suspicious_accuracy: float | None = _h(
        0.98, "held-out accuracy at or above this is held as suspicious (leak?); None disables"
    )
    max_length_gap: float = _h(
        0.30, "|acc(chosen longer) - acc(chosen shorter)| above this rejects (length shortcut)"
    )
    min_length_side: int = _h(
        20, "the length gap is judged only when both sides have at least this many pairs"
    )
    max_length_spearman: float = _h(0.50, "|Spearman(score, length)| above this holds for review")
    probe_floor: float = _h(
        0.50,
        "probe-set accuracy must not be significantly below this (one-sided 95% Wilson bound)",
    )
    probe_max_drop: float = _h(
        0.04,
        "probe-set accuracy may drop at most this much below the deployed model's, rounded "
        "up to whole probes (0.04 of 48 probes: 2 probes)",
    )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """One rule's outcome. ``on_fail`` is what a ``fail`` means for the decision."""

    name: str
    status: Status
    on_fail: Literal["reject", "hold", "none"]
    message: str
    value: float | None = None
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """The verdict, the sentences that justify it, and every check that was run."""

    action: Action
    reasons: list[str]
    checks: list[Check]

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reasons": list(self.reasons),
            "checks": [c.to_json() for c in self.checks],
        }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _slice_label(name: str) -> str:
    kind, _, value = name.partition(":")
    if kind == "length":
        return "pairs where the chosen response is " + value.replace("chosen_", "")
    return f"{kind} '{value}'"


# -- the rules --------------------------------------------------------------------------------


def _accuracy_checks(m: Metrics, p: GatePolicy) -> list[Check]:
    acc, n = float(m["accuracy"]), int(m["n_pairs"])
    lo, hi = m["accuracy_ci"]
    out = [
        Check(
            "accuracy_floor",
            "pass" if acc + _EPS >= p.accuracy_floor else "fail",
            "reject",
            f"Held-out accuracy is {_pct(acc)} on {n} pairs (95% CI {_pct(lo)}-{_pct(hi)}); "
            f"the floor is {_pct(p.accuracy_floor)}.",
            acc,
            p.accuracy_floor,
        )
    ]
    if p.require_above_chance:
        out.append(
            Check(
                "above_chance",
                "pass" if lo > 0.5 else "fail",
                "reject",
                f"The 95% CI of accuracy starts at {_pct(lo)}, "
                + ("above" if lo > 0.5 else "not above")
                + " the 50% a coin flip gets.",
                lo,
                0.5,
            )
        )
    base = m["baselines"]
    best, best_acc = base["best"], float(base["best_accuracy"] or 0.0)
    need = best_acc + p.baseline_margin
    out.append(
        Check(
            "beats_baselines",
            "pass" if acc + _EPS >= need else "fail",
            "reject",
            f"Accuracy {_pct(acc)} vs the best trivial baseline ({best.replace('_', '-')}) at "
            f"{_pct(best_acc)}: a margin of {_pts(acc - best_acc)}, "
            f"{_pts(p.baseline_margin)} required.",
            acc - best_acc,
            p.baseline_margin,
        )
    )
    if p.suspicious_accuracy is not None:
        sus = acc + _EPS >= p.suspicious_accuracy
        out.append(
            Check(
                "suspicious_accuracy",
                "fail" if sus else "pass",
                "hold",
                f"Held-out accuracy {_pct(acc)} is "
                + ("at or above" if sus else "below")
                + f" {_pct(p.suspicious_accuracy)}"
                + (
                    ": that is implausibly high for personal feedback; check for held-out "
                    "data leaking into training before deploying."
                    if sus
                    else "."
                ),
                acc,
                p.suspicious_accuracy,
            )
        )
    return out


def _length_checks(m: Metrics, p: GatePolicy) -> list[Check]:
    out = []
    lc = m["length_controlled"]
    n_long, n_short = int(lc["chosen_longer"]["n"]), int(lc["chosen_shorter"]["n"])
    if min(n_long, n_short) < p.min_length_side or lc["gap"] is None:
        out.append(
            Check(
                "length_gap",
                "skip",
                "reject",
                f"Length-controlled accuracy not judged: {n_long} pairs with the chosen "
                f"response longer and {n_short} with it shorter; {p.min_length_side} needed on "
                "each side.",
            )
        )
    else:
        gap = float(lc["gap"])
        a_long, a_short = lc["chosen_longer"]["accuracy"], lc["chosen_shorter"]["accuracy"]
        out.append(
            Check(
                "length_gap",
                "pass" if abs(gap) <= p.max_length_gap + _EPS else "fail",
                "reject",
                f"Accuracy is {_pct(a_long)} when the chosen response is longer and "
                f"{_pct(a_short)} when it is shorter (gap {_pts(gap)}, length-controlled "
                f"accuracy {_pct(lc['accuracy'])}); the gap may be at most "
                f"{100 * p.max_length_gap:.1f} pts.",
                gap,
                p.max_length_gap,
            )
        )
    rho = m["length_bias"]["spearman"]
    if rho is None:
        out.append(
            Check(
                "length_correlation",
                "skip",
                "hold",
                "Score/length correlation is undefined (too few or constant values).",
            )
        )
    else:
        ok = abs(rho) <= p.max_length_spearman + _EPS
        out.append(
            Check(
                "length_correlation",
                "pass" if ok else "fail",
                "hold",
                f"Spearman correlation of score with length is {rho:+.2f}; the bound is "
                f"±{p.max_length_spearman:.2f}"
                + ("." if ok else ": the model may be rewarding length rather than content."),
                float(rho),
                p.max_length_spearman,
            )
        )
    return out


def _phi(z: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _se(st: Mapping[str, Any]) -> float | None:
    """The bootstrap standard error; recovered from the 5% quantile in metrics recorded
    before ``se`` existed (normal approximation)."""
    if st.get("se") is not None:
        return float(st["se"])
    if st.get("lower_95") is not None and st.get("diff") is not None:
        return max(0.0, (float(st["diff"]) - float(st["lower_95"])) / 1.6449)
    return None


@dataclass
class _Test:
    """One "is the candidate worse than the deployed model by more than tol?" test."""

    name: str
    family: str  # "all pairs", "slices" or "ratings": Holm corrects within a family
    diff: float  # candidate - deployed, in the metric's units (positive: candidate better)
    se: float | None
    tol: float
    describe: str  # the numbers, as a sentence fragment
    unit: str  # how to print diff and tol

    @property
    def p(self) -> float:
        """One-sided p-value of H0 "diff >= -tol" (normal approximation, bootstrap SE)."""
        if not self.se or self.se <= 0:
            return 0.0 if self.diff < -self.tol - _EPS else 1.0
        return _phi((self.diff + self.tol) / self.se)


def _holm(ps: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down; controls the family-wise error at any level)."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adj = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adj[i] = running
    return adj


def _fmt(x: float, unit: str) -> str:
    return _pts(x) if unit == "pts" else f"{x:+.3f} {unit}"


def _pair_tests(vs: Mapping[str, Any], p: GatePolicy) -> tuple[list[_Test], list[Check]]:
    """The accuracy and log-loss tests on all pairs and on every slice big enough to judge."""
    tests: list[_Test] = []
    skipped: list[Check] = []
    o = vs["overall"]
    groups: list[tuple[str, str, Mapping[str, Any], float]] = [
        ("", "all pairs", o, p.overall_regression_tolerance)
    ]
    for name, st in sorted(vs["slices"].items()):
        label = _slice_label(name)
        if st["n"] < p.min_slice_pairs:
            skipped.append(
                Check(
                    f"no_regression[{name}]",
                    "skip",
                    "reject",
                    f"Slice {label}: {st['n']} pairs, too few to judge "
                    f"(needs {p.min_slice_pairs}).",
                )
            )
        elif st["n"] >= o["n"]:  # the slice is every pair: testing it again adds nothing
            skipped.append(
                Check(
                    f"no_regression[{name}]",
                    "skip",
                    "reject",
                    f"Slice {label} holds every pair; judged as the whole set.",
                )
            )
        else:
            groups.append((f"[{name}]", f"slice {label}", st, p.slice_regression_tolerance))
    for suffix, label, st, tol in groups:
        family = "slices" if suffix else "all pairs"
        ci = (
            f"; 95% CI {_pts(st['ci_low'])} to {_pts(st['ci_high'])}"
            if st.get("ci_low") is not None
            else ""
        )
        tests.append(
            _Test(
                "no_regression" + suffix,
                family,
                float(st["diff"]),
                _se(st),
                tol,
                f"accuracy on {label} ({st['n']} pairs): {_pct(st['candidate_accuracy'])} vs "
                f"{_pct(st['deployed_accuracy'])} ({_pts(st['diff'])}, {st['wins']} pairs won, "
                f"{st['losses']} lost{ci})",
                "pts",
            )
        )
        ll = st.get("logloss")
        if ll and ll.get("diff") is not None:
            tests.append(
                _Test(
                    "no_regression_logloss" + suffix,
                    family,
                    float(ll["diff"]),
                    _se(ll),
                    p.logloss_regression_tolerance,
                    f"log loss on {label}: {ll['candidate']:.3f} vs {ll['deployed']:.3f} nats "
                    f"per pair (improvement {ll['diff']:+.3f})",
                    "nats",
                )
            )
    return tests, skipped


def _comparison_checks(
    m: Metrics, dep: Metrics, p: GatePolicy, pairs_judged: bool, ratings_judged: bool
) -> list[Check]:
    """The regression rule: every comparison with the deployed model, Holm-corrected.

    Each test asks "is the candidate worse by more than its tolerance?" and rejects only when
    the data say so at the family-wise level ``regression_alpha``: the tolerance is the noise
    of the held-out set (its bootstrap standard error, by prompt), not a fixed number of
    points that an equal model misses half the time (docs/evaluation.md, operating
    characteristic).
    """
    fc, fd = m.get("pairs_fingerprint"), dep.get("pairs_fingerprint")
    if pairs_judged and fc and fd and fc != fd:
        return [
            Check(
                "comparable",
                "fail",
                "hold",
                "The candidate and the deployed model were evaluated on different held-out "
                "sets, so their numbers cannot be compared; re-evaluate both on the same "
                "pairs.",
            )
        ]
    vs = m.get("vs_deployed") or {}
    need_pairs = pairs_judged and not vs.get("overall")
    need_ratings = ratings_judged and (vs.get("ratings") or {}).get("diff") is None
    if need_pairs or (need_ratings and not pairs_judged):
        what = "pairs" if need_pairs else "ratings"
        return [
            Check(
                "comparable",
                "fail",
                "hold",
                f"There is a deployed model but no paired comparison with it on the same "
                f"{what}, so a regression cannot be ruled out.",
            )
        ]
    tests: list[_Test] = []
    out: list[Check] = []
    if pairs_judged:
        pair_tests, skipped = _pair_tests(vs, p)
        tests += pair_tests
        out += skipped
    r = vs.get("ratings") or {}
    if ratings_judged and r.get("diff") is not None:
        tests.append(
            _Test(
                "no_regression_ratings",
                "ratings",
                float(r["diff"]),
                _se(r),
                p.rating_regression_tolerance,
                f"ratings' AUC ({r['n']} ratings): {r['candidate_auc']:.3f} vs "
                f"{r['deployed_auc']:.3f} ({r['diff']:+.3f})",
                "AUC",
            )
        )
    families: dict[str, list[_Test]] = {}
    for t in tests:
        families.setdefault(t.family, []).append(t)
    adjusted = {
        id(t): a
        for fam in families.values()
        for t, a in zip(fam, _holm([t.p for t in fam]), strict=True)
    }
    for t in tests:
        adj = adjusted[id(t)]
        k = len(families[t.family])
        worse = adj <= p.regression_alpha
        out.append(
            Check(
                t.name,
                "fail" if worse else "pass",
                "reject",
                f"Against the deployed model, {t.describe}. A drop beyond "
                f"{_fmt(-t.tol, t.unit).lstrip('+')} has one-sided p = {t.p:.3g}, "
                f"{adj:.3g} after Holm's correction over the {k} test(s) on {t.family}: "
                + (
                    f"significantly worse (p <= {p.regression_alpha:g})."
                    if worse
                    else f"not a significant regression (needs p <= {p.regression_alpha:g})."
                ),
                t.diff,
                -t.tol,
            )
        )
    if pairs_judged:
        diff, what = float(vs["overall"]["diff"]), "Accuracy"
        gain = _pts(diff)
    else:
        diff, what = float(r.get("diff") or 0.0), "The ratings' AUC"
        gain = f"{100 * diff:+.1f} AUC pts"
    jump = diff > p.max_jump + _EPS
    out.append(
        Check(
            "jump",
            "fail" if jump else "pass",
            "hold",
            f"{what} changed by {gain} over the deployed model"
            + (
                f", more than the {100 * p.max_jump:.1f} pts a retrain plausibly gains: "
                "held for review (a leak, a data change or a scoring bug are likelier)."
                if jump
                else f" (a gain above {100 * p.max_jump:.1f} pts would be held as suspicious)."
            ),
            diff,
            p.max_jump,
        )
    )
    return out


def _probe_checks(m: Metrics, dep: Metrics | None, p: GatePolicy) -> list[Check]:
    pr = m.get("probes")
    if not pr or not pr.get("n"):
        return [
            Check(
                "probes",
                "fail",
                "hold",
                "No probe-set results were given, so the probe check could not run.",
            )
        ]
    acc = float(pr["accuracy"])
    # The floor is judged against the noise of 80 probes, as every other rule is: a model
    # whose probes sit at chance (38/80: one trained on a user's taste the probes know nothing
    # of) is not evidence of a broken model, and a fixed 50% bound rejected such retrains on a
    # coin flip every night (bench/month.py on the embedded model: 35-39 of 80, all rejected).
    # Rejected: a probe score whose one-sided 95% upper bound is still below the floor (the
    # refusal shortcut's 24-30 of 80).
    upper = wilson_interval(int(pr["correct"]), int(pr["n"]), z=PROBE_FLOOR_Z)[1]
    status: Literal["pass", "fail"]
    if acc + _EPS >= p.probe_floor:
        status, how = "pass", "."
    elif upper + _EPS >= p.probe_floor:
        status, how = "pass", f", within the noise of it (upper 95% bound {_pct(upper)})."
    else:
        status, how = "fail", f"; even its upper 95% bound ({_pct(upper)}) is below it."
    out = [
        Check(
            "probe_floor",
            status,
            "reject",
            f"Probe-set accuracy is {_pct(acc)} ({pr['correct']}/{pr['n']} obvious pairs); the "
            f"floor is {_pct(p.probe_floor)}{how}",
            acc,
            p.probe_floor,
        )
    ]
    dp = dep.get("probes") if dep else None
    if dp and dp.get("n"):
        d_acc = float(dp["accuracy"])
        drop = d_acc - acc
        # The slack is in whole probes: 4 pts of 48 probes is 1.92 probes, i.e. 2 may flip.
        n_probes = int(pr["n"])
        slack = math.ceil(p.probe_max_drop * n_probes - 1e-6)
        lost = int(dp.get("correct", round(d_acc * n_probes))) - int(pr["correct"])
        out.append(
            Check(
                "probe_drop",
                "pass" if lost <= slack else "fail",
                "reject",
                f"Probe-set accuracy {_pct(acc)} vs the deployed model's {_pct(d_acc)} "
                f"({_pts(-drop)}, {max(lost, 0)} probe(s) lost); at most {slack} of "
                f"{n_probes} probes ({100 * p.probe_max_drop:.1f} pts, rounded up to whole "
                "probes) may be lost.",
                -drop,
                -slack / max(n_probes, 1),
            )
        )
    elif dep is not None:
        out.append(
            Check(
                "probe_drop",
                "skip",
                "reject",
                "The deployed model has no probe results to compare with.",
            )
        )
    return out


def _probe_category_info(m: Metrics) -> Check | None:
    """Per-category probe accuracy, weakest first, and where the ensemble's members disagree
    most (metrics["ensemble"]): reported, never decisive (the floor and drop rules decide)."""
    cats = (m.get("probes") or {}).get("by_category") or {}
    if not cats:
        return None
    ranked = sorted(cats.items(), key=lambda kv: (kv[1].get("accuracy") or 0.0, kv[0]))
    text = ", ".join(f"{name} {_pct(s.get('accuracy'))}" for name, s in ranked)
    msg = f"Probes by category, weakest first: {text}."
    ens = ((m.get("ensemble") or {}).get("probes") or {}).get("by_category") or {}
    unsure = sorted(ens.items(), key=lambda kv: -kv[1]["mean_spread"])[:3]
    if unsure:
        msg += " The ensemble's members disagree most on: " + ", ".join(
            f"{name} (spread {s['mean_spread']:.2f})" for name, s in unsure
        )
        msg += "."
    worst = ranked[0][1].get("accuracy")
    return Check("probe_categories", "info", "none", msg, worst)


def _calibration_info(m: Metrics) -> Check:
    c, what = m["calibration"], "pairs"
    if c.get("ece") is None:
        c, what = (m.get("ratings") or {}).get("calibration") or {}, "ratings"
    if c.get("ece") is None:
        return Check("calibration", "info", "none", "No calibration numbers (no held-out data).")
    source = m.get("calibration_source")
    fitted = f", T fitted on {source}" if source else ""
    return Check(
        "calibration",
        "info",
        "none",
        f"Calibration on the held-out {what} at T = {c['temperature']:.3g}{fitted}: ECE "
        f"{c['ece']:.3f}, Brier {c['brier']:.3f} (reported, not gated: T is fitted on small "
        "validation sets).",
        float(c["ece"]),
    )


def _ratings_enough(m: Metrics, p: GatePolicy) -> tuple[bool, str]:
    r = m.get("ratings") or {}
    n, pos, neg = int(r.get("n", 0)), int(r.get("positives", 0)), int(r.get("negatives", 0))
    ok = n >= p.min_heldout_ratings and min(pos, neg) >= p.min_rating_class and n > 0
    msg = (
        f"{n} held-out ratings ({pos} good, {neg} bad); ratings are judged with at least "
        f"{p.min_heldout_ratings}, {p.min_rating_class} of each kind."
    )
    return ok, msg


def _rating_checks(m: Metrics, p: GatePolicy) -> list[Check]:
    """Ratings judged on their own: AUC above chance and above what length alone gets."""
    r = m["ratings"]
    auc, lo, hi = r["auc"], r.get("ci_low"), r.get("ci_high")
    if auc is None:
        return []
    out = []
    ci = f" (95% CI {lo:.3f}-{hi:.3f}, by prompt)" if lo is not None else ""
    if p.rating_require_above_chance:
        ok = lo is not None and lo > 0.5
        out.append(
            Check(
                "rating_above_chance",
                "pass" if ok else "fail",
                "reject",
                f"The ratings' AUC is {auc:.3f} on {r['n']} held-out ratings{ci}; its lower "
                "bound is " + ("above" if ok else "not above") + " the 0.5 of a coin flip.",
                lo,
                0.5,
            )
        )
    la = r.get("length_auc")
    if la is not None:
        margin = auc - la
        vs = r.get("vs_length") or {}
        d_ci = (
            f" (95% CI of the difference {vs['ci_low']:+.3f} to {vs['ci_high']:+.3f})"
            if vs.get("ci_low") is not None
            else ""
        )
        out.append(
            Check(
                "rating_beats_length",
                "pass" if margin + _EPS >= p.rating_baseline_margin else "fail",
                "reject",
                f"The ratings' AUC {auc:.3f} vs {la:.3f} for the length-only rule "
                f"({r['length_rule']}): a margin of {margin:+.3f}{d_ci}, "
                f"{p.rating_baseline_margin:+.3f} required.",
                margin,
                p.rating_baseline_margin,
            )
        )
    return out


# -- the decision -----------------------------------------------------------------------------


def decide(
    candidate: Metrics, deployed: Metrics | None, policy: GatePolicy | None = None
) -> Decision:
    """Judge ``candidate`` against ``deployed`` (None when nothing is deployed yet).

    ``deployed`` must be the deployed model's metrics on the *same* held-out pairs as the
    candidate (re-evaluated tonight, not the numbers stored when it was deployed), and
    ``candidate["vs_deployed"]`` the paired comparison with it (``evaluate(...,
    deployed_pairs=...)``).
    """
    p = policy or GatePolicy()
    n = int(candidate["n_pairs"])
    status = heldout_status(n, p.min_heldout_pairs)
    pairs_judged = status.enough and n > 0
    ratings_judged, r_msg = _ratings_enough(candidate, p)
    enough = status.enough or ratings_judged  # min_heldout_pairs = 0: never hold for data
    message = status.message
    if ratings_judged and not status.enough:  # judged on the ratings: say that first
        message = f"{r_msg} Pairs: {n} held out, {p.min_heldout_pairs} needed to judge them."
    elif candidate.get("n_ratings") or not status.enough:
        message += " " + r_msg
    checks: list[Check] = [
        Check(
            "enough_data",
            "pass" if enough else "fail",
            "hold",
            message,
            float(n),
            float(p.min_heldout_pairs),
        )
    ]
    if pairs_judged:
        checks += _accuracy_checks(candidate, p)
    if ratings_judged:
        checks += _rating_checks(candidate, p)
    if pairs_judged or ratings_judged:
        if pairs_judged:
            checks += [c for c in _length_checks(candidate, p) if c.name == "length_gap"]
        checks += [c for c in _length_checks(candidate, p) if c.name == "length_correlation"]
        if deployed is None:
            checks.append(
                Check(
                    "no_regression",
                    "skip",
                    "reject",
                    "No model is deployed yet, so there is nothing to regress from.",
                )
            )
        else:
            checks += _comparison_checks(candidate, deployed, p, pairs_judged, ratings_judged)
        checks.append(_calibration_info(candidate))
    # The probes do not depend on the held-out set, so they are judged even without data.
    checks += _probe_checks(candidate, deployed, p)
    if (cat_info := _probe_category_info(candidate)) is not None:
        checks.append(cat_info)

    failed = [c for c in checks if c.status == "fail"]
    rejects = [c for c in failed if c.on_fail == "reject"]
    holds = [c for c in failed if c.on_fail == "hold"]
    action: Action
    if rejects:
        action, reasons = "reject", [c.message for c in rejects + holds]
    elif holds:
        action, reasons = "hold", [c.message for c in holds]
    else:
        action = "deploy"
        reasons = [c.message for c in checks if c.status in ("pass", "skip")]
    return Decision(action, reasons, checks)
