"""Scoring: raw rewards, z-scores and calibrated preference probabilities.

``Scorer.score(prompt, responses)`` runs all candidates of one prompt in one grouped forward
(the prompt computed once). A response's score does not depend on its neighbours: each
response is truncated on its own, and right padding never reaches a real token under causal
attention, so a score alone and in a padded batch agree to float rounding (tested, 1e-4).

Calibration: the reward difference of a pair is a logit under Bradley-Terry, so
``p(a > b) = sigmoid((r_a - r_b) / T)`` with ``T`` fitted on validation pairs by minimising
their log loss. Scores are also reported as ``z = (r - mean) / std`` over validation rewards,
so thresholds mean the same across retrains.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

try:
    from palate.model.blas import ensure_fast_blas

    ensure_fast_blas()
except ImportError:  # pragma: no cover
    pass

import mlx.core as mx
import numpy as np

from palate.model.batching import (
    Batch,
    EncodedGroup,
    bucket_batches,
    collate,
    split_batch,
)
from palate.model.cpu_forward import (
    PARITY_TOLERANCE,
    CpuEngine,
    cpu_engine_unsupported,
    default_threads,
    parity_error,
)
from palate.model.ensemble import member_stats
from palate.model.reward_model import (
    Messages,
    RewardModel,
    configure_cpu_threads,
    encode_prompt_responses,
    truncate_group,
)

__all__ = [
    "Calibration",
    "PrefixSource",
    "ScoreResult",
    "Scorer",
    "batch_arrays",
    "engine_parity",
    "group_rewards",
    "make_streams",
    "use_cpu_engine",
]


@dataclass(frozen=True)
class Calibration:
    """Score normalisation and temperature, stored in the artifact."""

    mean: float = 0.0
    std: float = 1.0
    temperature: float = 1.0
    #: Each ensemble member's mean score on validation data: removed before the spread is
    #: taken, since a Bradley-Terry member's constant offset says nothing (model/ensemble.py).
    member_offsets: tuple[float, ...] = ()
    #: The reward at which a rated response counts as good: training's running baseline
    #: (ratings' BCE is on ``reward - offset``). ``p(good) = sigmoid((r - offset) / T)``.
    offset: float = 0.0

    def z(self, r: np.ndarray) -> np.ndarray:
        return (r - self.mean) / max(self.std, 1e-8)

    def prob(self, r_a: float, r_b: float) -> float:
        """p(a preferred over b) = sigmoid((r_a - r_b) / T)."""
        x = (r_a - r_b) / self.temperature
        return float(1.0 / (1.0 + math.exp(-x))) if x > -700 else 0.0

    def prob_good(self, r: float) -> float:
        """p(a rating would call this response good) = sigmoid((r - offset) / T)."""
        x = (r - self.offset) / self.temperature
        return float(1.0 / (1.0 + math.exp(-x))) if x > -700 else 0.0


def make_streams(n: int) -> list[Any]:
    """``n`` CPU/GPU streams for data-parallel shards (one is the default stream)."""
    if n <= 1:
        return [mx.default_stream(mx.default_device())]
    return [mx.new_stream(mx.default_device()) for _ in range(n)]


def batch_arrays(b: Batch) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
    return (
        mx.array(b.prompt),
        mx.array(b.prompt_len),
        mx.array(b.response),
        mx.array(b.response_len),
        mx.array(b.group),
    )


def use_cpu_engine(model: RewardModel, wanted: bool = True) -> bool:
    """Whether gradient-free passes of ``model`` should run on :class:`CpuEngine`: on the
    CPU device, for architectures it implements (see palate.model.cpu_forward), and only
    once the engine has computed what MLX computes on this base (:func:`engine_parity`)."""
    return (
        wanted
        and os.environ.get("PALATE_CPU_FORWARD", "1") != "0"
        and mx.default_device() == mx.cpu
        and cpu_engine_unsupported(model) is None
        and engine_parity(model) is None
    )


_parity: dict[tuple[int, int, int], str | None] = {}
log = logging.getLogger("palate.model")


def engine_parity(model: RewardModel) -> str | None:
    """None when the numpy engine matches MLX on ``model``'s base, else why not.

    The engine reimplements the blocks; a base whose blocks hold something it does not
    (a bias it drops, another RoPE) would score silently wrong. So before the first engine
    of a base is used, a short batch runs through both (:func:`parity_error`); on a
    mismatch every pass of that base stays on MLX (slower, right) and the reason is logged.
    Checked once per base and LoRA placement in a process, on the model first asked about.
    """
    key = (id(model.embed_tokens.weight), int(model.num_layers), int(model.split))
    if key not in _parity:
        engine = CpuEngine(model, threads=1)
        try:
            err = parity_error(model, engine)
        finally:
            engine.close()
        reason = None
        if not err <= PARITY_TOLERANCE:
            reason = (
                f"numpy forward differs from MLX by {err:.3g} (relative; at most "
                f"{PARITY_TOLERANCE:g} allowed): scoring and caching stay on MLX"
            )
            log.warning("%s", reason)
        _parity[key] = reason
    return _parity[key]


def group_rewards(
    model: RewardModel,
    groups: Sequence[EncodedGroup],
    token_budget: int,
    streams: Sequence[Any],
    hidden: Sequence[tuple[np.ndarray, list[np.ndarray]]] | None = None,
    engine: CpuEngine | None = None,
) -> list[np.ndarray]:
    """Rewards of every response of every group, in order (one array per group).

    With ``hidden`` (the frozen-prefix cache) only the blocks above ``model.split`` run.
    With ``engine`` (a numpy snapshot of ``model``) the forward runs there instead of MLX.

    The model runs in eval mode (restored afterwards): with LoRA dropout > 0 an MLX module
    in training mode drops activations at random, so the same response would score
    differently on every call, and differently from the numpy engine, which has no dropout.
    """
    was_training = bool(model.training)
    if was_training:
        model.eval()
    try:
        return _group_rewards(model, groups, token_budget, streams, hidden, engine)
    finally:
        if was_training:
            model.train()


def _group_rewards(
    model: RewardModel,
    groups: Sequence[EncodedGroup],
    token_budget: int,
    streams: Sequence[Any],
    hidden: Sequence[tuple[np.ndarray, list[np.ndarray]]] | None,
    engine: CpuEngine | None,
) -> list[np.ndarray]:
    start = model.split if hidden is not None else 0
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(groups)
    for index in bucket_batches(groups, token_budget):
        if engine is not None:
            b = collate(groups, index, hidden)
            r_np = engine.forward_groups(
                b.prompt, b.prompt_len, b.response, b.response_len, b.group, start=start
            )
            assert isinstance(r_np, np.ndarray)
            results: list[tuple[list[int], Any]] = [(list(index), r_np)]
        else:
            results = []
            shards = split_batch(index, groups, len(streams))
            for shard, stream in zip(shards, streams, strict=False):
                with mx.stream(stream):
                    r = model.forward_groups(
                        *batch_arrays(collate(groups, shard, hidden)), start=start
                    )
                results.append((shard, r))
            mx.eval([r for _, r in results])
        for shard, r in results:
            vals = np.array(r, dtype=np.float32)
            pos = 0
            for i in shard:
                k = len(groups[i].responses)
                out[i] = vals[pos : pos + k]
                pos += k
    return out


class PrefixSource(Protocol):
    """Where a :class:`Scorer` gets the frozen blocks' outputs instead of computing them
    (model/prefix.py's ``FrozenPrefix``: one frozen pass shared by the gate's candidate and
    deployed model, kept across nights). ``split``: the blocks below it are frozen."""

    split: int

    def hidden(
        self,
        model: RewardModel,
        groups: Sequence[EncodedGroup],
        token_budget: int,
        streams: Sequence[Any],
        engine: CpuEngine | None = None,
    ) -> list[tuple[np.ndarray, list[np.ndarray]]]: ...


@dataclass(frozen=True)
class ScoreResult:
    """Scores of the candidates of one prompt, in input order. ``raw`` is the ensemble's
    member mean, ``members`` each candidate's member scores, ``uncertainty`` their spread
    (0 for a one-member model)."""

    raw: list[float]
    z: list[float]
    truncated: list[bool]
    members: list[list[float]] = field(default_factory=list)
    uncertainty: list[float] = field(default_factory=list)


def mean_rewards(r: np.ndarray) -> np.ndarray:
    """The score of rewards (N,) or member rewards (N, K): the member mean."""
    return r.mean(axis=-1) if r.ndim == 2 else r


class Scorer:
    """Scores responses with a trained reward model.

    Not thread-safe: one thread owns MLX in the daemon (see DESIGN.md, scorer).
    """

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Any,
        max_tokens: int,
        calibration: Calibration | None = None,
        token_budget: int = 4096,
        n_streams: int = 1,
        cpu_forward: bool = True,
        prefix: PrefixSource | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.calibration = calibration or Calibration()
        self.token_budget = token_budget
        if n_streams > 1:
            configure_cpu_threads(n_streams)
        self.streams = make_streams(n_streams)
        #: On CPU, scoring runs on a numpy snapshot of the weights (several times faster
        #: than MLX's CPU kernels); the model must not change after the Scorer is built.
        self.engine: CpuEngine | None = (
            CpuEngine(model, threads=default_threads())
            if use_cpu_engine(model, cpu_forward)
            else None
        )
        #: The frozen blocks' outputs come from here when its split is this model's (the
        #: caller vouches for the base): only the top blocks run. Scores then carry the
        #: cache's storage rounding, as training's validation scores do.
        self.prefix = prefix if prefix is not None and 0 < prefix.split == model.split else None

    def encode(
        self, prompt: str | Messages, responses: Sequence[str]
    ) -> tuple[list[EncodedGroup], list[tuple[int, int]]]:
        """Groups for one prompt, and (group, row) of each response in input order.

        Each response is truncated alone, so no score depends on another candidate's length;
        responses whose truncated prompts coincide (the usual case) share one group.
        """
        p_ids, r_ids = encode_prompt_responses(self.tokenizer, prompt, responses)
        groups: list[EncodedGroup] = []
        by_cut: dict[int, int] = {}
        slots: list[tuple[int, int]] = []
        for r in r_ids:
            p, (rr,), trunc = truncate_group(p_ids, [r], self.max_tokens)
            cut = trunc.prompt_tokens_cut
            if cut not in by_cut:
                by_cut[cut] = len(groups)
                groups.append(
                    EncodedGroup(prompt=np.asarray(p, dtype=np.int32), responses=[], kind="score")
                )
            g = groups[by_cut[cut]]
            g.responses.append(np.asarray(rr, dtype=np.int32))
            if trunc.truncated:
                g.truncation = trunc
            slots.append((by_cut[cut], len(g.responses) - 1))
        return groups, slots

    def _run(
        self, requests: Sequence[tuple[str | Messages, Sequence[str]]]
    ) -> list[tuple[np.ndarray, list[bool]]]:
        groups: list[EncodedGroup] = []
        slots: list[list[tuple[int, int]]] = []
        for prompt, responses in requests:
            gs, sl = self.encode(prompt, responses)
            slots.append([(len(groups) + g, j) for g, j in sl])
            groups.extend(gs)
        hidden = (
            self.prefix.hidden(self.model, groups, self.token_budget, self.streams, self.engine)
            if self.prefix is not None
            else None
        )
        rewards = group_rewards(
            self.model, groups, self.token_budget, self.streams, hidden, engine=self.engine
        )
        out = []
        for sl in slots:
            raw = np.array([rewards[g][j] for g, j in sl], dtype=np.float32)  # (N,) or (N, K)
            out.append((raw, [groups[g].truncation.truncated for g, _ in sl]))
        return out

    def _result(self, members: np.ndarray, truncated: list[bool]) -> ScoreResult:
        m = members if members.ndim == 2 else members[:, None]  # (N, K)
        offsets = self.calibration.member_offsets
        raw, spread = member_stats(m, offsets if len(offsets) == m.shape[1] else None)
        return ScoreResult(
            raw=[float(x) for x in raw],
            z=[float(x) for x in self.calibration.z(raw)],
            truncated=truncated,
            members=m.astype(np.float64).tolist(),
            uncertainty=[float(x) for x in spread],
        )

    def raw_scores(self, prompt: str | Messages, responses: Sequence[str]) -> np.ndarray:
        """Raw rewards (N,) for the responses to one prompt (the member mean)."""
        if not responses:
            return np.zeros(0, dtype=np.float32)
        return mean_rewards(self._run([(prompt, responses)])[0][0])

    def score(self, prompt: str | Messages, responses: Sequence[str]) -> ScoreResult:
        """Raw and z-normalised scores of each response, and whether it was truncated."""
        if not responses:
            return ScoreResult(raw=[], z=[], truncated=[])
        raw, truncated = self._run([(prompt, responses)])[0]
        return self._result(raw, truncated)

    def score_many(
        self, requests: Sequence[tuple[str | Messages, Sequence[str]]]
    ) -> list[ScoreResult]:
        """:meth:`score` for several requests in one batched pass (the daemon's
        micro-batching); each result equals what :meth:`score` gives that request alone."""
        out: list[ScoreResult] = []
        nonempty = [(p, r) for p, r in requests if r]
        results = iter(self._run(nonempty)) if nonempty else iter(())
        for _, responses in requests:
            if not responses:
                out.append(ScoreResult(raw=[], z=[], truncated=[]))
                continue
            raw, truncated = next(results)
            out.append(self._result(raw, truncated))
        return out

    def score_pairs(
        self, items: Sequence[tuple[str | Messages, str, str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rewards (a, b) for many (prompt, a, b) triples, batched across prompts; equal to
        what :meth:`score` gives one request at a time (the member mean)."""
        a, b = self.score_pairs_members(items)
        return mean_rewards(a), mean_rewards(b)

    def score_pairs_members(
        self, items: Sequence[tuple[str | Messages, str, str]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Member rewards (n, K) of a and of b for (prompt, a, b) triples ((n,) for a
        one-member model)."""
        if not items:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        res = self._run([(p, [a, b]) for p, a, b in items])
        return (
            np.array([r[0][0] for r in res], dtype=np.float32),
            np.array([r[0][1] for r in res], dtype=np.float32),
        )

    def prob(self, r_a: float, r_b: float) -> float:
        """Calibrated p(a preferred over b) from two raw scores."""
        return self.calibration.prob(r_a, r_b)
