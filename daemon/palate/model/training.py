"""Training loop: examples in, a calibrated reward model out.

``train_reward_model(examples, config, progress=...)`` is the one entry point (the CLI's
``palate train --data`` and the daemon's store-backed training child both call it).

Where the time goes, and what this loop does about it (2-core CPU, SmolLM2-135M):

- *Frozen-prefix cache.* LoRA sits on the top K blocks only, so the lower blocks compute
  the same activations every epoch. They run once per example; their outputs (prompt once per
  group, float16 to halve memory) are kept and every step trains only the top blocks. Exact up
  to the storage rounding (tested against the uncached path).
- *Prompt-grouped batches* (reward_model.py): the shared prompt of a pair is computed once.
- *Two CPU streams*: each batch is split into shards that run on parallel MLX streams with a
  single-threaded BLAS each, keeping both cores busy through MLX's single-threaded
  element-wise kernels. The shards' losses share one normaliser, so their summed gradients
  are exactly the whole batch's gradient.

Everything random (LoRA init, head init, batch order) follows ``config.seed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

try:
    from palate.model.blas import ensure_fast_blas

    ensure_fast_blas()
except ImportError:  # pragma: no cover
    pass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from palate.evaluation.heldout import length_effect
from palate.evaluation.metrics import fit_temperature
from palate.evaluation.split import example_key, split_items
from palate.model.batching import (
    EncodedGroup,
    Example,
    PairExample,
    TruncationStats,
    bucket_batches,
    collate,
    encode_examples,
    split_batch,
)
from palate.model.cpu_forward import CpuEngine, default_threads
from palate.model.ensemble import bootstrap_weights
from palate.model.losses import (
    LossInputs,
    ensemble_loss,
    length_correlation,
    preference_loss,
)
from palate.model.prefix import (
    EMPTY_HIDDEN,
    Hidden,
    build_prefix_cache,
    frozen_key,
    pack_hidden,
    unpack_hidden,
)
from palate.model.reward_model import (
    LoraConfig,
    RewardModel,
    configure_cpu_threads,
    lora_for_base,
)
from palate.model.scoring import (
    Calibration,
    batch_arrays,
    group_rewards,
    make_streams,
    mean_rewards,
    use_cpu_engine,
)

__all__ = [
    "ProgressEvent",
    "TrainConfig",
    "TrainResult",
    "federation_spec",
    "frozen_key",
    "length_balance_weights",
    "load_trainable_state",
    "pack_hidden",
    "train_reward_model",
    "unpack_hidden",
]

Prefix = tuple[list[EncodedGroup], Hidden | None, TruncationStats]


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training knob, with its default and reason (``palate train --help`` shows these)."""

    base_model: str = _f("builtin:smollm2-135m", "base model spec (builtin:, .gguf, dir, hub id)")
    lora_rank: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha; updates are scaled by alpha/rank")
    lora_layers: int = _f(4, "top blocks that get LoRA; the blocks below are frozen and cached")
    lora_dropout: float = _f(0.0, "LoRA dropout (0 keeps the cached path exact)")
    depth: int = _f(
        0,
        "use only the base's first N blocks and read the reward there (0: all); the LoRA "
        "blocks are the top lora_layers of those N. Fewer blocks, less compute",
    )
    max_tokens: int = _f(384, "max tokens of prompt+response; the prompt is cut from the left")
    # 1: on HH data the validation loss was best at the end of epoch 1 and only rose in
    # epoch 2 (docs/benchmarks.md, Quality), so a second pass cost time for nothing.
    epochs: int = _f(1, "passes over the training data")
    min_steps: int = _f(50, "at least this many optimizer steps (extra passes over small data)")
    lr: float = _f(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warmup steps before cosine decay")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    batch_tokens: int = _f(4096, "padded tokens per batch (memory bound; length-bucketed)")
    grad_accum: int = _f(1, "batches per optimizer step")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    center_coef: float = _f(0.01, "reward-centering coefficient (eta * mean r^2)")
    baseline_momentum: float = _f(0.99, "EMA momentum of the running reward baseline for ratings")
    val_fraction: float = _f(0.1, "share of prompts held out for validation (hash split)")
    # 25 and 2 (were 50 and 4): on all HH dev pairs the validation loss was best at step 50 of
    # 158 and patience 4 at a cadence of 50 could never fire inside one epoch, so two thirds of
    # the training came after the best checkpoint. A validation costs about 5 training steps
    # (forward only, top blocks, 10% of the data), so every 25 steps adds ~20% and stopping
    # 2 validations after the best saves far more whenever the best comes early.
    eval_every: int = _f(25, "validate every N optimizer steps (and at each epoch end)")
    patience: int = _f(
        2, "stop after this many validations without val-loss improvement (0: never stop)"
    )
    min_delta: float = _f(
        1e-3, "a validation loss must beat the best by this much (nats) to count as better"
    )
    prefix_cache: bool = _f(True, "cache the frozen lower blocks' outputs once per example")
    cache_dtype: str = _f("float16", "storage dtype of the cache: float16 or float32")
    streams: int = _f(2, "parallel MLX streams (CPU cores to keep busy)")
    cpu_forward: bool = _f(
        True, "on CPU, run gradient-free passes (prefix cache, validation) in numpy (faster)"
    )
    # The length levers (issue 15, docs/model.md "Length"). length_balance is on: on all HH dev
    # pairs it lowered the best validation loss (0.591 -> 0.581) and lifted validation
    # chosen-longer accuracy 47% -> 59% (docs/benchmarks.md); the head and the correlation
    # penalty stay off (they fought content on the tiny-model test).
    length_head: bool = _f(
        False,
        "train with a length head: a learned a*log(1+response tokens) is added to every reward "
        "during training only and dropped at scoring, so the LoRA/head need not learn length",
    )
    length_decorr: float = _f(
        0.0, "penalty on the squared batch correlation of reward with log response length"
    )
    length_balance: bool = _f(
        True,
        "reweight training pairs so chosen-longer and chosen-shorter pairs weigh the same "
        "in total (the length shortcut then earns nothing in the loss)",
    )
    seed: int = _f(0, "seed for init and batch order; same seed, same model")
    # Read by the store-backed run only (runtime/training_child.py). Off until measured
    # (bench/nightly.py, docs/benchmarks.md): a later night's data is mostly the deployed
    # model's data, so starting there lets early stopping end the run in a few validations.
    warm_start: bool = _f(
        False,
        "nightly runs start from the deployed model's LoRA and heads when it has this base, "
        "LoRA shape, max_tokens and ensemble size (else from the seed, as always)",
    )
    warm_replay: float = _f(
        3.0,
        "a warm-started night trains on the events that arrived since the deployed model's "
        "data plus this many times as many earlier ones, drawn at random (0: all of them)",
    )
    members: int = _f(
        5, "ensemble members: heads on the shared trunk, each on its own bootstrap resample"
    )
    # Read by the store-backed run only (runtime/training_child.py): the model layer has no
    # store. 0.26 GB per 1,000 HH pairs (tokens x hidden x 2 bytes; docs/model.md).
    frozen_cache_mb: int = _f(
        1024,
        "nightly runs keep the frozen blocks' activations (encrypted, in the store) for reuse "
        "by later nights, up to this many MB; 0 keeps none",
    )

    def lora(self) -> LoraConfig:
        return LoraConfig(
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            layers=self.lora_layers,
            dropout=self.lora_dropout,
            depth=self.depth,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def help_text(cls) -> dict[str, str]:
        return {f.name: str(f.metadata.get("help", "")) for f in fields(cls)}


@dataclass(frozen=True)
class ProgressEvent:
    """One structured progress report (the daemon logs these; the CLI draws a bar)."""

    phase: str  # "encode" | "cache" | "train" | "validate" | "done"
    step: int
    total: int
    loss: float | None = None
    acc: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""


ProgressFn = Callable[[ProgressEvent], None]


@dataclass
class TrainResult:
    """The trained model and everything an artifact needs to describe it."""

    model: RewardModel
    calibration: Calibration
    config: TrainConfig
    metrics: dict[str, Any]
    data_summary: dict[str, Any]
    truncation: TruncationStats
    history: list[dict[str, Any]]
    #: The encoded examples and their frozen-prefix cache: pass it as ``prefix`` to train
    #: again on the same examples and config without paying for either (bench/ensemble.py
    #: trains several ensemble variants on one cache).
    prefix: Prefix | None = None
    #: With ``frozen``: each group's key in it (:func:`frozen_key`), aligned with
    #: ``prefix[1]``, so the caller can keep the entries it did not have yet.
    frozen_keys: list[str] | None = None


class LengthHead(nn.Module):
    """The length lever's second head (after ODIN, Chen et al. 2024, reduced to its core).

    During training the Bradley-Terry loss sees ``r(x) + a * log(1 + tokens(x))``: one scalar
    ``a`` that can explain every preference for shorter (``a < 0``) or longer answers on its
    own. A single parameter learns that shortcut faster than the LoRA can, so the gradient
    left for the LoRA and head is the part of the preference that length does not explain
    (the "learned-mixin" of debiasing by a biased-only model). At scoring the length head is
    dropped: the artifact holds only ``r``. Not saved: nothing reads it after training.
    """

    #: Adam moves every parameter by about lr per step whatever its gradient, so a bare
    #: coefficient would need thousands of steps to reach logit scale while the LoRA learns
    #: length in tens. Its input is scaled instead: at lr 5e-4 ``a`` moves ~0.05 a step.
    SCALE = 100.0

    def __init__(self) -> None:
        super().__init__()
        self.weight = mx.zeros((1,))

    def coefficient(self) -> float:
        """``a``: reward per unit of log(1 + response tokens) the head absorbed."""
        return float(self.weight[0]) * self.SCALE

    def __call__(self, log_len: mx.array) -> mx.array:
        return self.weight * (self.SCALE * log_len)


class _WithLengthHead(nn.Module):
    """The reward model and its training-only length head, trained by one optimizer."""

    def __init__(self, model: RewardModel, length: LengthHead) -> None:
        super().__init__()
        self.model = model
        self.length = length


#: Salt of the validation split: the held-out split's function (evaluation/split.py), so
#: near-duplicates stay on one side by the same rules, dealt independently of it.
VAL_SALT = "palate-val:v2:"


def _split(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Validation examples for early stopping and calibration, by :func:`split_items`.

    Unlike the held-out split this one may give up: with fewer than 20 examples, or when every
    key landed on the validation side, everything trains and nothing validates.
    """
    if fraction <= 0 or len(examples) < 20:
        return list(examples), []
    split = split_items(examples, key=example_key, fraction=fraction, salt=VAL_SALT)
    if not split.train:
        return list(examples), []
    return split.train, split.heldout


def _loss_inputs(
    b: Any,
    groups: Sequence[EncodedGroup] = (),
    shard: Sequence[int] = (),
    boot: np.ndarray | None = None,
) -> LossInputs:
    """The loss inputs of a collated batch; with ``boot`` (K, n) bootstrap weights, each
    member's multipliers for the batch's pairs and ratings (collate keeps group order)."""
    member_weight = None
    if boot is not None:
        pairs = [i for i in shard if groups[i].kind == "pair"]
        ratings = [i for i in shard if groups[i].kind != "pair"]
        member_weight = (mx.array(boot[:, pairs].T), mx.array(boot[:, ratings].T))
    return LossInputs(
        pair_idx=mx.array(b.pair_idx),
        margin=mx.array(b.margin),
        pair_weight=mx.array(b.pair_weight),
        rating_idx=mx.array(b.rating_idx),
        label=mx.array(b.label),
        rating_weight=mx.array(b.rating_weight),
        member_weight=member_weight,
    )


#: Validation examples needed to fit the temperature (fewer: T stays 1.0, flagged).
MIN_CALIBRATION = 8


def _calibration_points(
    groups: Sequence[EncodedGroup], rewards: Sequence[np.ndarray], delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """(logit, label) for the temperature fit: a pair's reward difference with label 1, a
    rating's ``reward - delta`` (the running baseline its BCE used) with its label."""
    logits, labels = [], []
    for g, r in zip(groups, rewards, strict=True):
        if g.kind == "pair":
            logits.append(float(r[0] - r[1]))
            labels.append(1.0)
        else:
            logits.append(float(r[0] - delta))
            labels.append(float(g.label))
    return np.array(logits, dtype=np.float64), np.array(labels, dtype=np.float64)


def _evaluate(
    model: RewardModel,
    groups: Sequence[EncodedGroup],
    hidden: Hidden | None,
    config: TrainConfig,
    streams: Sequence[Any],
    delta: float,
) -> tuple[float, float, list[np.ndarray]]:
    """(mean NLL, accuracy with ties wrong, rewards per group) over ``groups``."""
    engine = None
    if use_cpu_engine(model, config.cpu_forward):  # a snapshot of the current weights
        engine = CpuEngine(model, threads=default_threads())
    try:
        rewards = group_rewards(model, groups, config.batch_tokens, streams, hidden, engine)
    finally:
        if engine is not None:
            engine.close()
    nll, correct, count = 0.0, 0, 0
    for g, r_members in zip(groups, rewards, strict=True):
        r = mean_rewards(r_members)
        if g.kind == "pair":
            d = float(r[0] - r[1])
            nll += float(np.logaddexp(0.0, -(d - g.margin)))
            correct += int(d > 0)
        else:
            x = float(r[0] - delta)
            nll += float(g.label * np.logaddexp(0.0, -x) + (1 - g.label) * np.logaddexp(0.0, x))
            correct += int(x != 0 and (x > 0) == (g.label > 0.5))
        count += 1
    return nll / max(count, 1), correct / max(count, 1), rewards


#: The largest weight length balancing gives a pair: a handful of chosen-longer pairs
#: among hundreds must not each count as dozens.
MAX_BALANCE_WEIGHT = 4.0


def length_balance_weights(groups: Sequence[EncodedGroup]) -> list[float]:
    """Multipliers of each group's weight that make the chosen-longer and chosen-shorter
    pairs (by response tokens) carry equal total weight, and the whole set its old total.

    On HH-harmless the chosen answer is the shorter one in 54% of pairs and, on harmful
    requests, far more often: "shorter wins" is free accuracy, and a model trained on it
    refuses benign requests too (issue 15). Balanced, predicting length earns exactly as
    much loss on one side as it costs on the other, so only what the answers say is worth
    learning, the training-side mirror of the evaluation's ``length_controlled_accuracy``.
    Unlike a correlation penalty it never fights content that happens to correlate with
    length, and it is exact under the two-stream split (a weight per pair). Ratings and
    equal-length pairs keep 1; a side is capped at :data:`MAX_BALANCE_WEIGHT`.
    """
    sign = [
        int(np.sign(len(g.responses[0]) - len(g.responses[1]))) if g.kind == "pair" else 0
        for g in groups
    ]
    n_l, n_s = sign.count(1), sign.count(-1)
    if n_l == 0 or n_s == 0:
        return [1.0] * len(groups)
    half = (n_l + n_s) / 2.0
    w_l = min(half / n_l, MAX_BALANCE_WEIGHT)
    w_s = min(half / n_s, MAX_BALANCE_WEIGHT)
    return [w_l if x == 1 else w_s if x == -1 else 1.0 for x in sign]


def _validation_length(
    groups: Sequence[EncodedGroup], rewards: Sequence[np.ndarray]
) -> dict[str, Any] | None:
    """:func:`palate.evaluation.heldout.length_effect` of the validation pairs (lengths in
    response tokens after truncation); None without pairs."""
    pairs = [(g, r) for g, r in zip(groups, rewards, strict=True) if g.kind == "pair"]
    if not pairs:
        return None
    return length_effect(
        [float(r[0]) for _, r in pairs],
        [float(r[1]) for _, r in pairs],
        [len(g.responses[0]) for g, _ in pairs],
        [len(g.responses[1]) for g, _ in pairs],
    )


def _schedule(config: TrainConfig, total_steps: int) -> Callable[[mx.array], mx.array]:
    warm = max(0, min(config.warmup_steps, total_steps // 4))
    decay = optim.cosine_decay(
        config.lr, max(1, total_steps - warm), config.lr * config.min_lr_ratio
    )
    if warm == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, config.lr, warm), decay], [warm])


def _summary(
    train: Sequence[Example], val: Sequence[Example], groups: Sequence[EncodedGroup]
) -> dict[str, Any]:
    n_pairs = sum(isinstance(e, PairExample) for e in [*train, *val])
    return {
        "examples": len(train) + len(val),
        "pairs": n_pairs,
        "ratings": len(train) + len(val) - n_pairs,
        "train": len(train),
        "validation": len(val),
        "tokens": int(sum(g.cost for g in groups)),
    }


def federation_spec(base_model: str, lora: LoraConfig) -> str:
    """What the parties of a federation share (palate.federation): the base model and the
    adapter's shape. A shared adapter with this spec can start a run of the same config."""
    spec = f"{base_model}|rank={lora.rank}|alpha={lora.alpha:g}|layers={lora.layers}"
    return spec + (f"|depth={lora.depth}" if lora.depth else "")


def load_trainable_state(model: RewardModel, state: Mapping[str, np.ndarray]) -> list[str]:
    """Start ``model`` from LoRA/head weights (a federated adapter); returns what was loaded.

    Every LoRA tensor must be there with its shape (ValueError otherwise). A one-member head
    starts member 0 of an ensemble's heads; the other members keep their own random init.
    """
    current = model.trainable_state()
    updates: list[tuple[str, mx.array]] = []
    for key, value in current.items():
        if key not in state:
            raise ValueError(f"the starting weights have no {key}")
        new = np.asarray(state[key], dtype=np.float32)
        if tuple(new.shape) != tuple(value.shape):
            if key.startswith("head.") and new.shape[0] == 1 and new.shape[1:] == value.shape[1:]:
                merged = np.array(value, dtype=np.float32)
                merged[0] = new[0]
                new = merged
            else:
                raise ValueError(f"{key}: starting weights {new.shape}, model {value.shape}")
        updates.append((key, mx.array(new)))
    model.update(tree_unflatten(updates))
    mx.eval(model.trainable_parameters())
    return [k for k, _ in updates]


def train_reward_model(
    examples: Sequence[Example],
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    base: Any | None = None,
    prefix: Prefix | None = None,
    init_state: Mapping[str, np.ndarray] | None = None,
    frozen: Callable[[str], bytes | None] | None = None,
) -> TrainResult:
    """Train a reward model on in-memory examples and calibrate it.

    ``base`` is a loaded :class:`palate.model.base_model.BaseModel` (loaded from
    ``config.base_model`` when None). Raises ValueError on an empty or unusable dataset.
    The model returned has the best validation-loss weights loaded. ``init_state`` starts
    the LoRA/head weights from given values (:func:`load_trainable_state`) instead of the
    seeded initialisation. ``frozen``: a lookup of frozen-prefix activations kept from
    earlier runs, by :func:`frozen_key` (packed by :func:`pack_hidden`; None: not kept);
    only the examples it lacks run through the frozen blocks, and ``TrainResult.frozen_keys``
    names every example's key so the caller can keep the new ones (runtime/training_child.py
    keeps them in the encrypted store across nights).
    """
    config = config or TrainConfig()
    emit = progress or (lambda e: None)
    if not examples:
        raise ValueError("no training examples")
    if base is None:
        from palate.model.base_model import load_base_model

        base = load_base_model(config.base_model)
    t_start = time.monotonic()
    configure_cpu_threads(config.streams)
    streams = make_streams(config.streams)
    train_ex, val_ex = _split(examples, config.val_fraction)
    emit(ProgressEvent("encode", 0, len(examples), message="tokenizing"))
    if prefix is not None and len(prefix[0]) == len(examples):
        groups, trunc = prefix[0], prefix[2]  # the same examples, split the same way
    else:
        prefix = None
        groups, trunc = encode_examples([*train_ex, *val_ex], base.tokenizer, config.max_tokens)
    train_g, val_g = groups[: len(train_ex)], groups[len(train_ex) :]
    emit(
        ProgressEvent(
            "encode", len(examples), len(examples), message=f"truncated {trunc.to_json()}"
        )
    )

    lora = lora_for_base(config.lora(), base)
    model = RewardModel(base.model, lora, seed=config.seed, members=config.members)
    if init_state is not None:
        load_trainable_state(model, init_state)
    hidden: Hidden | None = None
    frozen_keys: list[str] | None = None
    frozen_reused = 0
    start = 0
    t_cache = time.monotonic()
    if prefix is not None and prefix[1] is not None and config.prefix_cache:
        hidden, start = prefix[1], model.split
    elif config.prefix_cache and model.split > 0:
        total_tok = sum(g.cost for g in groups)
        t0 = time.monotonic()

        def on_cache(done: int, _n: int, _t: int) -> None:
            rate = done / max(time.monotonic() - t0, 1e-9)
            emit(
                ProgressEvent(
                    "cache",
                    done,
                    total_tok,
                    tokens_per_s=rate,
                    eta_s=(total_tok - done) / max(rate, 1e-9),
                )
            )

        todo = list(range(len(groups)))
        kept: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        if frozen is not None:
            frozen_keys = [
                frozen_key(g, base.content_hash, model.split, config.cache_dtype) for g in groups
            ]
            todo = []
            for i, k in enumerate(frozen_keys):
                blob = frozen(k)
                if blob is None:
                    todo.append(i)
                else:
                    kept[i] = unpack_hidden(blob)
            total_tok = sum(groups[i].cost for i in todo)
        engine = None
        if todo and use_cpu_engine(model, config.cpu_forward):
            engine = CpuEngine(model, threads=default_threads())
        try:
            built = build_prefix_cache(
                model,
                [groups[i] for i in todo],
                config.batch_tokens,
                streams,
                config.cache_dtype,
                on_cache,
                engine,
            )
        finally:
            if engine is not None:
                engine.close()
        hidden = [kept.get(i, EMPTY_HIDDEN) for i in range(len(groups))]
        for i, entry in zip(todo, built, strict=True):
            hidden[i] = entry
        frozen_reused = len(kept)
        start = model.split
    cache_s = time.monotonic() - t_cache
    train_h = hidden[: len(train_g)] if hidden is not None else None
    if config.length_balance:  # new groups: a reused prefix keeps its own weights
        train_g = [
            replace(g, weight=g.weight * m)
            for g, m in zip(train_g, length_balance_weights(train_g), strict=True)
        ]
    val_h = hidden[len(train_g) :] if hidden is not None else None

    rng = np.random.default_rng(config.seed)
    boot = (
        bootstrap_weights(len(train_g), config.members, config.seed) if config.members > 1 else None
    )
    n_batches = len(bucket_batches(train_g, config.batch_tokens))
    steps_per_epoch = math.ceil(n_batches / config.grad_accum)
    # Small data sets (a user's first weeks of feedback) get more passes: one pass over 100
    # pairs is ~7 steps, shorter than the warmup. Early stopping still guards against overfit.
    epochs = max(config.epochs, math.ceil(config.min_steps / max(steps_per_epoch, 1)))
    total_steps = steps_per_epoch * epochs
    optimizer = optim.AdamW(
        learning_rate=_schedule(config, total_steps), weight_decay=config.weight_decay
    )

    # The length lever: off, the trained module is the model itself (bit-identical runs).
    trainee: nn.Module = model
    if config.length_head:
        trainee = _WithLengthHead(model, LengthHead())

    def loss_fn(
        t_mod: nn.Module,
        arrays: tuple[mx.array, ...],
        li: LossInputs,
        delta: float,
        wn: float,
        rn: float,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        m = t_mod.model if isinstance(t_mod, _WithLengthHead) else t_mod
        rewards = m.forward_groups(arrays[0], arrays[1], arrays[2], arrays[3], arrays[4], start)
        assert not isinstance(rewards, tuple)
        scored = rewards  # what validation and scoring see: the length head is dropped there
        log_len = mx.log1p(arrays[3].astype(mx.float32))  # response tokens (after truncation)
        if isinstance(t_mod, _WithLengthHead):
            extra = t_mod.length(log_len)
            rewards = rewards + (extra[:, None] if rewards.ndim == 2 else extra)
        if rewards.ndim == 2:  # (S, K): an ensemble
            t = ensemble_loss(rewards, li, delta, config.center_coef, wn, rn)
            total, baseline = t.loss, rewards.mean(axis=1).sum()
        else:
            t = preference_loss(rewards, li, delta, config.center_coef, wn, rn)
            total, baseline = t.loss, rewards.sum()
        if config.length_decorr > 0:
            # Per shard: the rows of one stream (a regulariser, so the shards need not add
            # up exactly as the likelihood terms do).
            corr = length_correlation(scored, log_len)
            total = total + config.length_decorr * corr * corr
        return total, t.nll_sum, t.correct, baseline

    loss_and_grad = nn.value_and_grad(trainee, loss_fn)
    delta = 0.0
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, np.ndarray]] | None = None
    bad_evals = 0
    step = 0
    stopped_early = False
    tokens_done = 0
    t_train = time.monotonic()
    win_nll = win_correct = win_count = 0.0

    def validate() -> bool:
        nonlocal best, bad_evals
        if not val_g:
            return False
        v_loss, v_acc, _ = _evaluate(model, val_g, val_h, config, streams, delta)
        history.append({"step": step, "val_loss": v_loss, "val_acc": v_acc})
        if best is None or v_loss < best[0] - config.min_delta:
            state = {k: np.array(v) for k, v in model.trainable_state().items()}
            best = (v_loss, step, state)
            bad_evals = 0
        else:
            bad_evals += 1
        # Not before min_steps: small data sets validate every (short) epoch, and patience
        # counted in epochs of 7 steps would stop a first week's model before it learnt
        # anything; the best checkpoint is kept either way.
        stop = config.patience > 0 and bad_evals >= config.patience and step >= config.min_steps
        note = f"best step {best[1]} (val loss {best[0]:.4f})"
        if stop:
            note += f"; stopping: {bad_evals} validations without improvement"
        emit(ProgressEvent("validate", step, total_steps, loss=v_loss, acc=v_acc, message=note))
        return stop

    accum: Any = None
    pending = 0
    for _epoch in range(epochs):
        batches = bucket_batches(train_g, config.batch_tokens, rng)
        for b_i, index in enumerate(batches):
            shards = split_batch(index, train_g, len(streams))
            wn = float(sum(train_g[i].weight for i in index))
            rn = float(sum(len(train_g[i].responses) for i in index))
            outs = []
            for shard, stream in zip(shards, streams, strict=False):
                batch = collate(train_g, shard, train_h)
                with mx.stream(stream):
                    outs.append(
                        loss_and_grad(
                            trainee,
                            batch_arrays(batch),
                            _loss_inputs(batch, train_g, shard, boot),
                            delta,
                            wn,
                            rn,
                        )
                    )
                tokens_done += batch.tokens
            grads = outs[0][1]
            for o in outs[1:]:
                grads = tree_map(lambda a, b: a + b, grads, o[1])
            accum = grads if accum is None else tree_map(lambda a, b: a + b, accum, grads)
            pending += 1
            vals = [(o[0][1], o[0][2], o[0][3]) for o in outs]
            mx.eval(accum, vals)
            nll = sum(float(v[0]) for v in vals)
            win_nll += nll
            win_correct += sum(float(v[1]) for v in vals)
            win_count += len(index)
            delta = config.baseline_momentum * delta + (1 - config.baseline_momentum) * (
                sum(float(v[2]) for v in vals) / rn
            )
            if pending < config.grad_accum and b_i < len(batches) - 1:
                continue
            if pending > 1:
                scale = 1.0 / pending
                accum = tree_map(lambda a, s=scale: a * s, accum)
            accum, _ = optim.clip_grad_norm(accum, config.max_grad_norm)
            optimizer.update(trainee, accum)
            mx.eval(trainee.trainable_parameters(), optimizer.state)
            accum, pending = None, 0
            step += 1
            elapsed = time.monotonic() - t_train
            rate = tokens_done / max(elapsed, 1e-9)
            eta = elapsed / step * (total_steps - step)
            emit(
                ProgressEvent(
                    "train",
                    step,
                    total_steps,
                    loss=win_nll / max(win_count, 1),
                    acc=win_correct / max(win_count, 1),
                    tokens_per_s=rate,
                    eta_s=eta,
                )
            )
            if step % 10 == 0 or step == total_steps:
                history.append(
                    {
                        "step": step,
                        "train_loss": win_nll / max(win_count, 1),
                        "train_acc": win_correct / max(win_count, 1),
                        "lr": float(optimizer.learning_rate),
                    }
                )
                win_nll = win_correct = win_count = 0.0
            if config.eval_every > 0 and step % config.eval_every == 0 and validate():
                stopped_early = True
                break
        if stopped_early:
            break
        if not (config.eval_every > 0 and step % config.eval_every == 0) and validate():
            stopped_early = True
            break
    train_s = time.monotonic() - t_train

    if best is not None:
        model.update(tree_unflatten([(k, mx.array(v)) for k, v in best[2].items()]))
        mx.eval(model.parameters())
    # The temperature is fitted on validation data only: fitted on the examples the model
    # was just trained on it comes out too small (overconfident), and a model's own training
    # data is no evidence of its calibration. With fewer than MIN_CALIBRATION validation
    # examples T stays 1.0 and the metrics say so (calibration_source). Pairs and ratings
    # both count (ratings' logits are reward - baseline), so rating-only users get a T too.
    calibrated = len(val_g) >= MIN_CALIBRATION
    calib_g, calib_h = (val_g, val_h) if calibrated else (train_g, train_h)
    c_loss, c_acc, c_members = _evaluate(model, calib_g, calib_h, config, streams, delta)
    c_rewards = [mean_rewards(r) for r in c_members]
    all_r = np.concatenate([r for r in c_rewards]) if c_rewards else np.zeros(1)
    logits, labels = _calibration_points(calib_g, c_rewards, delta)
    n_pairs = sum(g.kind == "pair" for g in calib_g)
    if calibrated:
        what = {0: "ratings", len(calib_g): "pairs"}.get(n_pairs, "pairs and ratings")
        calib_src = f"validation {what} ({len(calib_g)})"
        temperature = fit_temperature(logits, labels)
    else:
        calib_src = (
            f"none: {len(val_g)} validation examples, {MIN_CALIBRATION} needed; T = 1 "
            "(score mean/std from training data)"
        )
        temperature = 1.0
    offsets: tuple[float, ...] = ()
    if config.members > 1 and c_members:
        offsets = tuple(float(x) for x in np.concatenate(c_members).mean(axis=0))
    calibration = Calibration(
        mean=float(all_r.mean()),
        std=float(all_r.std() or 1.0),
        temperature=temperature,
        member_offsets=offsets,
        offset=float(delta),
    )
    metrics = {
        "steps": step,
        "total_steps": total_steps,
        "epochs": epochs,
        "stopped_early": stopped_early,
        "best_step": best[1] if best else step,
        "validations": sum("val_loss" in h for h in history),
        "val_loss": best[0] if best else None,
        "calibration_source": calib_src,
        "calibration_loss": c_loss,
        "calibration_acc": c_acc,
        "running_baseline": delta,
        "timings_s": {
            "encode_and_setup": round(t_cache - t_start, 2),
            "prefix_cache": round(cache_s, 2),
            "train": round(train_s, 2),
            "total": round(time.monotonic() - t_start, 2),
        },
        "train_tokens_per_s": tokens_done / max(train_s, 1e-9),
        # Examples whose frozen-prefix activations came from an earlier run (``frozen``).
        "frozen_reused": frozen_reused,
        "trainable_parameters": int(sum(v.size for v in model.trainable_state().values())),
        "length_head_weight": (
            trainee.length.coefficient() if isinstance(trainee, _WithLengthHead) else None
        ),
        # The length effect on the validation pairs (chosen by the model that was kept):
        # what the length lever is chosen on, never the probes (docs/model.md, "Length").
        "validation_length": _validation_length(calib_g, c_rewards) if calibrated else None,
    }
    emit(ProgressEvent("done", step, total_steps, loss=c_loss, acc=c_acc))
    return TrainResult(
        model=model,
        calibration=calibration,
        config=config,
        metrics=metrics,
        data_summary={**_summary(train_ex, val_ex, groups), "truncation": trunc.to_json()},
        truncation=trunc,
        history=history,
        prefix=(groups, hidden, trunc),
        frozen_keys=frozen_keys,
    )
