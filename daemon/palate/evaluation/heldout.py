"""The evaluator: scores on held-out data in, a JSON-serialisable metrics dict out.

Pure numpy, no MLX: the caller scores the held-out pairs, ratings and probes with whatever
model it is judging and hands the numbers here, so the same code judges a candidate, the
deployed model, or constructed inputs in tests. docs/evaluation.md defines every metric and
every key of the dict :func:`evaluate` returns.

Conventions, everywhere:

- A pair is correct iff ``score_chosen > score_rejected``. Ties (and NaN) count as wrong, so a
  constant model scores 0%, not 100% (TRL once dropped ties and reported 99.5% for a model with
  loss ln 2).
- Accuracy intervals are 95% Wilson intervals: analytic, deterministic and sane at 0%, 100% and
  small n, where the normal approximation is not.
- Bootstraps use a fixed seed, so the same inputs always give the same metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from palate.evaluation.metrics import fit_temperature, wilson_interval

__all__ = [
    "SCHEMA_VERSION",
    "Metrics",
    "PairRecord",
    "Probe",
    "RatingRecord",
    "accuracy_stats",
    "auc_stats",
    "calibration",
    "cluster_bootstrap",
    "evaluate",
    "fit_temperature",
    "length_effect",
    "load_probes",
    "paired_bootstrap",
    "rating_auc",
    "rating_calibration",
    "spearman",
]

SCHEMA_VERSION = 1
#: The metrics dict (see docs/evaluation.md for its keys). A plain dict so it round-trips
#: through JSON in the registry unchanged.
Metrics = dict[str, Any]

NO_NAME = "(none)"  # slice name for an empty source/domain
SCATTER_POINTS = 400  # responses kept for the report's score-vs-length scatter


@dataclass(frozen=True)
class PairRecord:
    """One scored held-out pair. Scores are raw rewards, in the units T was fitted in.

    ``pair_id`` (the event id, or any stable id) lets the evaluator check that a paired
    comparison really is on the same pairs and fingerprints the held-out set. ``cluster``
    names the prompt (or conversation) the pair came from: pairs of one cluster are
    resampled together by the bootstraps, because they are not independent evidence (every
    pair of one ranking, a Tabby completion's choices). Empty: the pair is its own cluster.
    """

    score_chosen: float
    score_rejected: float
    len_chosen: int
    len_rejected: int
    source: str = ""
    domain: str = ""
    pair_id: str = ""
    cluster: str = ""


@dataclass(frozen=True)
class RatingRecord:
    """One scored unpaired judgement; ``label >= 0.5`` counts as good (soft labels allowed).

    ``rating_id`` pairs candidate and deployed records (as ``PairRecord.pair_id``);
    ``cluster`` as for pairs.
    """

    score: float
    label: float
    length: int
    source: str = ""
    domain: str = ""
    rating_id: str = ""
    cluster: str = ""


# -- small statistics -------------------------------------------------------------------------


def _num(x: float) -> float | None:
    """A JSON-safe float: NaN/inf become None (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def accuracy_stats(correct: Iterable[bool] | np.ndarray) -> dict[str, Any]:
    """``{n, correct, accuracy, ci_low, ci_high}``; accuracy is None when n == 0."""
    c = np.asarray(correct, dtype=bool)
    n, k = int(c.size), int(c.sum())
    lo, hi = wilson_interval(k, n)
    return {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else None,
        "ci_low": lo,
        "ci_high": hi,
    }


def _rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Boundaries of runs of equal values in the sorted array.
    edges = np.flatnonzero(np.diff(sx)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(x)]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson on average ranks); None if undefined."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3:
        return None
    ra, rb = _rank(a) - (a.size + 1) / 2.0, _rank(b) - (b.size + 1) / 2.0
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else None


def rating_auc(
    scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray
) -> float | None:
    """ROC AUC of score for ``label >= 0.5``; a tied positive/negative counts 1/2 (the usual
    AUC convention, unlike pairwise accuracy). None without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(labels, dtype=np.float64) >= 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    r = _rank(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def length_effect(
    score_chosen: Sequence[float] | np.ndarray,
    score_rejected: Sequence[float] | np.ndarray,
    len_chosen: Sequence[float] | np.ndarray,
    len_rejected: Sequence[float] | np.ndarray,
) -> dict[str, Any]:
    """How much of a model's pairwise accuracy is the length of the answers.

    ``length_corr``: Pearson correlation of the margin ``score_chosen - score_rejected`` with
    the length difference ``len_chosen - len_rejected`` (negative: the model prefers the
    shorter answer whatever it says; a reward model that judged content alone would be near 0
    on data whose length difference says little). ``accuracy_chosen_longer`` /
    ``_shorter``: accuracy (ties wrong) on the pairs whose chosen answer is longer / shorter,
    with their counts; ``length_controlled_accuracy``: their mean, i.e. accuracy as if half
    the pairs went each way, so a model that learnt "shorter wins" from brevity-heavy data
    does not get credit for it. Pairs of equal length are in neither subset. Undefined values
    (no pairs of one kind, a constant margin) are None.
    """
    d = np.asarray(score_chosen, dtype=np.float64) - np.asarray(score_rejected, dtype=np.float64)
    dl = np.asarray(len_chosen, dtype=np.float64) - np.asarray(len_rejected, dtype=np.float64)
    if d.shape != dl.shape:
        raise ValueError(f"one length difference per margin: {d.shape} vs {dl.shape}")
    correct = d > 0  # NaN compares False: wrong, as everywhere
    longer, shorter = dl > 0, dl < 0
    acc_l = float(correct[longer].mean()) if longer.any() else None
    acc_s = float(correct[shorter].mean()) if shorter.any() else None
    keep = np.isfinite(d)
    corr = None
    if keep.sum() >= 3 and d[keep].std() > 0 and dl[keep].std() > 0:
        corr = _num(np.corrcoef(d[keep], dl[keep])[0, 1])
    return {
        "length_corr": corr,
        "length_controlled_accuracy": (
            (acc_l + acc_s) / 2 if acc_l is not None and acc_s is not None else None
        ),
        "accuracy_chosen_longer": acc_l,
        "n_chosen_longer": int(longer.sum()),
        "accuracy_chosen_shorter": acc_s,
        "n_chosen_shorter": int(shorter.sum()),
    }


# -- clusters and the cluster bootstrap -------------------------------------------------------


def cluster_codes(keys: Sequence[str]) -> np.ndarray:
    """An integer cluster per item (first-seen order); an empty key is a cluster of its own."""
    seen: dict[str, int] = {}
    out = np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        out[i] = seen.setdefault(k if k else f"\x00{i}", len(seen))
    return out


def _cluster_weights(codes: np.ndarray, n_boot: int, seed: int) -> Iterable[np.ndarray]:
    """Bootstrap weights per item, ``(b, n)`` blocks that add up to ``n_boot`` rows.

    Each row resamples the K clusters with replacement (how often each cluster is drawn)
    and gives every item its cluster's count; drawn in blocks so memory stays about 16 MB
    whatever the size of the set.
    """
    codes = np.unique(codes, return_inverse=True)[1].reshape(-1)  # 0..K-1, none empty
    k = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    step = max(1, 2_000_000 // max(codes.size, k, 1))
    for a in range(0, n_boot, step):
        b = min(n_boot, a + step)
        draws = rng.integers(0, k, size=(b - a, k)) + (np.arange(b - a) * k)[:, None]
        counts = np.bincount(draws.ravel(), minlength=(b - a) * k).reshape(b - a, k)
        yield counts[:, codes].astype(np.float64)


def _boot_means(
    codes: np.ndarray,
    n_boot: int,
    seed: int,
    items: Sequence[tuple[np.ndarray, np.ndarray]],
) -> list[np.ndarray]:
    """Cluster-bootstrap replicates of the mean of ``values[mask]`` for every
    ``(mask, values)`` in ``items``, all on the *same* draws of the clusters of the whole set.

    A slice's replicate is the ratio estimator over the slice's items that were drawn, so
    slices and the whole set come from one resampling; a draw that holds no item of a slice
    (possible only for tiny slices) is dropped for that slice.
    """
    parts: list[list[np.ndarray]] = [[] for _ in items]
    for w in _cluster_weights(codes, n_boot, seed):
        for j, (mask, values) in enumerate(items):
            wm = w[:, mask]
            tot = wm.sum(axis=1)
            keep = tot > 0
            parts[j].append((wm[keep] @ values[mask]) / tot[keep])
    return [np.concatenate(p) if p else np.zeros(0) for p in parts]


def cluster_bootstrap(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[int] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap replicates ``(n_boot,)`` of the mean of ``values``, resampling *clusters*.

    Items of one cluster (pairs of one prompt) move together, so correlated items do not
    pass for independent evidence and the interval is as wide as the data really allow.
    A replicate is ``sum_c w_c S_c / sum_c w_c N_c`` (S_c, N_c: the cluster's sum and size,
    w_c: how often it was drawn), the usual ratio estimator for clusters of unequal size.
    """
    v = np.asarray(values, dtype=np.float64)
    codes = np.asarray(clusters, dtype=np.int64)
    if v.shape != codes.shape:
        raise ValueError(f"one cluster per value: {v.shape} vs {codes.shape}")
    if v.size == 0:
        return np.zeros(0)
    return _boot_means(codes, n_boot, seed, [(np.ones(v.size, dtype=bool), v)])[0]


def _nan_last(x: np.ndarray) -> np.ndarray:
    """Non-finite scores replaced by a value below every finite one (ranked last)."""
    ok = np.isfinite(x)
    if ok.all():
        return x
    low = float(x[ok].min()) - 1.0 if ok.any() else 0.0
    return np.where(ok, x, low)


def _interval(boot: np.ndarray) -> dict[str, float]:
    q025, q05, q95, q975 = np.quantile(boot, [0.025, 0.05, 0.95, 0.975])
    return {
        "ci_low": float(q025),
        "ci_high": float(q975),
        "lower_95": float(q05),
        "upper_95": float(q95),
        "se": float(boot.std()),
    }


def _weighted_auc(scores: np.ndarray, pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` for ``pos`` under item weights ``w`` ``(b, n)``; one AUC per row.

    A positive/negative tie counts 1/2 (as :func:`rating_auc`); rows with no weight on one
    class give NaN. Sorting once and summing weights per distinct score keeps it O(b n).
    """
    order = np.argsort(scores, kind="mergesort")
    s, p = scores[order], pos[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1))
    ws = w[:, order]
    wp = np.add.reduceat(ws * p, starts, axis=1)  # positive weight per distinct score
    wn = np.add.reduceat(ws * ~p, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each score
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _auc_boot(
    columns: Sequence[np.ndarray], pos: np.ndarray, codes: np.ndarray, n_boot: int, seed: int
) -> np.ndarray:
    """Cluster-bootstrap AUCs ``(n_boot, len(columns))``, every column on the same draws."""
    out = []
    for w in _cluster_weights(codes, n_boot, seed):
        out.append(np.stack([_weighted_auc(c, pos, w) for c in columns], axis=1))
    boot = np.concatenate(out)
    return boot[np.all(np.isfinite(boot), axis=1)]  # a draw with one class only says nothing


def auc_stats(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    lengths: Sequence[float] | np.ndarray,
    clusters: Sequence[int] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC of the scores for ``label >= 0.5`` with a cluster-bootstrap 95% interval, and the
    same for the best *length-only* rule (score = length, or = -length), paired.

    A rating has no partner to be right about, so its counterpart of "accuracy vs the length
    baselines" is: does the score separate good from bad responses better than their
    length does? ``vs_length`` is the paired difference ``auc - length_auc`` on the same
    bootstrap draws. Every value is None without both classes.
    """
    s = _nan_last(np.asarray(scores, dtype=np.float64))
    y = np.asarray(labels, dtype=np.float64) >= 0.5
    ln = np.asarray(lengths, dtype=np.float64)
    codes = cluster_codes([""] * s.size) if clusters is None else np.asarray(clusters, np.int64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    out: dict[str, Any] = {
        "n": int(s.size),
        "positives": n_pos,
        "negatives": n_neg,
        "n_clusters": int(np.unique(codes).size),
        "auc": None,
        "ci_low": None,
        "ci_high": None,
        "se": None,
        "length_rule": None,
        "length_auc": None,
        "vs_length": None,
    }
    auc = rating_auc(s, y)
    len_auc = rating_auc(ln, y)
    if auc is None or len_auc is None:
        return out
    rule, sign = ("longer is better", 1.0) if len_auc >= 0.5 else ("shorter is better", -1.0)
    boot = _auc_boot([s, sign * ln], y, codes, n_boot, seed)
    ci = _interval(boot[:, 0]) if len(boot) else {}
    d = _interval(boot[:, 0] - boot[:, 1]) if len(boot) else {}
    out.update(
        auc=auc,
        ci_low=ci.get("ci_low"),
        ci_high=ci.get("ci_high"),
        se=ci.get("se"),
        length_rule=rule,
        length_auc=max(len_auc, 1.0 - len_auc),
        vs_length={"diff": auc - max(len_auc, 1.0 - len_auc), **d},
    )
    return out


def _rating_compare(
    cand: Sequence[RatingRecord], dep: Sequence[RatingRecord], n_boot: int, seed: int
) -> dict[str, Any]:
    """Paired AUC comparison of two models on the same ratings (cluster bootstrap)."""
    if len(cand) != len(dep):
        raise ValueError(f"deployed ratings must be the same ratings: {len(cand)} vs {len(dep)}")
    for a, b in zip(cand, dep, strict=True):
        if a.rating_id != b.rating_id:
            raise ValueError(f"rating order differs: {a.rating_id!r} vs {b.rating_id!r}")
    sc = np.array([r.score for r in cand], dtype=np.float64)
    sd = np.array([r.score for r in dep], dtype=np.float64)
    sc, sd = _nan_last(sc), _nan_last(sd)
    y = np.array([r.label for r in cand], dtype=np.float64) >= 0.5
    codes = cluster_codes([r.cluster or r.rating_id for r in cand])
    a_c, a_d = rating_auc(sc, y), rating_auc(sd, y)
    out: dict[str, Any] = {
        "n": len(cand),
        "candidate_auc": a_c,
        "deployed_auc": a_d,
        "diff": None,
        "n_boot": n_boot,
    }
    if a_c is None or a_d is None:
        return out
    boot = _auc_boot([sc, sd], y, codes, n_boot, seed)
    out.update(diff=a_c - a_d, **(_interval(boot[:, 0] - boot[:, 1]) if len(boot) else {}))
    return out


# -- calibration ------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))  # overflow-free


def calibration(
    diffs: Sequence[float] | np.ndarray, temperature: float = 1.0, n_bins: int = 10
) -> dict[str, Any]:
    """ECE, Brier and NLL of ``p = sigmoid(diff / T)`` for "chosen beats rejected".

    Every pair's outcome is "chosen won", so a one-sided diagram would only ever test the
    right half. Each pair is therefore counted in both orientations, ``(p, 1)`` and
    ``(1 - p, 0)`` (symmetrised, as for any pairwise model whose order is arbitrary).
    ECE uses ``n_bins`` equal-width bins on [0, 1] (equal-width keeps the bins identical across
    models and nights, so two diagrams compare point by point), weighted by count:
    ``sum_b n_b / N * |mean_p_b - frac_chosen_b|``. Brier is ``mean((1 - p)^2)`` (the same in
    both orientations); NLL is ``mean(-log p)``.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    d = np.asarray(diffs, dtype=np.float64)
    d = np.where(np.isfinite(d), d, 0.0)  # a NaN score says nothing: p = 0.5
    empty: dict[str, Any] = {
        "temperature": float(temperature),
        "n": 0,
        "ece": None,
        "brier": None,
        "nll": None,
        "binning": f"{n_bins} equal-width bins, symmetrised",
        "bins": [],
    }
    if d.size == 0:
        return empty
    p = _sigmoid(d / temperature)
    probs = np.concatenate([p, 1.0 - p])
    outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    idx = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = idx == b
        nb = int(m.sum())
        mean_p = float(probs[m].mean()) if nb else None
        frac = float(outcome[m].mean()) if nb else None
        if nb:
            ece += nb / probs.size * abs(float(probs[m].mean()) - float(outcome[m].mean()))
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "n": nb,
                "mean_p": mean_p,
                "frac_chosen": frac,
            }
        )
    return {
        **empty,
        "n": int(d.size),
        "ece": ece,
        "brier": float(((1.0 - p) ** 2).mean()),
        "nll": float(np.logaddexp(0.0, -d / temperature).mean()),
        "bins": bins,
    }


def rating_calibration(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    temperature: float = 1.0,
    offset: float = 0.0,
    n_bins: int = 10,
) -> dict[str, Any]:
    """ECE, Brier and NLL of ``p = sigmoid((score - offset) / T)`` for "the response is good".

    The calibration report for users who only send ratings. ``offset`` is the reward a
    response needs to count as good: training's running baseline (the ratings' BCE is
    taken on ``reward - baseline``), stored with the temperature. Labels may be soft; bins as
    :func:`calibration` (equal-width, count-weighted), ``frac_good`` their mean label.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.clip(np.asarray(labels, dtype=np.float64), 0.0, 1.0)
    x = np.where(np.isfinite(s), (s - offset) / temperature, 0.0)
    out: dict[str, Any] = {
        "temperature": float(temperature),
        "offset": float(offset),
        "n": int(s.size),
        "ece": None,
        "brier": None,
        "nll": None,
        "binning": f"{n_bins} equal-width bins",
        "bins": [],
    }
    if s.size == 0:
        return out
    p = _sigmoid(x)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        m = idx == b
        nb = int(m.sum())
        if nb:
            ece += nb / p.size * abs(float(p[m].mean()) - float(y[m].mean()))
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "n": nb,
                "mean_p": float(p[m].mean()) if nb else None,
                "frac_good": float(y[m].mean()) if nb else None,
            }
        )
    nll = y * np.logaddexp(0.0, -x) + (1.0 - y) * np.logaddexp(0.0, x)
    out.update(ece=ece, brier=float(((p - y) ** 2).mean()), nll=float(nll.mean()), bins=bins)
    return out


# -- paired comparison ------------------------------------------------------------------------


def paired_bootstrap(
    candidate_correct: Sequence[bool] | np.ndarray,
    deployed_correct: Sequence[bool] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    clusters: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Bootstrap of ``acc(candidate) - acc(deployed)`` on the SAME pairs, resampling pairs.

    Pairing is what makes small held-out sets usable: pairs both models get right (or both
    wrong) cancel, and only disagreements carry variance. Per pair the difference is -1, 0 or
    +1, so resampling n pairs with replacement is exactly a multinomial draw of those three
    counts; drawing the counts directly is the same bootstrap in O(n_boot) memory.

    Returns ``n``, both accuracies, ``diff``, the two-sided 95% percentile interval
    ``ci_low``/``ci_high`` (2.5th/97.5th percentiles), ``lower_95`` (5th percentile: the
    one-sided 95% lower bound), ``upper_95``, ``se`` (the bootstrap standard error the gate's
    regression test uses), ``wins``/``losses`` (pairs only the candidate / only the deployed
    model gets right), ``n_clusters`` and ``n_boot``.

    ``clusters`` (one integer per pair, :func:`cluster_codes`) resamples whole clusters
    instead of pairs (:func:`cluster_bootstrap`); without it every pair is its own cluster.
    """
    c = np.asarray(candidate_correct, dtype=bool)
    d = np.asarray(deployed_correct, dtype=bool)
    if c.shape != d.shape:
        raise ValueError(f"paired bootstrap needs the same pairs: {c.size} vs {d.size}")
    n = int(c.size)
    wins, losses = int((c & ~d).sum()), int((~c & d).sum())
    if n == 0:
        return {
            "n": 0,
            "candidate_accuracy": None,
            "deployed_accuracy": None,
            "diff": None,
            "ci_low": None,
            "ci_high": None,
            "lower_95": None,
            "upper_95": None,
            "se": None,
            "wins": 0,
            "losses": 0,
            "n_clusters": 0,
            "n_boot": n_boot,
        }
    if clusters is None:
        rng = np.random.default_rng(seed)
        probs = np.array([wins, losses, n - wins - losses], dtype=np.float64) / n
        draws = rng.multinomial(n, probs, size=n_boot)
        boot = (draws[:, 0] - draws[:, 1]) / n
        codes = np.arange(n)
    else:
        codes = np.asarray(clusters, dtype=np.int64)
        boot = cluster_bootstrap(c.astype(np.float64) - d, codes, n_boot, seed)
    return _paired_summary(c, d, boot, codes, n_boot)


def _paired_summary(
    c: np.ndarray, d: np.ndarray, boot: np.ndarray, codes: np.ndarray, n_boot: int
) -> dict[str, Any]:
    n = int(c.size)
    wins, losses = int((c & ~d).sum()), int((~c & d).sum())
    if n == 0 or boot.size == 0:
        return {**paired_bootstrap([], [], n_boot), "n": n}
    return {
        "n": n,
        "candidate_accuracy": float(c.mean()),
        "deployed_accuracy": float(d.mean()),
        "diff": (wins - losses) / n,
        **_interval(boot),
        "wins": wins,
        "losses": losses,
        "n_clusters": int(np.unique(codes).size),
        "n_boot": n_boot,
    }


# -- the evaluator ----------------------------------------------------------------------------


def _arrays(pairs: Sequence[PairRecord]) -> tuple[np.ndarray, ...]:
    sc = np.array([p.score_chosen for p in pairs], dtype=np.float64)
    sr = np.array([p.score_rejected for p in pairs], dtype=np.float64)
    lc = np.array([p.len_chosen for p in pairs], dtype=np.float64)
    lr = np.array([p.len_rejected for p in pairs], dtype=np.float64)
    return sc, sr, lc, lr


def _correct(pairs: Sequence[PairRecord]) -> np.ndarray:
    sc, sr, _, _ = _arrays(pairs)
    return np.asarray(sc > sr)  # ties and NaN are False: counted wrong


def _slice_masks(pairs: Sequence[PairRecord]) -> dict[str, np.ndarray]:
    """Named boolean masks: ``source:X``, ``domain:Y``, ``length:chosen_longer|shorter``."""
    _, _, lc, lr = _arrays(pairs)
    masks: dict[str, np.ndarray] = {
        "length:chosen_longer": lc > lr,
        "length:chosen_shorter": lc < lr,
    }
    for attr in ("source", "domain"):
        values = np.array([getattr(p, attr) or NO_NAME for p in pairs], dtype=object)
        for name in sorted(set(values.tolist())):
            masks[f"{attr}:{name}"] = values == name
    return masks


def _by(pairs: Sequence[PairRecord], correct: np.ndarray, attr: str) -> dict[str, Any]:
    values = [getattr(p, attr) or NO_NAME for p in pairs]
    out = {}
    for name in sorted(set(values)):
        m = np.array([v == name for v in values])
        out[name] = accuracy_stats(correct[m])
    return out


def _fingerprint(pairs: Sequence[PairRecord]) -> str | None:
    """sha256 of the sorted pair ids: equal iff two evaluations used the same held-out pairs."""
    ids = [p.pair_id for p in pairs]
    if not ids or not all(ids):
        return None
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()[:32]


def _compare(
    pairs: Sequence[PairRecord], deployed: Sequence[PairRecord], n_boot: int, seed: int
) -> dict[str, Any]:
    if len(pairs) != len(deployed):
        raise ValueError(
            f"deployed scores must be on the same pairs: {len(pairs)} vs {len(deployed)}"
        )
    for a, b in zip(pairs, deployed, strict=True):
        if a.pair_id != b.pair_id:
            raise ValueError(f"pair order differs: {a.pair_id!r} vs {b.pair_id!r}")
    c, d = _correct(pairs), _correct(deployed)
    codes = cluster_codes([p.cluster or p.pair_id for p in pairs])
    gain = _logloss_gain(pairs, deployed)
    acc_diff = c.astype(np.float64) - d
    ll_diff = gain["deployed"] - gain["candidate"]  # positive: the candidate's loss is lower
    masks = {"": np.ones(len(pairs), dtype=bool), **_slice_masks(pairs)}
    items = [(m, v) for m in masks.values() for v in (acc_diff, ll_diff)]
    boots = _boot_means(codes, n_boot, seed, items) if len(pairs) else [np.zeros(0)] * len(items)
    out: dict[str, Any] = {}
    for i, (name, m) in enumerate(masks.items()):
        b_acc, b_ll = boots[2 * i], boots[2 * i + 1]
        acc = _paired_summary(c[m], d[m], b_acc, codes[m], n_boot)
        lc, ld = gain["candidate"][m], gain["deployed"][m]
        acc["logloss"] = {
            "n": int(m.sum()),
            "candidate": float(lc.mean()) if lc.size else None,
            "deployed": float(ld.mean()) if ld.size else None,
            "diff": float((ld - lc).mean()) if lc.size else None,
            **(_interval(b_ll) if b_ll.size else {}),
        }
        out[name] = acc
    overall = out.pop("")
    return {"overall": overall, "slices": out, "temperatures": gain["temperatures"]}


def _logloss_gain(pairs: Sequence[PairRecord], deployed: Sequence[PairRecord]) -> dict[str, Any]:
    """Per pair: each model's log loss of "chosen wins" at its own held-out temperature.

    Right/wrong throws away how *sure* a model was; two retrains that agree on 85% of the
    pairs differ mostly in their margins, and those carry most of the evidence about which
    is better (docs/evaluation.md, "Why the log loss too"). Each model's margins are put on a
    common scale by the temperature that fits them best on these pairs (one parameter per
    model, a nuisance scale, not the calibration that is reported): the comparison is then
    of how well each model *separates* chosen from rejected, whatever its reward units.
    """
    out: dict[str, Any] = {}
    temps = []
    for key, recs in (("candidate", pairs), ("deployed", deployed)):
        sc, sr, _, _ = _arrays(recs)
        diff = np.where(np.isfinite(sc - sr), sc - sr, 0.0)
        t = fit_temperature(diff)
        temps.append(t)
        out[key] = np.logaddexp(0.0, -diff / t)
    out["temperatures"] = {"candidate": temps[0], "deployed": temps[1]}
    return out


def _scatter(lengths: np.ndarray, scores: np.ndarray, seed: int) -> dict[str, list[float]]:
    keep = np.flatnonzero(np.isfinite(scores))
    if keep.size > SCATTER_POINTS:
        keep = np.sort(np.random.default_rng(seed).choice(keep, SCATTER_POINTS, replace=False))
    return {"length": lengths[keep].tolist(), "score": scores[keep].tolist()}


def evaluate(
    pairs: Sequence[PairRecord],
    ratings: Sequence[RatingRecord] = (),
    *,
    temperature: float = 1.0,
    probes: Sequence[PairRecord] | None = None,
    deployed_pairs: Sequence[PairRecord] | None = None,
    deployed_ratings: Sequence[RatingRecord] | None = None,
    rating_offset: float = 0.0,
    length_unit: str = "chars",
    n_bins: int = 10,
    n_boot: int = 2000,
    seed: int = 0,
) -> Metrics:
    """Every held-out metric of one model, as a JSON-serialisable dict.

    ``pairs``/``ratings``: the held-out set scored by the model being judged. ``temperature``:
    the T fitted on validation data (the artifact's calibration), never on these pairs.
    ``probes``: the shipped probe set (:func:`load_probes`) scored by the same model, with
    ``domain`` set to the probe category. ``deployed_pairs``: the deployed model's scores on
    the same pairs in the same order; gives ``vs_deployed``, the paired comparison the gate's
    regression rule needs. ``deployed_ratings``: the same for the ratings (same order, same
    ``rating_id``); gives ``vs_deployed.ratings``. ``rating_offset``: the reward at which a
    response counts as good (training's running baseline), for the ratings' calibration.
    Keys are documented in docs/evaluation.md.
    """
    sc, sr, lc, lr = _arrays(pairs)
    correct = _correct(pairs)
    n = len(pairs)
    diffs = sc - sr

    overall = accuracy_stats(correct)
    longer, shorter = accuracy_stats(lc > lr), accuracy_stats(lc < lr)
    best = max(
        (("always_longer", longer), ("always_shorter", shorter)), key=lambda kv: kv[1]["correct"]
    )
    lc_longer = accuracy_stats(correct[lc > lr])
    lc_shorter = accuracy_stats(correct[lc < lr])
    lc_acc = (
        (lc_longer["accuracy"] + lc_shorter["accuracy"]) / 2
        if lc_longer["n"] and lc_shorter["n"]
        else None
    )

    r_scores = np.array([r.score for r in ratings], dtype=np.float64)
    r_labels = np.array([r.label for r in ratings], dtype=np.float64)
    r_len = np.array([r.length for r in ratings], dtype=np.float64)
    all_scores = np.concatenate([sc, sr, r_scores])
    all_lengths = np.concatenate([lc, lr, r_len])

    metrics: Metrics = {
        "schema_version": SCHEMA_VERSION,
        "length_unit": length_unit,
        "n_pairs": n,
        "n_ratings": len(ratings),
        "pairs_fingerprint": _fingerprint(pairs),
        "accuracy": overall["accuracy"],
        "accuracy_ci": [overall["ci_low"], overall["ci_high"]],
        "correct": overall["correct"],
        "ties": int(np.sum(sc == sr)),
        "mean_margin": _num(diffs.mean()) if n else None,
        # The length effect in flat keys (the same figures as length_controlled, plus the
        # margin/length-difference correlation): what `palate eval --json` prints too.
        **length_effect(sc, sr, lc, lr),
        "baselines": {
            "always_longer": longer,
            "always_shorter": shorter,
            "best": best[0],
            "best_accuracy": best[1]["accuracy"],
        },
        "length_controlled": {
            "chosen_longer": lc_longer,
            "chosen_shorter": lc_shorter,
            "equal_length": int(np.sum(lc == lr)),
            "accuracy": lc_acc,
            "gap": (lc_longer["accuracy"] - lc_shorter["accuracy"] if lc_acc is not None else None),
        },
        "by_source": _by(pairs, correct, "source"),
        "by_domain": _by(pairs, correct, "domain"),
        "calibration": calibration(diffs, temperature, n_bins),
        "length_bias": {"spearman": spearman(all_lengths, all_scores), "n": int(all_scores.size)},
        "ratings": {
            **auc_stats(
                r_scores,
                r_labels,
                r_len,
                cluster_codes([r.cluster or r.rating_id for r in ratings]),
                n_boot,
                seed + 1,
            ),
            "calibration": rating_calibration(
                r_scores, r_labels, temperature, rating_offset, n_bins
            ),
        },
        "probes": _probe_metrics(probes) if probes is not None else None,
        "vs_deployed": (
            _compare(pairs, deployed_pairs, n_boot, seed) if deployed_pairs is not None else None
        ),
        "length_scatter": _scatter(all_lengths, all_scores, seed),
    }
    if deployed_ratings is not None:
        if metrics["vs_deployed"] is None:
            # Ratings only: an empty pair comparison keeps the dict's shape for its readers.
            metrics["vs_deployed"] = {"overall": paired_bootstrap([], [], n_boot), "slices": {}}
        metrics["vs_deployed"]["ratings"] = _rating_compare(
            ratings, deployed_ratings, n_boot, seed + 2
        )
    json.dumps(metrics, allow_nan=False)  # fail here, not in the registry, if anything slipped
    return metrics


def _probe_metrics(probes: Sequence[PairRecord]) -> dict[str, Any]:
    correct = _correct(probes)
    return {**accuracy_stats(correct), "by_category": _by(probes, correct, "domain")}


# -- the probe set ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """An obvious preference shipped with Palate: any sane reward model prefers ``chosen``."""

    prompt: str
    chosen: str
    rejected: str
    category: str

    @property
    def id(self) -> str:
        """Stable id from the content (for pairing candidate and deployed probe scores)."""
        text = "\x1f".join((self.prompt, self.chosen, self.rejected))
        return "probe-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def record(self, score_chosen: float, score_rejected: float) -> PairRecord:
        """The scored probe as a :class:`PairRecord` (lengths in characters)."""
        return PairRecord(
            score_chosen,
            score_rejected,
            len(self.chosen),
            len(self.rejected),
            source="probe",
            domain=self.category,
            pair_id=self.id,
        )


def load_probes() -> list[Probe]:
    """The probe set shipped in ``palate/data/probes.jsonl`` (see docs/evaluation.md)."""
    text = resources.files("palate").joinpath("data/probes.jsonl").read_text(encoding="utf-8")
    probes = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        try:
            probes.append(
                Probe(
                    str(obj["prompt"]),
                    str(obj["chosen"]),
                    str(obj["rejected"]),
                    str(obj["category"]),
                )
            )
        except KeyError as e:  # a packaging bug, not a user error: say where
            raise ValueError(f"probes.jsonl line {i}: missing {e}") from None
    return probes
