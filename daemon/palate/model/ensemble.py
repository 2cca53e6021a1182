"""Ensembles: K reward heads on one shared trunk, and what their disagreement tells.

Palate's reward model is an ensemble by default (``TrainConfig.members``, 5): the frozen base,
its cached prefix and the LoRA on the top blocks are shared, and the head is ``Linear(D, K)``,
one output per member. Each member is trained on its own bootstrap resample of the data
(Poisson(1) weights per example, :func:`bootstrap_weights`) from its own random init, so the
members agree where the data is dense and drift apart where it is thin or contradictory.
Sharing the trunk is what keeps the cost at about one model's (docs/benchmarks.md measures
this against K separately trained top-block LoRAs): the heads add K x D weights and nothing
to the forward.

- The **score** is the member mean. The heads are linear on the same features, so the mean
  is itself one linear head: calibration, the evaluator and the gate see one score as before.
- The **uncertainty** of a candidate is the spread (standard deviation) of its member scores,
  each member first shifted by its own mean on validation data (Bradley-Terry rewards have
  an arbitrary offset per member; a constant shift says nothing about a preference). It is 0
  when every member gives the same score, and in the units of the scores.
- **Confident** (as lasgroup/rewarduq): the winner's lower bound ``mean - spread`` is above
  the runner-up's upper bound ``mean + spread``.
- **What a label is worth** (the review queue): the mutual information between the user's
  answer and which member is right (BALD, Houlsby et al. 2011), in nats:
  ``H(mean_k p_k) - mean_k H(p_k)`` with ``p_k = sigmoid((r_k(a) - r_k(b)) / T)``. High when
  members are each sure but disagree; 0 when they agree, however unsure they all are.

This module is numpy only (no MLX), so the daemon's socket layer can use it without loading
the model stack. Anchors: Coste et al. 2023 (reward model ensembles against
overoptimisation: worst-case and uncertainty-weighted objectives, which ``lower_bound`` is),
Eisenstein et al. 2023 (ensembles help but members share errors: the spread is a floor on
the uncertainty, not all of it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Question",
    "agreement",
    "bootstrap_weights",
    "bounds_separate",
    "member_stats",
    "pair_information",
    "pick_question",
]


def bootstrap_weights(n: int, members: int, seed: int) -> np.ndarray:
    """(members, n) Poisson(1) example weights: member k's bootstrap resample of n examples
    (the online form of sampling n with replacement; the expected total stays n). One
    member is the whole data set unresampled: a single-member "ensemble" is the plain model."""
    if members <= 1:
        return np.ones((1, n), dtype=np.float32)
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.poisson(1.0, size=(members, n)).astype(np.float32)


def member_stats(
    members: np.ndarray, offsets: Sequence[float] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, spread) per candidate from member scores (N, K).

    ``offsets`` (K,) are the members' mean scores on validation data; the spread is taken
    after removing them (the mean is unchanged by that: it shifts by a constant).
    Spread is the population standard deviation over members: exactly 0 for one member or
    for identical members.
    """
    m = np.asarray(members, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]
    mean = m.mean(axis=1)
    if m.shape[1] < 2:
        return mean, np.zeros_like(mean)
    centred = m - (np.asarray(offsets, dtype=np.float64)[None, :] if offsets is not None else 0)
    return mean, centred.std(axis=1)


def _entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return np.asarray(-(q * np.log(q) + (1 - q) * np.log(1 - q)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))


def pair_information(
    member_a: np.ndarray, member_b: np.ndarray, temperature: float
) -> tuple[float, float, float]:
    """(information in nats, p(a beats b) of the member mean, share of members that prefer
    a, a tie counting half) for one pair, from member scores (K,) of a and of b."""
    d = np.asarray(member_a, dtype=np.float64) - np.asarray(member_b, dtype=np.float64)
    t = max(float(temperature), 1e-6)
    p_k = _sigmoid(d / t)
    p_mean = float(_sigmoid(np.asarray(d.mean() / t)))
    info = float(_entropy(np.asarray(p_k.mean())) - _entropy(p_k).mean())
    votes_a = float(((d > 0) + 0.5 * (d == 0)).mean())
    return max(info, 0.0), p_mean, votes_a


def bounds_separate(
    mean_a: float, spread_a: float, mean_b: float, spread_b: float, width: float = 1.0
) -> bool:
    """The rewarduq rule: the better one's lower bound is above the other's upper bound."""
    if mean_a < mean_b:
        mean_a, spread_a, mean_b, spread_b = mean_b, spread_b, mean_a, spread_a
    return mean_a - width * spread_a > mean_b + width * spread_b


@dataclass(frozen=True)
class Question:
    """The pair of candidates whose label is worth most, and why."""

    a: int
    b: int
    info: float  # nats
    p_a_over_b: float
    votes_a: float  # share of members that prefer a
    members: int

    def why(self) -> str:
        if self.members > 1 and self.info > 1e-4:
            k = round(self.votes_a * self.members)
            return (
                f"the {self.members} ensemble members split {k}-{self.members - k} on which "
                f"is better (expected information {self.info:.3f} nats)"
            )
        if self.members > 1:
            return (
                f"the {self.members} members agree; the closest call among the candidates "
                f"(p(a beats b) = {self.p_a_over_b:.2f})"
            )
        return f"the closest call among the candidates (p(a beats b) = {self.p_a_over_b:.2f})"


def pick_question(members: np.ndarray, temperature: float) -> Question | None:
    """The most informative pair among N candidates with member scores (N, K): highest
    information, then the closest call. None with fewer than two candidates."""
    m = np.asarray(members, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]
    if m.shape[0] < 2:
        return None
    best: Question | None = None
    for i, j in itertools.combinations(range(m.shape[0]), 2):
        info, p, votes = pair_information(m[i], m[j], temperature)
        q = Question(a=i, b=j, info=info, p_a_over_b=p, votes_a=votes, members=m.shape[1])
        if best is None or _worth(q) > _worth(best):
            best = q
    return best


def _worth(q: Question) -> tuple[float, float]:
    """Information first (rounded, so float noise never outranks the closer call)."""
    return round(q.info, 9), -abs(q.p_a_over_b - 0.5)


def agreement(votes_a: float, p_a_over_b: float) -> float:
    """Share of members on the side the member mean prefers."""
    return votes_a if p_a_over_b >= 0.5 else 1.0 - votes_a
