"""The Flower pieces: the client (ClientApp with DP mods) and the server strategy.

What a client sends back for a training round is the LoRA/head weights after local
training, which Flower's ``fixedclipping_mod`` (or ``adaptiveclipping_mod``) turns into
``global + clip(update)`` before anything leaves the process, with a constant example count
of 1 (uniform averaging, so one user's weight is exactly ``1 / n``; the real count is not
sent) and no metrics. When the server runs SecAgg+, Flower's ``secaggplus_mod`` masks that
vector too, so the server only learns the sum. The server side is Flower's
``DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping`` around FedAvg (or a trimmed
mean), made tolerant of clients that fail mid-round: their replies are dropped and the
round goes on with the others, the noise scaled to the number actually averaged.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, secaggplus_mod
from flwr.common import Context, Message, MessageType, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedTrimmedAvg,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore.differential_privacy import (
    KEY_CLIPPING_NORM,
    add_gaussian_noise_to_params,
)

from palate.federation.accounting import DEFAULT_DELTA, Budget, BudgetExhausted, epsilon_for
from palate.federation.accounting import noise_std as _noise_std

log = logging.getLogger(__name__)

__all__ = [
    "AGGREGATORS",
    "FederationPlan",
    "Ledger",
    "MemoryLedger",
    "PalateClient",
    "arrays_from_bytes",
    "arrays_to_bytes",
    "build_client_app",
    "build_server_app",
    "build_strategy",
]

AGGREGATORS = ("fedavg", "trimmed-mean")
CLIPPING = ("fixed", "adaptive")
#: Config keys the server sends with each round (besides Flower's ``clipping_norm``).
K_FEDERATION = "palate.federation"
K_SPEC = "palate.spec"
K_ROUND = "palate.round"
K_NOISE = "palate.noise_multiplier"
K_DELTA = "palate.delta"
K_STEPS = "palate.local_steps"
K_LR = "palate.lr"
K_CLIPPING = "palate.clipping"
K_AGGREGATOR = "palate.aggregator"


def arrays_to_bytes(keys: Sequence[str], arrays: Sequence[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    named: dict[str, Any] = {
        k: np.asarray(a, dtype=np.float32) for k, a in zip(keys, arrays, strict=True)
    }
    np.savez(buf, **named)
    return buf.getvalue()


def arrays_from_bytes(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True)
class FederationPlan:
    """What the server decides for every round, and sends to every client."""

    federation: str
    spec: str
    rounds: int
    clients: int
    noise_multiplier: float = 1.0
    clipping_norm: float = 0.5
    clipping: str = "fixed"
    aggregator: str = "fedavg"
    local_steps: int = 10
    lr: float = 1e-3
    delta: float = DEFAULT_DELTA
    secagg: bool = False
    min_clients: int | None = None
    deliver_final: bool = True

    def fit_config(self, server_round: int) -> dict[str, Any]:
        return {
            K_FEDERATION: self.federation,
            K_SPEC: self.spec,
            K_ROUND: server_round,
            K_NOISE: float(self.noise_multiplier),
            K_DELTA: float(self.delta),
            K_STEPS: int(self.local_steps),
            K_LR: float(self.lr),
            K_CLIPPING: self.clipping,
            K_AGGREGATOR: self.aggregator,
        }

    def eval_config(self, server_round: int) -> dict[str, Any]:
        return {K_FEDERATION: self.federation, K_SPEC: self.spec, K_ROUND: server_round}


# ---------------------------------------------------------------------------------- ledger


class Ledger(Protocol):
    """Where a client keeps its privacy ledger and the newest shared adapter."""

    def multipliers(self) -> list[float]: ...

    def record(
        self, federation: str, round: int, z: float, clip: float, delta: float, eps: float
    ) -> None: ...

    def save_adapter(self, federation: str, meta: dict[str, Any], blob: bytes) -> None: ...


@dataclass
class MemoryLedger:
    """A ledger in memory (the simulation's clients)."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    adapter: tuple[dict[str, Any], bytes] | None = None

    def multipliers(self) -> list[float]:
        return [float(r["noise_multiplier"]) for r in self.rounds]

    def record(
        self, federation: str, round: int, z: float, clip: float, delta: float, eps: float
    ) -> None:
        self.rounds.append(
            {
                "federation": federation,
                "round": round,
                "noise_multiplier": z,
                "clipping_norm": clip,
                "delta": delta,
                "epsilon": eps,
            }
        )

    def save_adapter(self, federation: str, meta: dict[str, Any], blob: bytes) -> None:
        self.adapter = (meta, blob)


# ---------------------------------------------------------------------------------- client


class Trainer(Protocol):
    keys: list[str]

    def get_arrays(self) -> list[np.ndarray]: ...

    def set_arrays(self, arrays: Sequence[np.ndarray]) -> None: ...

    def train(self, data: Any, steps: int, *, lr: float, seed: int) -> dict[str, float]: ...


class PalateClient(NumPyClient):
    """Trains on local data and returns weights; nothing about the data is returned.

    Before training it checks the round against the user's policy (the spec must match,
    the noise multiplier must be at least ``min_noise_multiplier``) and the privacy budget
    (:class:`BudgetExhausted` when one more round would exceed it; ``exhausted`` is then
    set so a long-running client can stop). The round is written to the ledger before the
    update is returned.
    """

    def __init__(
        self,
        trainer: Trainer,
        data: Any,
        ledger: Ledger,
        budget: Budget,
        spec: str,
        *,
        min_noise_multiplier: float = 0.0,
        fail: Callable[[int], None] | None = None,
    ) -> None:
        self.trainer = trainer
        self.data = data
        self.ledger = ledger
        self.budget = budget
        self.spec = spec
        self.min_noise_multiplier = min_noise_multiplier
        self.exhausted = False
        #: The last round whose new global weights this client received (0: none yet).
        self.delivered_round = 0
        self._fail = fail  # tests: a hook that may raise mid-round

    def _check(self, config: dict[str, Any]) -> tuple[str, int]:
        if str(config.get(K_SPEC)) != self.spec:
            raise ValueError(
                f"the server trains {config.get(K_SPEC)!r}, this client has {self.spec!r}"
            )
        return str(config[K_FEDERATION]), int(config[K_ROUND])

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        # The seeded initial weights (no data has touched them): any client can supply them.
        return self.trainer.get_arrays()

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        federation, rnd = self._check(config)
        z = float(config[K_NOISE])
        clip = float(config[KEY_CLIPPING_NORM])
        delta = float(config.get(K_DELTA, self.budget.delta))
        if z < self.min_noise_multiplier:
            raise ValueError(
                f"round {rnd}: noise multiplier {z:g} is below this client's minimum "
                f"{self.min_noise_multiplier:g}; not taking part"
            )
        recorded = self.ledger.multipliers()
        try:
            self.budget.check(recorded, z)
        except BudgetExhausted:
            self.exhausted = True
            raise
        self.trainer.set_arrays(parameters)
        self.ledger.save_adapter(
            federation,
            {"spec": self.spec, "round": rnd - 1, "keys": list(self.trainer.keys)},
            arrays_to_bytes(self.trainer.keys, parameters),
        )
        if self._fail is not None:
            self._fail(rnd)
        self.trainer.train(self.data, int(config[K_STEPS]), lr=float(config[K_LR]), seed=rnd)
        eps = epsilon_for([*recorded, z], self.budget.delta)
        self.ledger.record(federation, rnd, z, clip, delta, eps)
        return self.trainer.get_arrays(), 1, {}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Receives the new global weights and keeps them; reports nothing about the data."""
        federation, rnd = self._check(config)
        self.ledger.save_adapter(
            federation,
            {"spec": self.spec, "round": rnd, "keys": list(self.trainer.keys)},
            arrays_to_bytes(self.trainer.keys, parameters),
        )
        self.delivered_round = max(self.delivered_round, rnd)
        return 0.0, 1, {}


def _train_config(msg: Message) -> dict[str, Any]:
    for record in msg.content.config_records.values():
        if K_CLIPPING in record:
            return dict(record)
    return {}


def _clipping_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's fixed or adaptive clipping mod, whichever the server asked for."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    if _train_config(msg).get(K_CLIPPING) == "adaptive":
        return adaptiveclipping_mod(msg, ctxt, call_next)
    return fixedclipping_mod(msg, ctxt, call_next)


def _secagg_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ mod when the server runs SecAgg+, else a pass-through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in (
        msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def build_client_app(make_client: Callable[[Context], NumPyClient]) -> ClientApp:
    """A ClientApp whose replies are clipped (and masked under SecAgg+) by Flower's mods.

    Order matters: SecAgg+ outermost, so it masks the already-clipped update.
    """
    return ClientApp(
        client_fn=lambda context: make_client(context).to_client(),
        mods=[_secagg_mod, _clipping_mod],
    )


# ---------------------------------------------------------------------------------- server


class _Tolerant:
    """Mixin for Flower's client-side DP wrappers: a failed client does not void the round.

    Flower's wrappers skip aggregation when any client failed. Here failures are logged and
    dropped, the others are averaged, and the Gaussian noise is ``z * C / k`` for the ``k``
    updates actually averaged, so each user's noise multiplier stays ``z``.
    """

    noise_multiplier: float
    clipping_norm: float
    strategy: Strategy
    noise_log: list[dict[str, float]]

    def _noised(
        self, server_round: int, results: list[Any], failures: list[Any], adaptive: bool
    ) -> tuple[Any, dict[str, Any]]:
        if failures:
            log.warning(
                "round %d: %d client(s) failed; averaging the others", server_round, len(failures)
            )
        if not results:
            return None, {}
        clip_used = float(self.clipping_norm)
        params, metrics = self.strategy.aggregate_fit(server_round, results, [])
        if adaptive:
            self._update_clip_norm(results)  # type: ignore[attr-defined]
        if params is not None:
            params = add_gaussian_noise_to_params(
                params, self.noise_multiplier, clip_used, len(results)
            )
            self.noise_log.append(
                {
                    "round": server_round,
                    "clients": len(results),
                    "failures": len(failures),
                    "clipping_norm": clip_used,
                    "noise_multiplier": float(self.noise_multiplier),
                    "std": _noise_std(self.noise_multiplier, clip_used, len(results)),
                    # Under SecAgg+ every result carries the same unmasked average: 1.
                    "distinct_updates": _distinct(results),
                }
            )
        return params, dict(metrics or {})


def _distinct(results: list[Any]) -> int:
    """How many different weight vectors the strategy received (not what they are)."""
    return len({b"".join(res.parameters.tensors) for _, res in results})


class TolerantFixedClipping(_Tolerant, DifferentialPrivacyClientSideFixedClipping):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_log = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        return self._noised(server_round, list(results), list(failures), adaptive=False)


class TolerantAdaptiveClipping(_Tolerant, DifferentialPrivacyClientSideAdaptiveClipping):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_log = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        return self._noised(server_round, list(results), list(failures), adaptive=True)


def _no_metrics(_metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    return {}


def build_strategy(
    plan: FederationPlan, initial_arrays: Sequence[np.ndarray] | None = None
) -> TolerantFixedClipping | TolerantAdaptiveClipping:
    """FedAvg (or a trimmed mean) inside Flower's client-side DP wrapper.

    Every client is asked each round (``plan.clients`` of them; a round waits for
    ``plan.min_clients``, all by default). Without ``initial_arrays`` the starting weights
    come from one client (its seeded initial weights: no data is involved).
    """
    if plan.aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {plan.aggregator!r}")
    if plan.clipping not in CLIPPING:
        raise ValueError(f"clipping must be one of {CLIPPING}, got {plan.clipping!r}")
    need = plan.min_clients or plan.clients
    common: dict[str, Any] = {
        "fraction_fit": 1.0,
        "fraction_evaluate": 1.0 if plan.deliver_final else 0.0,
        "min_fit_clients": need,
        "min_evaluate_clients": need if plan.deliver_final else 0,
        "min_available_clients": need,
        "on_fit_config_fn": plan.fit_config,
        "on_evaluate_config_fn": plan.eval_config,
        "accept_failures": True,
        # Clients send no metrics (nothing about their data): nothing to aggregate.
        "fit_metrics_aggregation_fn": _no_metrics,
        "evaluate_metrics_aggregation_fn": _no_metrics,
        "initial_parameters": (
            ndarrays_to_parameters(list(initial_arrays)) if initial_arrays is not None else None
        ),
    }
    inner: Strategy = (
        FedAvg(**common) if plan.aggregator == "fedavg" else FedTrimmedAvg(beta=0.2, **common)
    )
    if plan.clipping == "adaptive":
        return TolerantAdaptiveClipping(
            inner,
            noise_multiplier=plan.noise_multiplier,
            num_sampled_clients=plan.clients,
            initial_clipping_norm=plan.clipping_norm,
            # The clipped-count query shares the budget: with few clients Flower's default
            # (clients / 20) is too small for any useful noise multiplier.
            clipped_count_stddev=(
                max(plan.clients / 20, plan.noise_multiplier) if plan.noise_multiplier > 0 else None
            ),
        )
    return TolerantFixedClipping(
        inner,
        noise_multiplier=plan.noise_multiplier,
        clipping_norm=plan.clipping_norm,
        num_sampled_clients=plan.clients,
    )


def _wait_for_nodes(grid: Any, n: int, poll_s: float = 1.0) -> None:
    import time

    while len(list(grid.get_node_ids())) < n:
        time.sleep(poll_s)


def build_server_app(
    plan: FederationPlan, strategy: Strategy, on_done: Callable[[LegacyContext], None] | None = None
) -> ServerApp:
    """A ServerApp running ``plan.rounds`` rounds of ``strategy`` (SecAgg+ if planned)."""
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        if plan.min_clients is not None and plan.min_clients < plan.clients:
            # Rounds go on with ``min_clients`` (a client may drop out), but the first
            # one waits for everybody, so that nobody misses it.
            _wait_for_nodes(grid, plan.clients)
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=plan.rounds), strategy=strategy
        )
        fit_workflow = None
        if plan.secagg:
            if plan.clients < 3:
                raise ValueError("SecAgg+ needs at least 3 clients")
            # Every client shares its keys with all the others (small teams); a round
            # survives as long as two thirds of them answer.
            # Every weight is 1 (uniform averaging), so ``max_weight=1``: Flower's default of
            # 1000 scales each vector by 1/1000 before quantizing and loses ~30% of an update.
            fit_workflow = SecAggPlusWorkflow(
                num_shares=plan.clients,
                reconstruction_threshold=max(2, -(-2 * plan.clients // 3)),
                max_weight=1.0,
            )
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        if on_done is not None:
            on_done(legacy)

    return app
