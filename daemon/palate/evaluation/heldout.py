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
    "calibration",
    "evaluate",
    "fit_temperature",
    "load_probes",
    "paired_bootstrap",
    "rating_auc",
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
    comparison really is on the same pairs and fingerprints the held-out set.
    """

    score_chosen: float
    score_rejected: float
    len_chosen: int
    len_rejected: int
    source: str = ""
    domain: str = ""
    pair_id: str = ""


@dataclass(frozen=True)
class RatingRecord:
    """One scored unpaired judgement; ``label >= 0.5`` counts as good (soft labels allowed)."""

    score: float
    label: float
    length: int
    source: str = ""
    domain: str = ""


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


# -- paired comparison ------------------------------------------------------------------------


def paired_bootstrap(
    candidate_correct: Sequence[bool] | np.ndarray,
    deployed_correct: Sequence[bool] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap of ``acc(candidate) - acc(deployed)`` on the SAME pairs, resampling pairs.

    Pairing is what makes small held-out sets usable: pairs both models get right (or both
    wrong) cancel, and only disagreements carry variance. Per pair the difference is -1, 0 or
    +1, so resampling n pairs with replacement is exactly a multinomial draw of those three
    counts; drawing the counts directly is the same bootstrap in O(n_boot) memory.

    Returns ``n``, both accuracies, ``diff``, the two-sided 95% percentile interval
    ``ci_low``/``ci_high`` (2.5th/97.5th percentiles), ``lower_95`` (5th percentile: the
    one-sided 95% lower bound the gate's non-inferiority rule uses), ``wins``/``losses``
    (pairs only the candidate / only the deployed model gets right) and ``n_boot``.
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
            "wins": 0,
            "losses": 0,
            "n_boot": n_boot,
        }
    rng = np.random.default_rng(seed)
    probs = np.array([wins, losses, n - wins - losses], dtype=np.float64) / n
    draws = rng.multinomial(n, probs, size=n_boot)
    boot = (draws[:, 0] - draws[:, 1]) / n
    q025, q05, q975 = np.quantile(boot, [0.025, 0.05, 0.975])
    return {
        "n": n,
        "candidate_accuracy": float(c.mean()),
        "deployed_accuracy": float(d.mean()),
        "diff": (wins - losses) / n,
        "ci_low": float(q025),
        "ci_high": float(q975),
        "lower_95": float(q05),
        "wins": wins,
        "losses": losses,
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
    slices = {
        name: paired_bootstrap(c[m], d[m], n_boot, seed + i + 1)
        for i, (name, m) in enumerate(_slice_masks(pairs).items())
    }
    return {"overall": paired_bootstrap(c, d, n_boot, seed), "slices": slices}


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
    regression rule needs. Keys are documented in docs/evaluation.md.
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
            "n": len(ratings),
            "positives": int((r_labels >= 0.5).sum()),
            "negatives": int((r_labels < 0.5).sum()),
            "auc": rating_auc(r_scores, r_labels),
        },
        "probes": _probe_metrics(probes) if probes is not None else None,
        "vs_deployed": (
            _compare(pairs, deployed_pairs, n_boot, seed) if deployed_pairs is not None else None
        ),
        "length_scatter": _scatter(all_lengths, all_scores, seed),
    }
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
