"""Train a policy adapter on preferences: DPO (sigmoid) or IPO for pairs, a KTO-style loss
for unpaired thumbs up/down.

- The reference is the base. LoRA's B starts at zero, so the untrained adapter *is* the
  base model; its log-probs are computed once, before the first step, in the same pass that
  fills the frozen-prefix cache, instead of keeping a second model (mlx-lm-lora, SiLLM) or
  running the reference every step.
- Prompt tokens are masked: log p(response | prompt) sums response tokens only (TRL's
  ``completion_mask``; mlx-lm-lora's masks include the prompt, which does not cancel for the
  length-averaged IPO).
- Frozen prefix: LoRA sits on the top K blocks, so the blocks below compute the same
  activations every step; they run once per sequence (that same first pass) and are kept
  in float16, as the reward model's trainer does.

Losses, with Δ = log π(y|x) − log π_ref(y|x) (summed over response tokens):

- ``sigmoid`` (DPO): −log σ(β (Δ_c − Δ_r)), with optional label smoothing ε (robust DPO):
  −(1−ε) log σ(β m) − ε log σ(−β m);
- ``ipo``: (m − 1/(2β))² on length-averaged log-ratios (Azar et al.; TRL, mlx-lm-lora);
- ratings (KTO, Ethayarajh et al.): desirable w_d (1 − σ(β (Δ − z))), undesirable
  w_u (1 − σ(β (z − Δ))), where the reference point z is the batch's mean Δ, clamped at 0 and
  not differentiated. TRL estimates z from *mismatched* prompt/completion pairs; the batch
  mean of the matched ones costs no extra forward and is documented as the difference.
  w_d, w_u default to balancing the two classes (TRL's advice: 1:1 to 4:3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from palate.events import Example, PairExample, RatingExample  # noqa: E402
from palate.generation.policy import (  # noqa: E402
    Rows,
    encode_rows,
    hidden,
    lm_with_lora,
    policy_artifact,
    response_logprobs,
)
from palate.model.artifacts import ModelArtifact  # noqa: E402
from palate.model.reward_model import LoraConfig  # noqa: E402
from palate.model.training import ProgressEvent  # noqa: E402

__all__ = [
    "PolicyTrainConfig",
    "PolicyTrainResult",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "train_policy",
]

LOSSES = ("sigmoid", "ipo")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class PolicyTrainConfig:
    """Every knob of ``palate policy train`` with its default and reason (docs/generation.md)."""

    base_model: str = _f("builtin:smollm2-135m", "policy base model (builtin:, .gguf, dir, hub id)")
    loss: str = _f("sigmoid", "pair loss: sigmoid (DPO) or ipo; ratings always use KTO")
    beta: float = _f(0.1, "strength of the pull toward the reference (TRL and mlx-lm-lora: 0.1)")
    label_smoothing: float = _f(0.0, "robust-DPO label noise rate (0.1 for noisy labels)")
    # Chosen by measurement (docs/benchmarks.md, "DPO"): on 64 dev pairs 1e-5 did not move the
    # adapter in two epochs (loss 0.693 -> 0.686); 1e-4 learned them (0.608).
    lr: float = _f(1e-4, "peak learning rate (AdamW) of the LoRA weights")
    epochs: int = _f(2, "passes over the data")
    batch_size: int = _f(4, "pairs (or ratings) per optimizer step")
    warmup_steps: int = _f(5, "linear warmup steps before cosine decay")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    lora_rank: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha; updates are scaled by alpha/rank")
    lora_layers: int = _f(4, "top blocks that get LoRA; the rest are frozen and cached")
    max_tokens: int = _f(384, "max tokens of prompt+response; the prompt is cut from the left")
    desirable_weight: float | None = _f(None, "KTO weight of good ratings (None: balance)")
    undesirable_weight: float | None = _f(None, "KTO weight of bad ratings (None: balance)")
    prefix_cache: bool = _f(True, "keep the frozen blocks' outputs (float16) across steps")
    seed: int = _f(0, "seed for LoRA init and batch order")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError("beta must be positive")

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, layers=self.lora_layers)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def help_text(cls) -> dict[str, str]:
        return {f.name: str(f.metadata.get("help", "")) for f in fields(cls)}


# ---------------------------------------------------------------------------- losses


def dpo_loss(
    pc: mx.array, pr: mx.array, rc: mx.array, rr: mx.array, beta: float, smoothing: float = 0.0
) -> mx.array:
    """Per-pair sigmoid DPO loss from policy (p) and reference (r) log-probs (P,)."""
    m = (pc - pr) - (rc - rr)
    return -(1 - smoothing) * nn.log_sigmoid(beta * m) - smoothing * nn.log_sigmoid(-beta * m)


def ipo_loss(
    pc: mx.array,
    pr: mx.array,
    rc: mx.array,
    rr: mx.array,
    nc: mx.array,
    nr: mx.array,
    beta: float,
) -> mx.array:
    """Per-pair IPO loss on length-averaged log-ratios (P,)."""
    m = (pc - rc) / mx.maximum(nc, 1) - (pr - rr) / mx.maximum(nr, 1)
    return (m - 1.0 / (2.0 * beta)) ** 2


def kto_loss(
    p: mx.array, r: mx.array, good: mx.array, beta: float, w_good: float, w_bad: float
) -> mx.array:
    """Per-rating KTO loss (N,); ``good`` is 1.0 for a thumbs-up, 0.0 for a thumbs-down."""
    delta = p - r
    z = mx.stop_gradient(mx.maximum(delta.mean(), 0.0))
    up = w_good * (1 - mx.sigmoid(beta * (delta - z)))
    down = w_bad * (1 - mx.sigmoid(beta * (z - delta)))
    return good * up + (1 - good) * down


# ---------------------------------------------------------------------------- data


@dataclass
class _Batch:
    kind: str  # "pair" | "rating"
    rows: Rows  # pairs: chosen, rejected interleaved (2i, 2i+1)
    ref: np.ndarray  # (S,) reference log-probs, filled by the first pass
    good: np.ndarray  # (S,) ratings: 1.0 good / 0.0 bad
    weight: np.ndarray  # (units,)
    h: mx.array | None = None  # frozen-prefix output (S, L, D) float16


def _batches(
    examples: Sequence[Example], tokenizer: Any, config: PolicyTrainConfig, rng: np.random.Generator
) -> tuple[list[_Batch], int]:
    """Length-sorted batches of ``batch_size`` units (pairs and ratings apart); returns the
    batches and how many sequences were truncated."""
    out: list[_Batch] = []
    truncated = 0
    for kind, typ in (("pair", PairExample), ("rating", RatingExample)):
        units = [e for e in examples if isinstance(e, typ)]
        if not units:
            continue

        items = [
            (u.prompt, [u.chosen, u.rejected] if isinstance(u, PairExample) else [u.response])
            for u in units
        ]
        rows = encode_rows(tokenizer, items, config.max_tokens)
        truncated += rows.truncated
        per = 2 if kind == "pair" else 1
        lengths = rows.length.reshape(-1, per).max(axis=1)
        order = np.argsort(lengths, kind="stable")
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            seq = [int(j) * per + k for j in idx for k in range(per)]
            good = np.array(
                [1.0 if kind == "rating" and units[j].label >= 0.5 else 0.0 for j in idx]
            )
            out.append(
                _Batch(
                    kind,
                    rows.take(seq),
                    np.zeros(len(seq), np.float32),
                    good,
                    np.array([units[j].weight for j in idx], np.float32),
                )
            )
    rng.shuffle(out)
    return out, truncated


# ---------------------------------------------------------------------------- training


@dataclass
class PolicyTrainResult:
    lm: nn.Module  # the base with the trained adapter (lm_with_lora)
    metrics: dict[str, Any]
    data_summary: dict[str, Any]
    history: list[dict[str, Any]]

    def artifact(self, base: Any, config: PolicyTrainConfig) -> ModelArtifact:
        """The adapter as a ``ModelArtifact`` recording how it was trained: what the CLI
        saves and what the nightly run registers, built one way for both."""
        return policy_artifact(
            self.lm,
            base,
            config.lora(),
            train_config=config.to_json(),
            metrics=self.metrics,
            training_data=self.data_summary,
        )


def _split(lm: nn.Module, config: PolicyTrainConfig) -> int:
    return len(lm.model.layers) - config.lora_layers


def _forward(lm: nn.Module, b: _Batch, split: int, cached: bool) -> tuple[mx.array, mx.array]:
    if cached and b.h is not None:
        out = response_logprobs(lm, b.rows, start=split, h=b.h.astype(mx.float32))
    else:
        out = response_logprobs(lm, b.rows)
    return out[0], out[1]


def batch_loss(
    lm: nn.Module,
    b: _Batch,
    split: int,
    config: PolicyTrainConfig,
    w_good: float,
    w_bad: float,
) -> tuple[mx.array, mx.array]:
    """(mean weighted loss, per-unit implicit-reward margin) of one batch."""
    logp, n = _forward(lm, b, split, config.prefix_cache)
    ref = mx.array(b.ref)
    w = mx.array(b.weight)
    if b.kind == "pair":
        pc, pr, rc, rr = logp[0::2], logp[1::2], ref[0::2], ref[1::2]
        if config.loss == "ipo":
            losses = ipo_loss(pc, pr, rc, rr, n[0::2], n[1::2], config.beta)
        else:
            losses = dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing)
        margin = config.beta * ((pc - rc) - (pr - rr))
    else:
        good = mx.array(b.good.astype(np.float32))
        losses = kto_loss(logp, ref, good, config.beta, w_good, w_bad)
        margin = config.beta * (logp - ref) * (2 * good - 1)
    return (losses * w).sum() / w.sum(), margin


def _kto_weights(examples: Sequence[Example], config: PolicyTrainConfig) -> tuple[float, float]:
    ratings = [e for e in examples if isinstance(e, RatingExample)]
    good = sum(e.label >= 0.5 for e in ratings)
    bad = len(ratings) - good
    wg = config.desirable_weight
    wb = config.undesirable_weight
    if wg is None or wb is None:  # balance: w_good * #good == w_bad * #bad, the larger at 1
        big = max(good, bad, 1)
        wg = wg if wg is not None else (big / good if good else 1.0)
        wb = wb if wb is not None else (big / bad if bad else 1.0)
    return float(wg), float(wb)


def _prepare(
    lm: nn.Module,
    batches: list[_Batch],
    split: int,
    cache: bool,
    progress: Callable[[ProgressEvent], None] | None,
) -> None:
    """The one pass before training: frozen-prefix outputs and reference log-probs."""
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        tokens = mx.array(b.rows.tokens)
        h = hidden(lm, tokens, 0, split)
        logp, _ = response_logprobs(lm, b.rows, start=split, h=h)[:2]
        if cache:
            b.h = h.astype(mx.float16)
            mx.eval(b.h, logp)
        b.ref = np.array(logp, dtype=np.float32)
        if progress:
            progress(
                ProgressEvent(
                    "reference",
                    i + 1,
                    len(batches),
                    eta_s=(time.perf_counter() - t0) / (i + 1) * (len(batches) - i - 1),
                )
            )


def train_policy(
    examples: Sequence[Example],
    config: PolicyTrainConfig,
    *,
    base: Any,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> PolicyTrainResult:
    """Train a policy adapter on ``base`` from pairs and/or ratings."""
    if not examples:
        raise ValueError("no examples to train on")
    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    mx.random.seed(config.seed)
    lm = lm_with_lora(base.model, config.lora())
    split = _split(lm, config)
    batches, truncated = _batches(examples, base.tokenizer, config, rng)
    _prepare(lm, batches, split, config.prefix_cache, progress)
    t_ref = time.perf_counter() - t0
    w_good, w_bad = _kto_weights(examples, config)

    steps = config.epochs * len(batches)
    warm = min(config.warmup_steps, max(steps - 1, 0))
    decay = optim.cosine_decay(config.lr, max(steps - warm, 1), config.lr * 0.1)
    schedule = (
        optim.join_schedules(
            [optim.linear_schedule(config.lr * 0.1, config.lr, warm), decay], [warm]
        )
        if warm
        else decay
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)

    def loss_fn(model: nn.Module, b: _Batch) -> tuple[mx.array, mx.array]:
        return batch_loss(model, b, split, config, w_good, w_bad)

    grad_fn = nn.value_and_grad(lm, loss_fn)
    history: list[dict[str, Any]] = []
    tokens_seen = 0
    t_train = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        order = rng.permutation(len(batches)) if epoch else np.arange(len(batches))
        for bi in order:
            b = batches[int(bi)]
            (loss, margin), grads = grad_fn(lm, b)
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
            opt.update(lm, grads)
            mx.eval(lm.trainable_parameters(), opt.state, loss, margin)
            step += 1
            tokens_seen += int(b.rows.length.sum())
            acc = float((np.array(margin) > 0).mean())
            history.append(
                {"step": step, "epoch": epoch, "kind": b.kind, "loss": float(loss), "acc": acc}
            )
            if progress:
                el = time.perf_counter() - t_train
                progress(
                    ProgressEvent(
                        "train",
                        step,
                        steps,
                        loss=float(loss),
                        acc=acc,
                        tokens_per_s=tokens_seen / max(el, 1e-9),
                        eta_s=el / step * (steps - step),
                    )
                )
    for b in batches:
        b.h = None
    last = history[-max(1, len(history) // 4) :]
    final_loss = float(np.mean([h["loss"] for h in last]))
    pairs = sum(isinstance(e, PairExample) for e in examples)
    metrics = {
        "steps": step,
        "final_loss": round(final_loss, 4),
        "final_train_acc": round(float(np.mean([h["acc"] for h in last])), 4),
        "timings_s": {
            "reference": round(t_ref, 2),
            "train": round(time.perf_counter() - t_train, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
        "train_tokens_per_s": round(tokens_seen / max(time.perf_counter() - t_train, 1e-9), 1),
    }
    summary = {
        "pairs": pairs,
        "ratings": len(examples) - pairs,
        "truncated_sequences": truncated,
        "kto_weights": [round(w_good, 4), round(w_bad, 4)],
    }
    if not math.isfinite(final_loss):
        raise FloatingPointError("policy training diverged (loss is not finite); lower --lr")
    return PolicyTrainResult(lm=lm, metrics=metrics, data_summary=summary, history=history)
