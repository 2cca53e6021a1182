"""``palate federate simulate``: Flower rounds on one machine over non-IID shards.

The data set is dealt to ``clients`` simulated users so that each sees a different slice:
by *topic* (a record's ``topic`` field, else clusters of its prompt's words) or by
*length*. Every client keeps its own held-out pairs (a stable hash split), trains only on
the rest, and the run reports, on those held-out pairs:

- ``global_accuracy``: the final federated (clipped, noised) model, averaged over clients;
- ``local_accuracy_mean``: each client's model trained alone on its own data for the same
  number of local steps (what it would have without federating).

Rounds run through Flower's ServerApp and ClientApps on :class:`LoopbackGrid` (no Ray), so
the clipping, the noise and SecAgg+ are Flower's, and the bytes counted are real.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from palate.errors import PalateError
from palate.evaluation.split import split_key, split_value
from palate.federation.accounting import DEFAULT_DELTA, Budget
from palate.federation.apps import (
    FederationPlan,
    MemoryLedger,
    PalateClient,
    build_client_app,
    build_server_app,
    build_strategy,
)
from palate.federation.loopback import LoopbackGrid, WireLog
from palate.model.batching import PairExample
from palate.model.local_update import LocalData, LocalTrainer

__all__ = ["SimulationResult", "load_pairs", "prepare_clients", "run_simulation", "shard_pairs"]

SHARD_BY = ("topic", "length")
HELDOUT_SALT = "palate-federate-heldout:"
_WORD = re.compile(r"[a-z]{4,}")
_STOP = frozenset(
    {
        "that",
        "this",
        "what",
        "with",
        "have",
        "from",
        "your",
        "they",
        "would",
        "could",
        "there",
        "about",
        "which",
        "their",
        "will",
        "just",
        "want",
        "know",
        "like",
        "does",
        "should",
        "some",
        "been",
        "were",
        "them",
        "then",
        "than",
        "into",
        "more",
        "also",
    }
)


def load_pairs(path: str | Path) -> list[tuple[PairExample, str | None]]:
    """Pairs from JSONL (``prompt``, ``chosen``, ``rejected``, optional ``topic``)."""
    out: list[tuple[PairExample, str | None]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise PalateError("invalid_request", f"cannot read {path}: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pair = PairExample(str(row["prompt"]), str(row["chosen"]), str(row["rejected"]))
        except (ValueError, KeyError, TypeError) as e:
            raise PalateError(
                "invalid_request", f"{path}:{n}: expected prompt/chosen/rejected ({e})"
            ) from e
        topic = row.get("topic")
        out.append((pair, str(topic) if topic is not None else None))
    return out


def _topic_clusters(pairs: Sequence[PairExample], k: int, seed: int) -> list[int]:
    """k-means over hashed bags of the prompts' words (cosine), deterministic."""
    dim = 512
    x = np.zeros((len(pairs), dim), np.float32)
    for i, p in enumerate(pairs):
        for w in _WORD.findall(str(p.prompt).lower()):
            if w not in _STOP:
                x[i, int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % dim] += 1.0
    x = np.log1p(x) * np.log((1 + len(pairs)) / (1 + (x > 0).sum(0)))[None, :]
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
    rng = np.random.default_rng(seed)
    centers = x[rng.choice(len(pairs), size=k, replace=False)]
    labels = np.zeros(len(pairs), np.int64)
    for _ in range(20):
        labels = np.argmax(x @ centers.T, axis=1)
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centers[c] = members.mean(0)
                centers[c] /= np.linalg.norm(centers[c]) + 1e-9
    return [int(v) for v in labels]


def shard_pairs(
    rows: Sequence[tuple[PairExample, str | None]],
    clients: int,
    per_client: int,
    by: str = "topic",
    seed: int = 0,
) -> list[list[PairExample]]:
    """Deal ``clients`` shards of up to ``per_client`` pairs, each from its own slice.

    All pairs are ordered by the shard key (topic, then a stable hash; or length) and cut
    into ``clients`` contiguous slices; each client draws ``per_client`` pairs from its own.
    """
    if by not in SHARD_BY:
        raise ValueError(f"shard by one of {SHARD_BY}, got {by!r}")
    if clients < 1 or per_client < 1:
        raise ValueError("clients and pairs per client must be positive")
    if len(rows) < clients * 2:
        raise PalateError("invalid_request", f"{len(rows)} pairs are too few for {clients} clients")
    pairs = [p for p, _ in rows]

    def h(p: PairExample) -> str:
        return hashlib.sha256(f"{p.prompt}\0{p.chosen}\0{p.rejected}".encode()).hexdigest()

    if by == "length":
        keys: list[Any] = [
            (len(str(p.prompt)) + len(p.chosen) + len(p.rejected), h(p)) for p in pairs
        ]
    else:
        topics = [t for _, t in rows]
        if all(t is not None for t in topics):
            keys = [(str(t), h(p)) for t, p in zip(topics, pairs, strict=True)]
        else:
            labels = _topic_clusters(pairs, min(clients, len(pairs)), seed)
            keys = [(c, h(p)) for c, p in zip(labels, pairs, strict=True)]
    order = sorted(range(len(pairs)), key=lambda i: keys[i])
    rng = np.random.default_rng(seed)
    out = []
    for c in range(clients):
        chunk = order[c * len(order) // clients : (c + 1) * len(order) // clients]
        take = sorted(rng.choice(len(chunk), size=min(per_client, len(chunk)), replace=False))
        out.append([pairs[chunk[i]] for i in take])
    return out


def _heldout(shard: Sequence[PairExample], fraction: float) -> tuple[list[Any], list[Any]]:
    train: list[PairExample] = []
    held: list[PairExample] = []
    for p in shard:
        (held if split_value(split_key(p.prompt), HELDOUT_SALT) < fraction else train).append(p)
    if not held:  # tiny shards: keep at least one pair to evaluate on
        held.append(train.pop())
    return train, held


def prepare_clients(
    shards: Sequence[Sequence[PairExample]], trainer: LocalTrainer, heldout_fraction: float = 0.2
) -> list[tuple[LocalData, LocalData]]:
    """Each client's (train, held-out) data, tokenized, frozen blocks run once: reusable
    across simulations of the same shards (``run_simulation(prepared=...)``)."""
    out = []
    for shard in shards:
        tr, he = _heldout(shard, heldout_fraction)
        out.append((trainer.prepare(tr), trainer.prepare(he)))
    return out


@dataclass
class SimulationResult:
    rounds: int
    clients: int
    epsilon: float
    delta: float
    global_accuracy: float
    local_accuracy_mean: float
    initial_accuracy: float
    noise_multiplier: float
    clipping_norm: float
    seconds_per_round: float
    bytes_per_client_per_round: dict[str, float]
    per_client: list[dict[str, Any]]
    noise: list[dict[str, float]]
    config: dict[str, Any] = field(default_factory=dict)
    #: The final shared LoRA/head weights (not in the JSON).
    arrays: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "clients": self.clients,
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
            "delta": self.delta,
            "global_accuracy": self.global_accuracy,
            "local_accuracy_mean": self.local_accuracy_mean,
            "initial_accuracy": self.initial_accuracy,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "seconds_per_round": self.seconds_per_round,
            "bytes_per_client_per_round": self.bytes_per_client_per_round,
            "per_client": self.per_client,
            "noise": self.noise,
            "config": self.config,
        }


def run_simulation(
    shards: Sequence[Sequence[PairExample]],
    trainer: LocalTrainer,
    plan: FederationPlan,
    *,
    heldout_fraction: float = 0.2,
    epsilon_budget: float = math.inf,
    wire: WireLog | None = None,
    fail: Callable[[int, int], None] | None = None,
    progress: Callable[[str], None] | None = None,
    prepared: Sequence[tuple[LocalData, LocalData]] | None = None,
) -> SimulationResult:
    """Run ``plan.rounds`` federated rounds over ``shards`` (one per client) and compare.

    ``fail(client, round)`` (client 0-based) may raise inside a round (the crash tests).
    """
    say = progress or (lambda _m: None)
    n = len(shards)
    plan = replace(plan, clients=n)
    initial = trainer.get_arrays()
    if prepared is None:
        say(f"preparing {n} clients (tokenizing, frozen blocks once per client)")
        prepared = prepare_clients(shards, trainer, heldout_fraction)
    train = [tr for tr, _ in prepared]
    held = [he for _, he in prepared]
    ledgers = [MemoryLedger() for _ in range(n)]
    budget = Budget(epsilon=epsilon_budget, delta=plan.delta)

    def make_client(context: Context) -> PalateClient:
        i = int(context.node_config["index"])
        hook = (lambda rnd: fail(i, rnd)) if fail is not None else None
        return PalateClient(trainer, train[i], ledgers[i], budget, plan.spec, fail=hook)

    wire = wire or WireLog()
    grid = LoopbackGrid(build_client_app(make_client), n, wire=wire)
    strategy = build_strategy(plan, initial_arrays=initial)
    final: dict[str, Any] = {}

    def done(legacy: Any) -> None:
        record = legacy.state.array_records.get("parameters")
        if record is not None:
            final["arrays"] = record.to_numpy_ndarrays()

    app = build_server_app(plan, strategy, on_done=done)
    say(f"{plan.rounds} rounds")
    t0 = time.monotonic()
    app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    seconds = time.monotonic() - t0
    arrays = final.get("arrays")
    if arrays is None:
        raise PalateError("internal_error", "the federated run produced no model")

    say("evaluating the global model and local-only baselines")
    trainer.set_arrays(initial)
    initial_acc = [trainer.accuracy(h) for h in held]
    trainer.set_arrays(arrays)
    global_acc = [trainer.accuracy(h) for h in held]
    local_acc = []
    for c in range(n):
        trainer.set_arrays(initial)
        trainer.train(train[c], plan.rounds * plan.local_steps, lr=plan.lr, seed=c)
        local_acc.append(trainer.accuracy(held[c]))
    trainer.set_arrays(arrays)

    from palate.federation.accounting import epsilon_for

    eps = max(epsilon_for(ledger.multipliers(), plan.delta) for ledger in ledgers)
    up = [wire.up.get(nid, 0) for nid in grid.node_ids]
    down = [wire.down.get(nid, 0) for nid in grid.node_ids]
    per_client = [
        {
            "client": c + 1,
            "train_pairs": train[c].pairs,
            "heldout_pairs": held[c].pairs,
            "rounds_joined": len(ledgers[c].rounds),
            "global_accuracy": global_acc[c],
            "local_accuracy": local_acc[c],
            "bytes_up": up[c],
            "bytes_down": down[c],
        }
        for c in range(n)
    ]
    return SimulationResult(
        rounds=plan.rounds,
        clients=n,
        epsilon=eps,
        delta=plan.delta,
        global_accuracy=float(np.mean(global_acc)),
        local_accuracy_mean=float(np.mean(local_acc)),
        initial_accuracy=float(np.mean(initial_acc)),
        noise_multiplier=plan.noise_multiplier,
        clipping_norm=plan.clipping_norm,
        seconds_per_round=seconds / max(plan.rounds, 1),
        bytes_per_client_per_round={
            "up": sum(up) / n / max(plan.rounds, 1),
            "down": sum(down) / n / max(plan.rounds, 1),
        },
        per_client=per_client,
        noise=list(strategy.noise_log),
        config={
            "spec": plan.spec,
            "local_steps": plan.local_steps,
            "lr": plan.lr,
            "clipping": plan.clipping,
            "aggregator": plan.aggregator,
            "secagg": plan.secagg,
            "trainable_parameters": int(sum(a.size for a in initial)),
        },
        arrays=[np.asarray(a) for a in arrays],
    )


__all__ += ["DEFAULT_DELTA"]
