"""Privacy accounting: epsilon at a fixed delta for the rounds a user took part in.

Each round a client joins is one Gaussian mechanism on that user's clipped update: the
server averages ``n`` updates clipped to L2 norm ``C`` (sensitivity ``C / n`` for one user's
whole contribution) and adds Gaussian noise of standard deviation ``z * C / n``, so the
round's noise multiplier is ``z`` whatever ``n`` is. A client cannot check how the server
sampled, so its own ledger takes no credit for sampling ("no amplification"): epsilon is
the RDP composition of one Gaussian release per round joined, converted at ``delta``.

The arithmetic is Flower's own accountant (``flwr.supercore.privacy_accounting``), which
wraps Google's ``dp-accounting`` RDP accountant; tests hold it against dp-accounting used
directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_DELTA",
    "Budget",
    "BudgetExhausted",
    "epsilon_for",
    "noise_std",
]

#: Delta of every epsilon Palate reports (user-level: well below 1 / users of any team).
DEFAULT_DELTA = 1e-5


class BudgetExhausted(RuntimeError):
    """Taking part in the next round would spend more than the user's epsilon budget."""


def noise_std(noise_multiplier: float, clipping_norm: float, clients: int) -> float:
    """Standard deviation of the Gaussian noise the server adds to the averaged update:
    ``noise_multiplier * clipping_norm / clients`` (Flower's ``compute_stdv``)."""
    from flwr.supercore.differential_privacy import compute_stdv

    return float(compute_stdv(noise_multiplier, clipping_norm, clients))


def epsilon_for(noise_multipliers: Iterable[float], delta: float = DEFAULT_DELTA) -> float:
    """Epsilon at ``delta`` after one Gaussian release per noise multiplier (0 for none).

    A multiplier of 0 (no noise) has no finite epsilon: the result is ``inf``.
    """
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    zs = list(noise_multipliers)
    if not zs:
        return 0.0
    if any(z <= 0 for z in zs):
        return float("inf")
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    for z in zs:
        accountant.compose(
            GaussianPrivacyEvent(noise_multiplier=z, sample_size=1, population_size=1)
        )
    return float(accountant.get_privacy_spent().epsilon)


@dataclass
class Budget:
    """A user's epsilon budget over the rounds already recorded in their ledger."""

    epsilon: float
    delta: float = DEFAULT_DELTA

    def spent(self, recorded: Iterable[float]) -> float:
        return epsilon_for(recorded, self.delta)

    def allows(self, recorded: Iterable[float], next_multiplier: float) -> bool:
        """Whether one more round at ``next_multiplier`` stays within the budget."""
        return epsilon_for([*recorded, next_multiplier], self.delta) <= self.epsilon

    def check(self, recorded: Iterable[float], next_multiplier: float) -> None:
        rounds = list(recorded)
        if not self.allows(rounds, next_multiplier):
            spent = self.spent(rounds)
            raise BudgetExhausted(
                f"privacy budget reached: epsilon {spent:.3f} spent of {self.epsilon:g} "
                f"(delta {self.delta:g}) after {len(rounds)} round(s); one more round at "
                f"noise multiplier {next_multiplier:g} would exceed it"
            )
