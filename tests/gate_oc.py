"""The gate's operating characteristic: simulated nights through the real evaluate/decide.

A night: ``n`` held-out pairs scored by the deployed model and by a candidate whose true
accuracy differs by ``delta``; the two models disagree (one right, the other wrong) on about
``disagreement`` of the pairs. The gate sees exactly what the training child hands it
(``evaluate`` of both, the candidate with ``deployed_pairs``), and the fraction of nights
it deploys or rejects is the operating characteristic.

Generative model (documented in docs/evaluation.md): pair i of prompt c has a shared
difficulty ``s_i = u_c + v_i`` (prompt effect plus pair effect, total variance 1); model k's
margin is ``mu + b_k + s_i + sigma * e_ki``. ``mu`` puts the deployed model at 70% accuracy,
``b_k`` shifts the candidate by ``delta`` points, ``sigma`` is solved so the models disagree
on ``disagreement`` of the pairs when equal. Each model reports its margins in its own
reward units (a random scale), as two retrains do. Lengths are independent of everything
(no length shortcut), prompts hold 1-3 pairs, and the probe set is passed by both.

``python tests/gate_oc.py`` prints the table in docs/evaluation.md.
"""

from __future__ import annotations

import functools
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from palate.evaluation.gate import GatePolicy, decide
from palate.evaluation.heldout import PairRecord, evaluate

BASE_ACCURACY = 0.70


def _phi_inv(p: float) -> float:
    """Inverse normal CDF by bisection (no scipy)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@functools.cache
def solve_sigma(disagreement: float) -> float:
    """The model noise that makes two equal models disagree on ``disagreement`` of pairs."""
    rng = np.random.default_rng(12345)
    z = rng.normal(size=(3, 400_000))

    def rate(sigma: float) -> float:
        mu = _phi_inv(BASE_ACCURACY) * math.sqrt(1 + sigma**2)
        a = mu + z[0] + sigma * z[1]
        b = mu + z[0] + sigma * z[2]
        return float(((a > 0) != (b > 0)).mean())

    lo, hi = 1e-3, 5.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) < disagreement else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Night:
    candidate: list[PairRecord]
    deployed: list[PairRecord]
    disagreement: float


def simulate_night(n: int, disagreement: float, delta: float, rng: np.random.Generator) -> Night:
    sigma = solve_sigma(disagreement)
    scale = math.sqrt(1 + sigma**2)
    mu = _phi_inv(BASE_ACCURACY) * scale
    b_c = _phi_inv(BASE_ACCURACY + delta) * scale - mu
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])))
    cluster = np.repeat(np.arange(len(sizes)), sizes)[:n]
    u = rng.normal(0.0, math.sqrt(0.3), len(sizes))[cluster]
    s = u + rng.normal(0.0, math.sqrt(0.7), n)
    m_d = mu + s + sigma * rng.normal(size=n)
    m_c = mu + b_c + s + sigma * rng.normal(size=n)
    scale_d, scale_c = rng.uniform(0.5, 3.0, 2)
    base = rng.normal(size=n)  # reward of the rejected response, in arbitrary units
    len_c = rng.integers(20, 400, n)
    len_r = rng.integers(20, 400, n)

    def records(margins: np.ndarray, k: float) -> list[PairRecord]:
        return [
            PairRecord(
                float(k * (base[i] + margins[i])),
                float(k * base[i]),
                int(len_c[i]),
                int(len_r[i]),
                "sim",
                "",
                f"pair{i}",
                f"prompt{cluster[i]}",
            )
            for i in range(n)
        ]

    return Night(
        records(m_c, scale_c), records(m_d, scale_d), float(((m_c > 0) != (m_d > 0)).mean())
    )


PROBES = [PairRecord(1.0, 0.0, 10, 10, "probe", "x", f"probe{i}") for i in range(48)]


Rule = Callable[[dict[str, Any], dict[str, Any]], str]


def judge(night: Night, policy: GatePolicy | None = None, rule: Rule | None = None) -> str:
    """The action for one night: ``decide`` under ``policy``, or ``rule(candidate,
    deployed)`` on the same metrics (to measure another rule on the same nights)."""
    dep = evaluate(night.deployed, probes=PROBES)
    cand = evaluate(night.candidate, probes=PROBES, deployed_pairs=night.deployed)
    if rule is not None:
        return rule(cand, dep)
    return decide(cand, dep, policy or GatePolicy()).action


def operating_characteristic(
    n: int,
    disagreement: float,
    delta: float,
    nights: int,
    seed: int = 0,
    policy: GatePolicy | None = None,
    rule: Rule | None = None,
) -> dict[str, float]:
    """Fractions of nights that deploy / reject / hold, and the mean simulated disagreement."""
    rng = np.random.default_rng(seed)
    actions: Counter[str] = Counter()
    dis = 0.0
    for _ in range(nights):
        night = simulate_night(n, disagreement, delta, rng)
        dis += night.disagreement
        actions[judge(night, policy, rule)] += 1
    return {
        "deploy": actions["deploy"] / nights,
        "reject": actions["reject"] / nights,
        "hold": actions["hold"] / nights,
        "disagreement": dis / nights,
    }


def main() -> int:
    nights = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"nights per cell: {nights}; deploy% / reject% (hold% when any)")
    print(
        "| pairs | disagreement | 5 pts worse | 2 pts worse | equal | 2 pts better | 5 pts better |"
    )
    print("|---|---|---|---|---|---|---|")
    # Rows as PAIRS:DISAGREEMENT after the night count (e.g. `400:0.20`); all by default.
    rows = [(int(a), float(b)) for a, b in (r.split(":") for r in sys.argv[2:])] or [
        (n, dis) for n in (50, 100, 200, 400) for dis in (0.10, 0.15, 0.20)
    ]
    for n, dis in rows:
        cells = []
        for delta in (-0.05, -0.02, 0.0, 0.02, 0.05):
            oc = operating_characteristic(n, dis, delta, nights, seed=7)
            cell = f"{100 * oc['deploy']:.0f} / {100 * oc['reject']:.0f}"
            if oc["hold"]:
                cell += f" ({100 * oc['hold']:.0f})"
            cells.append(cell)
        print(f"| {n} | {100 * dis:.0f}% | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
