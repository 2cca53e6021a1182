"""One client's local training for federated rounds: LoRA/head weights in, weights out.

:mod:`palate.federation` moves these weights through Flower as plain numpy arrays; this
module is where they meet MLX (the federation never imports it directly).

The federated parameters are exactly the reward model's trainable tensors (LoRA matrices
on the top blocks and the scalar head), in sorted-name order, as float32 arrays. The frozen
lower blocks never change, so their outputs are computed once per data set (the prefix
cache of :mod:`palate.model.training`) and reused in every round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_unflatten  # noqa: E402

from palate.model.batching import (  # noqa: E402
    EncodedGroup,
    Example,
    bucket_batches,
    collate,
    encode_examples,
)
from palate.model.cpu_forward import CpuEngine, default_threads  # noqa: E402
from palate.model.losses import LossInputs, preference_loss  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel, lora_for_base  # noqa: E402
from palate.model.scoring import (  # noqa: E402
    batch_arrays,
    group_rewards,
    make_streams,
    use_cpu_engine,
)
from palate.model.training import build_prefix_cache, federation_spec  # noqa: E402

__all__ = ["LocalData", "LocalTrainer", "model_spec"]


def model_spec(base_model: str, lora: LoraConfig) -> str:
    """What every party of one federation must share: the base and the adapter's shape."""
    return federation_spec(base_model, lora)


@dataclass
class LocalData:
    """One client's examples, tokenized, with the frozen blocks' outputs cached."""

    groups: list[EncodedGroup]
    hidden: list[tuple[np.ndarray, list[np.ndarray]]] | None

    @property
    def pairs(self) -> int:
        return sum(g.kind == "pair" for g in self.groups)


class LocalTrainer:
    """A reward model on a loaded base whose LoRA/head weights come and go as arrays.

    ``seed`` fixes the initial LoRA/head weights: every client of a federation builds the
    same initial model, so the server can take its starting point from any of them.
    """

    def __init__(
        self,
        base: Any,
        lora: LoraConfig,
        *,
        max_tokens: int = 256,
        batch_tokens: int = 4096,
        seed: int = 0,
        cpu_forward: bool = True,
    ) -> None:
        self.base = base
        self.lora = lora_for_base(lora, base)  # as the nightly run resolves it: same shapes
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.cpu_forward = cpu_forward
        self.model = RewardModel(base.model, self.lora, seed=seed)
        state = self.model.trainable_state()
        self.keys = sorted(state)
        self.shapes = [tuple(int(d) for d in state[k].shape) for k in self.keys]
        self.streams = make_streams(1)

    # -- parameters ---------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def get_arrays(self) -> list[np.ndarray]:
        state = self.model.trainable_state()
        return [np.array(state[k], dtype=np.float32) for k in self.keys]

    def set_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        """Load LoRA/head weights; the count and every shape must match this model's."""
        if len(arrays) != len(self.keys):
            raise ValueError(
                f"expected {len(self.keys)} arrays (LoRA and head), got {len(arrays)}: "
                "server and client disagree on the model (see `palate federate --help`)"
            )
        for key, shape, a in zip(self.keys, self.shapes, arrays, strict=True):
            if tuple(a.shape) != shape:
                raise ValueError(f"{key}: expected shape {shape}, got {tuple(a.shape)}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{key}: non-finite values")
        self.model.update(
            tree_unflatten(
                [
                    (k, mx.array(np.asarray(a, dtype=np.float32)))
                    for k, a in zip(self.keys, arrays, strict=True)
                ]
            )
        )
        mx.eval(self.model.trainable_parameters())

    def fingerprint(self) -> str:
        """A short hash of the current LoRA/head weights (for logs and tests)."""
        h = hashlib.sha256()
        for a in self.get_arrays():
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    # -- data ---------------------------------------------------------------------------
    def _engine(self) -> CpuEngine | None:
        if use_cpu_engine(self.model, self.cpu_forward):
            return CpuEngine(self.model, threads=default_threads())
        return None

    def prepare(self, examples: Sequence[Example]) -> LocalData:
        """Tokenize and run the frozen blocks once; the result serves every round."""
        groups, _ = encode_examples(list(examples), self.base.tokenizer, self.max_tokens)
        hidden = None
        if groups and self.model.split > 0:
            engine = self._engine()
            try:
                hidden = build_prefix_cache(
                    self.model, groups, self.batch_tokens, self.streams, "float16", None, engine
                )
            finally:
                if engine is not None:
                    engine.close()
        return LocalData(groups=groups, hidden=hidden)

    # -- training -----------------------------------------------------------------------
    def train(
        self,
        data: LocalData,
        steps: int,
        *,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        center_coef: float = 0.01,
        seed: int = 0,
    ) -> dict[str, float]:
        """``steps`` AdamW steps from the current weights over length-bucketed batches."""
        if not data.groups:
            raise ValueError("no local examples to train on")
        start = self.model.split if data.hidden is not None else 0
        rng = np.random.default_rng(seed)
        optimizer = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)

        def loss_fn(
            m: RewardModel, arrays: tuple[mx.array, ...], li: LossInputs, wn: float, rn: float
        ) -> tuple[mx.array, mx.array]:
            rewards = m.forward_groups(
                arrays[0], arrays[1], arrays[2], arrays[3], arrays[4], start=start
            )
            assert not isinstance(rewards, tuple)
            t = preference_loss(rewards, li, 0.0, center_coef, wn, rn)
            return t.loss, t.correct

        loss_and_grad = nn.value_and_grad(self.model, loss_fn)
        batches: list[list[int]] = []
        done = 0
        loss_sum = 0.0
        while done < steps:
            if not batches:
                batches = [list(b) for b in bucket_batches(data.groups, self.batch_tokens, rng)]
            index = batches.pop()
            b = collate(data.groups, index, data.hidden)
            li = LossInputs(
                pair_idx=mx.array(b.pair_idx),
                margin=mx.array(b.margin),
                pair_weight=mx.array(b.pair_weight),
                rating_idx=mx.array(b.rating_idx),
                label=mx.array(b.label),
                rating_weight=mx.array(b.rating_weight),
            )
            wn = float(sum(data.groups[i].weight for i in index))
            rn = float(sum(len(data.groups[i].responses) for i in index))
            (loss, _), grads = loss_and_grad(self.model, batch_arrays(b), li, wn, rn)
            grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
            optimizer.update(self.model, grads)
            mx.eval(self.model.trainable_parameters(), optimizer.state, loss)
            loss_sum += float(loss)
            done += 1
        return {"steps": float(steps), "loss": loss_sum / max(steps, 1)}

    def accuracy(self, data: LocalData) -> float:
        """Share of pairs whose chosen response scores higher (ties count as wrong)."""
        idx = [i for i, g in enumerate(data.groups) if g.kind == "pair"]
        if not idx:
            return float("nan")
        groups = [data.groups[i] for i in idx]
        hidden = [data.hidden[i] for i in idx] if data.hidden is not None else None
        engine = self._engine()
        try:
            rewards = group_rewards(
                self.model, groups, self.batch_tokens, self.streams, hidden, engine
            )
        finally:
            if engine is not None:
                engine.close()
        return float(np.mean([float(r[0] > r[1]) for r in rewards]))
