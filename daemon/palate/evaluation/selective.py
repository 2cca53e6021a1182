"""Selective prediction: how accurate the model is on the pairs it is surest of.

An ensemble says, per pair, how sure it is; this checks that the saying is worth something.
Pure numpy on member scores handed in by the caller (like heldout.py, never the model).

- **Confidence** of a pair: the lower bound of the member-mean margin in the direction the
  mean prefers, ``|mean_k d_k| - std_k d_k`` with ``d_k = r_k(chosen) - r_k(rejected)``: a
  pair the members agree on by a wide margin comes first, one they split on last. With one
  member it is ``|d|``, the calibrated margin alone.
- **Coverage-accuracy curve**: sort pairs by confidence, most confident first; for each
  coverage ``c`` in 10%, 20%, ..., 100% the accuracy (ties wrong) on the first ``c`` of them.
  A useful confidence gives a curve that falls from left to right; 100% is plain accuracy.
- **Selective accuracy at 50%**: the curve at half coverage, the figure docs/benchmarks.md
  compares single model and ensemble on.
- **ECE**: from :func:`palate.evaluation.heldout.calibration` (10 equal-width bins,
  symmetrised), on the member-mean margin and the fitted temperature.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from palate.evaluation.heldout import calibration

__all__ = ["coverage_accuracy", "ensemble_metrics", "pair_confidence", "selective_report"]

COVERAGES = tuple(round(0.1 * i, 1) for i in range(1, 11))


def _members(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def pair_confidence(chosen: np.ndarray, rejected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(member-mean margin, confidence) per pair from member scores (n, K) or (n,)."""
    d = _members(chosen) - _members(rejected)  # (n, K)
    mean = d.mean(axis=1)
    spread = d.std(axis=1) if d.shape[1] > 1 else np.zeros(len(d))
    return mean, np.abs(mean) - spread


def coverage_accuracy(
    correct: np.ndarray, confidence: np.ndarray, coverages: tuple[float, ...] = COVERAGES
) -> list[list[float]]:
    """``[[coverage, accuracy], ...]`` on the most confident ``coverage`` share of pairs
    (ties in confidence keep input order, so the curve is deterministic)."""
    c = np.asarray(correct, dtype=bool)
    n = c.size
    if n == 0:
        return []
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    hits = np.cumsum(c[order])
    out = []
    for cov in coverages:
        k = max(1, round(cov * n))
        out.append([float(cov), float(hits[k - 1] / k)])
    return out


def selective_report(
    chosen: np.ndarray,
    rejected: np.ndarray,
    temperature: float,
    categories: list[str] | None = None,
) -> dict[str, Any]:
    """``members``, ``accuracy``, ``ece``, ``coverage_accuracy``, ``selective_accuracy_50``,
    ``mean_spread`` (member spread of the margin) and, with ``categories`` (one per pair,
    e.g. probe categories), ``by_category``: accuracy and mean spread per category, which
    says where the ensemble is unsure."""
    ch, rj = _members(chosen), _members(rejected)
    mean, conf = pair_confidence(ch, rj)
    correct = mean > 0
    d = ch - rj
    spread = d.std(axis=1) if d.shape[1] > 1 else np.zeros(len(d))
    curve = coverage_accuracy(correct, conf)
    half = next((acc for cov, acc in curve if cov == 0.5), None)
    out: dict[str, Any] = {
        "members": int(ch.shape[1]),
        "n": len(mean),
        "accuracy": float(correct.mean()) if len(mean) else None,
        "ece": calibration(mean, temperature)["ece"],
        "coverage_accuracy": curve,
        "selective_accuracy_50": half,
        "mean_spread": float(spread.mean()) if len(mean) else None,
    }
    if categories is not None:
        cats: dict[str, Any] = {}
        for name in sorted(set(categories)):
            m = np.array([c == name for c in categories])
            cats[name] = {
                "n": int(m.sum()),
                "accuracy": float(correct[m].mean()),
                "mean_spread": float(spread[m].mean()),
                "unsure": int((conf[m] <= 0).sum()),
            }
        out["by_category"] = cats
    return out


def ensemble_metrics(
    heldout: list[tuple[Any, Any]],
    probes: list[tuple[Any, Any]],
    probe_categories: list[str],
    temperature: float,
) -> dict[str, Any]:
    """The ``ensemble`` key of a training run's metrics: :func:`selective_report` of the
    held-out pairs and of the probes (with their categories), from member scores collected
    in chunks of (chosen, rejected)."""

    def cat(chunks: list[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
        if not chunks:
            return np.zeros((0, 1)), np.zeros((0, 1))
        return (
            np.concatenate([_members(a) for a, _ in chunks]),
            np.concatenate([_members(b) for _, b in chunks]),
        )

    ha, hb = cat(heldout)
    pa, pb = cat(probes)
    return {
        "heldout": selective_report(ha, hb, temperature),
        "probes": selective_report(pa, pb, temperature, probe_categories),
    }
