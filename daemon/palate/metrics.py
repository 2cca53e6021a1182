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
