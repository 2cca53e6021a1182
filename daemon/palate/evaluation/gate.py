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

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from palate.evaluation.split import MIN_HELDOUT_PAIRS, heldout_status

__all__ = ["Check", "Decision", "GatePolicy", "decide"]

Action = Literal["deploy", "reject", "hold"]
Status = Literal["pass", "fail", "skip", "info"]
Metrics = Mapping[str, Any]

_EPS = 1e-9  # float slack so "exactly at the threshold" passes


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
    min_slice_pairs: int = _h(
        50, "a source/domain/length slice is judged for regression only with this many pairs"
    )
    overall_regression_tolerance: float = _h(
        0.02,
        "one-sided 95% paired-bootstrap lower bound of (candidate - deployed) accuracy "
        "over all pairs must be >= -this",
    )
    slice_regression_tolerance: float = _h(
        0.05, "the same bound on every slice with >= min_slice_pairs pairs must be >= -this"
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
    probe_floor: float = _h(0.50, "probe-set accuracy must be at least this")
    probe_max_drop: float = _h(
        0.04, "probe-set accuracy may drop at most this much below the deployed model's"
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


def _comparison_checks(m: Metrics, dep: Metrics, p: GatePolicy) -> list[Check]:
    fc, fd = m.get("pairs_fingerprint"), dep.get("pairs_fingerprint")
    if fc and fd and fc != fd:
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
    vs = m.get("vs_deployed")
    if not vs:
        return [
            Check(
                "comparable",
                "fail",
                "hold",
                "There is a deployed model but no paired comparison with it on the same "
                "pairs, so a regression cannot be ruled out.",
            )
        ]
    out = []
    o = vs["overall"]
    lb, diff = float(o["lower_95"]), float(o["diff"])
    out.append(
        Check(
            "no_regression",
            "pass" if lb + _EPS >= -p.overall_regression_tolerance else "fail",
            "reject",
            f"Against the deployed model on the same {o['n']} pairs: "
            f"{_pct(o['candidate_accuracy'])} vs {_pct(o['deployed_accuracy'])} "
            f"({_pts(diff)}; {o['wins']} pairs won, "
            f"{o['losses']} lost); the one-sided 95% lower bound is {_pts(lb)}, at most "
            f"{100 * p.overall_regression_tolerance:.1f} pts of regression allowed.",
            lb,
            -p.overall_regression_tolerance,
        )
    )
    for name, s in sorted(vs["slices"].items()):
        label = _slice_label(name)
        if s["n"] < p.min_slice_pairs:
            out.append(
                Check(
                    f"no_regression[{name}]",
                    "skip",
                    "reject",
                    f"Slice {label}: {s['n']} pairs, too few to judge (needs {p.min_slice_pairs}).",
                )
            )
            continue
        slb = float(s["lower_95"])
        out.append(
            Check(
                f"no_regression[{name}]",
                "pass" if slb + _EPS >= -p.slice_regression_tolerance else "fail",
                "reject",
                f"Slice {label} ({s['n']} pairs): {_pct(s['candidate_accuracy'])} vs deployed "
                f"{_pct(s['deployed_accuracy'])} ({_pts(s['diff'])}); the one-sided 95% lower "
                f"bound is {_pts(slb)}, at most {100 * p.slice_regression_tolerance:.1f} pts of "
                "regression allowed.",
                slb,
                -p.slice_regression_tolerance,
            )
        )
    jump = diff > p.max_jump + _EPS
    out.append(
        Check(
            "jump",
            "fail" if jump else "pass",
            "hold",
            f"Accuracy changed by {_pts(diff)} over the deployed model"
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
    out = [
        Check(
            "probe_floor",
            "pass" if acc + _EPS >= p.probe_floor else "fail",
            "reject",
            f"Probe-set accuracy is {_pct(acc)} ({pr['correct']}/{pr['n']} obvious pairs); the "
            f"floor is {_pct(p.probe_floor)}.",
            acc,
            p.probe_floor,
        )
    ]
    dp = dep.get("probes") if dep else None
    if dp and dp.get("n"):
        d_acc = float(dp["accuracy"])
        drop = d_acc - acc
        out.append(
            Check(
                "probe_drop",
                "pass" if drop <= p.probe_max_drop + _EPS else "fail",
                "reject",
                f"Probe-set accuracy {_pct(acc)} vs the deployed model's {_pct(d_acc)} "
                f"({_pts(-drop)}); a drop of at most {100 * p.probe_max_drop:.1f} pts is allowed.",
                -drop,
                -p.probe_max_drop,
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


def _calibration_info(m: Metrics) -> Check:
    c = m["calibration"]
    if c.get("ece") is None:
        return Check("calibration", "info", "none", "No calibration numbers (no pairs).")
    return Check(
        "calibration",
        "info",
        "none",
        f"Calibration at T = {c['temperature']:.3g}: ECE {c['ece']:.3f}, Brier "
        f"{c['brier']:.3f} (reported, not gated: T is fitted on small validation sets).",
        float(c["ece"]),
    )


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
    checks: list[Check] = [
        Check(
            "enough_data",
            "pass" if status.enough else "fail",
            "hold",
            status.message,
            float(n),
            float(p.min_heldout_pairs),
        )
    ]
    if status.enough and n > 0:
        checks += _accuracy_checks(candidate, p)
        checks += _length_checks(candidate, p)
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
            checks += _comparison_checks(candidate, deployed, p)
        checks.append(_calibration_info(candidate))
    # The probes do not depend on the held-out set, so they are judged even without data.
    checks += _probe_checks(candidate, deployed, p)

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
