"""Losses for pairs and ratings in one run, and the accuracy that counts ties as wrong.

- Pairs: Bradley-Terry ``-log sigmoid(r_c - r_r - margin)`` (margin 0 unless the event
  carries one; TRL's form, and unlike OpenRLHF's LogExpLoss it honours the margin).
- Ratings: BCE of ``sigmoid(r - delta)`` against the label, where ``delta`` is a running mean
  of rewards (BCO's baseline): a thumbs-up means "better than this user's typical response",
  which puts ratings on the same scale as pairs.
- Centering: ``eta * mean(r^2)`` (Eisenstein et al. 2023): BT is shift-invariant, so without
  it rewards drift and z-normalisation / mixing with BCE get harder.

Sums are divided by a caller-given normaliser so that a batch split across parallel streams
gives exactly the gradient of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

try:
    from palate.model.blas import ensure_fast_blas

    ensure_fast_blas()
except ImportError:  # pragma: no cover
    pass

import mlx.core as mx
import mlx.nn as nn

__all__ = ["LossInputs", "LossTerms", "ensemble_loss", "length_correlation", "preference_loss"]


@dataclass
class LossInputs:
    """Which reward rows form pairs / ratings, as MLX arrays (see batching.Batch)."""

    pair_idx: mx.array  # (P, 2)
    margin: mx.array  # (P,)
    pair_weight: mx.array  # (P,)
    rating_idx: mx.array  # (Q,)
    label: mx.array  # (Q,)
    rating_weight: mx.array  # (Q,)
    #: Ensembles: each member's bootstrap multiplier of the weights, (P, K) and (Q, K).
    member_weight: tuple[mx.array, mx.array] | None = None


@dataclass
class LossTerms:
    """Un-normalised sums, so shards of one batch add up exactly."""

    loss: mx.array  # scalar, already divided by the normaliser
    nll_sum: mx.array  # sum of weighted BT + BCE terms (for reporting)
    correct: mx.array  # number of correct pairs/ratings (ties wrong)
    count: mx.array  # number of pairs + ratings


def preference_loss(
    rewards: mx.array,
    inputs: LossInputs,
    delta: float,
    center: float,
    weight_norm: float,
    rows_norm: float,
) -> LossTerms:
    """Loss of one (shard of a) batch.

    ``rewards`` (S,); ``weight_norm`` = total example weight of the whole batch;
    ``rows_norm`` = total reward rows of the whole batch (for the centering mean).
    """
    nll = mx.array(0.0)
    correct = mx.array(0.0)
    count = 0
    if inputs.pair_idx.shape[0]:
        rc = rewards[inputs.pair_idx[:, 0]]  # (P,)
        rr = rewards[inputs.pair_idx[:, 1]]  # (P,)
        diff = rc - rr
        bt = -nn.log_sigmoid(diff - inputs.margin)  # (P,)
        nll = nll + (bt * inputs.pair_weight).sum()
        correct = correct + (diff > 0).sum()  # a tie is not a correct ranking
        count += inputs.pair_idx.shape[0]
    if inputs.rating_idx.shape[0]:
        logit = rewards[inputs.rating_idx] - delta  # (Q,)
        y = inputs.label
        bce = -(y * nn.log_sigmoid(logit) + (1 - y) * nn.log_sigmoid(-logit))  # (Q,)
        nll = nll + (bce * inputs.rating_weight).sum()
        # label >= 0.5 is good, as in evaluation (heldout.RatingRecord); a logit of 0 is a tie.
        correct = correct + (((logit > 0) == (y >= 0.5)) & (logit != 0)).sum()
        count += inputs.rating_idx.shape[0]
    loss = nll / weight_norm + center * (rewards * rewards).sum() / rows_norm
    return LossTerms(loss=loss, nll_sum=nll, correct=correct, count=mx.array(count))


def ensemble_loss(
    rewards: mx.array,
    inputs: LossInputs,
    delta: float,
    center: float,
    weight_norm: float,
    rows_norm: float,
) -> LossTerms:
    """The mean over K members of each member's :func:`preference_loss` on its own
    bootstrap weights; ``rewards`` (S, K). The shared trunk gets the members' mean gradient
    (the size of one model's), each head its own. ``nll_sum`` and ``correct`` describe the
    ensemble's score (the member mean) on the unresampled weights, for progress reports."""
    assert inputs.member_weight is not None
    pm, rm = inputs.member_weight
    plain = replace(inputs, member_weight=None)
    k = rewards.shape[1]
    loss = mx.array(0.0)
    for j in range(k):
        member = replace(
            plain,
            pair_weight=inputs.pair_weight * pm[:, j],
            rating_weight=inputs.rating_weight * rm[:, j],
        )
        loss = (
            loss
            + preference_loss(rewards[:, j], member, delta, center, weight_norm, rows_norm).loss
        )
    report = preference_loss(rewards.mean(axis=1), plain, delta, 0.0, weight_norm, rows_norm)
    return LossTerms(
        loss=loss / k, nll_sum=report.nll_sum, correct=report.correct, count=report.count
    )


def length_correlation(rewards: mx.array, log_len: mx.array) -> mx.array:
    """Pearson correlation of the reward with the log response length over a batch's rows.

    ``rewards`` (S,) or (S, K) (an ensemble: the member mean), ``log_len`` (S,). The length
    lever's penalty is its square (training.py, ``length_decorr``): differentiable, zero when
    the reward carries no linear trace of length, and blind to the reward's scale, so it
    cannot be met by shrinking the rewards. Batch statistics are noisy; that is fine for a
    regulariser but the figure is not a metric (evaluation reports ``length_corr``). 0 for
    fewer than 3 rows or constant lengths.
    """
    r = rewards.mean(axis=1) if rewards.ndim == 2 else rewards
    if r.shape[0] < 3:
        return mx.array(0.0)
    rc = r - r.mean()
    lc = log_len - log_len.mean()
    denom = mx.sqrt((rc * rc).sum() * (lc * lc).sum() + 1e-12)
    return (rc * lc).sum() / denom
