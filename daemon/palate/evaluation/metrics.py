"""Pairwise accuracy with an honest interval, and the length baselines it must beat.

Small on purpose (a later issue adds the full evaluator: slices, calibration, gate). Ties
count as wrong everywhere: a model that outputs a constant scores 0, not 100% (TRL before
v0.24 dropped ties and reported 99.5% for a model with loss ln 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairwiseReport", "length_baselines", "pairwise_report", "wilson_interval"]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sane at 0%, 100% and small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def length_baselines(chosen_len: Sequence[int], rejected_len: Sequence[int]) -> tuple[float, float]:
    """Accuracy of "always prefer the shorter" and "always prefer the longer" (ties wrong)."""
    c = np.asarray(chosen_len)
    r = np.asarray(rejected_len)
    n = max(len(c), 1)
    return float((c < r).sum() / n), float((c > r).sum() / n)


@dataclass(frozen=True)
class PairwiseReport:
    accuracy: float
    n: int
    correct: int
    ties: int
    ci_low: float
    ci_high: float
    baseline_shorter: float
    baseline_longer: float
    mean_margin: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def pairwise_report(
    chosen_scores: Sequence[float],
    rejected_scores: Sequence[float],
    chosen_len: Sequence[int],
    rejected_len: Sequence[int],
) -> PairwiseReport:
    """Accuracy (strictly higher chosen score), Wilson 95% CI and length baselines.

    Lengths are in characters of the response, the unit users see.
    """
    c = np.asarray(chosen_scores, dtype=np.float64)
    r = np.asarray(rejected_scores, dtype=np.float64)
    n = len(c)
    correct = int((c > r).sum())
    lo, hi = wilson_interval(correct, n)
    shorter, longer = length_baselines(chosen_len, rejected_len)
    return PairwiseReport(
        accuracy=correct / n if n else 0.0,
        n=n,
        correct=correct,
        ties=int((c == r).sum()),
        ci_low=lo,
        ci_high=hi,
        baseline_shorter=shorter,
        baseline_longer=longer,
        mean_margin=float((c - r).mean()) if n else 0.0,
    )


def fit_temperature(
    diffs: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray | None = None
) -> float:
    """T minimising the log loss of ``sigmoid(diff / T)`` against ``labels``.

    Without ``labels`` every diff is a pair's ``score_chosen - score_rejected`` (the first
    won: label 1). With them, a diff can also be a rating's logit ``reward - baseline`` with
    its (soft) label, so users who send only ratings get a fitted temperature too: the
    ratings' BCE is taken on the same reward scale as the pairs' Bradley-Terry loss, so one
    T serves both. Fit on *validation* data only, never on the held-out set being judged, or
    the calibration numbers grade their own homework. Golden-section search on log T in
    [1e-2, 1e2]; 1.0 without informative data. If every diff is on its label's side the
    optimum is T -> 0 and the search stops at the bound.
    """
    d = np.asarray(diffs, dtype=np.float64)
    y = np.ones_like(d) if labels is None else np.asarray(labels, dtype=np.float64)
    if y.shape != d.shape:
        raise ValueError(f"one label per diff: {y.shape} vs {d.shape}")
    keep = np.isfinite(d) & np.isfinite(y)
    d, y = d[keep], np.clip(y[keep], 0.0, 1.0)
    if d.size == 0 or not np.any(d):
        return 1.0

    def nll(log_t: float) -> float:
        x = d / math.exp(log_t)
        return float((y * np.logaddexp(0.0, -x) + (1.0 - y) * np.logaddexp(0.0, x)).mean())

    lo, hi = math.log(1e-2), math.log(1e2)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))
