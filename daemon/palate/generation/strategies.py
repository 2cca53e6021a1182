"""Picking one candidate out of N by its reward: pure functions, no model.

- ``best`` (best-of-N): the highest score. Its KL from the policy is at most
  log N − (N−1)/N and its win rate over one policy sample at most N/(N+1) (Beirami et al.
  2024), which is what makes small N worth it.
- ``soft`` (soft best-of-N, Verdun et al. 2025): draw candidate i with probability
  ∝ exp(z_i / λ). λ → 0 is best-of-N, λ → ∞ a plain policy sample; in between it trades
  reward for diversity and less over-optimisation. Scores enter as z (the reward model's
  validation-normalised scale), so λ means the same across retrains.
- ``lower_bound``: the highest r − κ·u, where u is the ensemble's per-candidate spread (in
  raw reward units, as ``rerank``'s ``lower_bound``). It prefers a candidate the members
  agree is good over one a single member loves (Coste et al. 2023: conservative objectives
  remove best-of-N over-optimisation). Without an ensemble u is absent and this is
  best-of-N; the answer says which.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_KAPPA", "DEFAULT_LAMBDA", "STRATEGIES", "Choice", "choose"]

STRATEGIES = ("best", "soft", "lower_bound")
DEFAULT_LAMBDA = 0.5
DEFAULT_KAPPA = 1.0


@dataclass(frozen=True)
class Choice:
    index: int
    #: soft: the probability each candidate had of being drawn; lower_bound: z - kappa*u.
    weights: list[float] | None = None
    fallback: str | None = None  # why the strategy could not run as asked


def choose(
    raw: Sequence[float],
    z: Sequence[float],
    strategy: str = "best",
    *,
    lam: float = DEFAULT_LAMBDA,
    kappa: float = DEFAULT_KAPPA,
    uncertainty: Sequence[float] | None = None,
    seed: int | None = None,
) -> Choice:
    """The candidate ``strategy`` picks from raw scores and their z-scores (ties: the
    earliest); ``seed`` fixes the soft draw."""
    if not raw:
        raise ValueError("no candidates to choose from")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "soft":
        if not lam > 0:
            raise ValueError("lambda must be positive")
        top = max(z)
        e = [math.exp((x - top) / lam) for x in z]
        total = sum(e)
        p = [x / total for x in e]
        r = random.Random(seed).random()
        acc = 0.0
        for i, pi in enumerate(p):
            acc += pi
            if r < acc:
                return Choice(i, p)
        return Choice(len(p) - 1, p)
    if strategy == "lower_bound":
        if not uncertainty:
            return Choice(_argmax(raw), None, "no ensemble: the lower bound is the score")
        lb = [x - kappa * u for x, u in zip(raw, uncertainty, strict=True)]
        return Choice(_argmax(lb), lb)
    return Choice(_argmax(raw))


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))
