"""``palate federate``: opt-in federated training on Flower (docs/federated.md).

Nothing federates unless you run ``palate federate join``. Commands:

- ``simulate``: Flower rounds on this machine over non-IID shards of a JSONL file;
- ``serve``: the aggregation server (no data, no base model needed);
- ``join``: take part from this user's encrypted store, within a privacy budget;
- ``status``: rounds joined and epsilon spent;
- ``certs``: a private CA and server certificate for TLS.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import click

from palate.cli.common import emit, handles_errors, json_option
from palate.errors import PalateError

__all__ = ["federate"]

DEFAULT_ADDRESS = "127.0.0.1:9092"
DEFAULT_BUDGET = 8.0
META_BUDGET = "federation.epsilon_budget"


def _need_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise PalateError(
            "unavailable",
            "federated training needs Flower: pip install 'palate[federated]'",
        )


def _options(*opts: Any) -> Any:
    """One decorator applying ``opts`` in the order listed (as stacked decorators would)."""

    def apply(fn: Any) -> Any:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return apply


_plan_options = _options(
    click.option("--rounds", type=click.IntRange(1), default=5, show_default=True),
    click.option(
        "--noise-multiplier",
        type=click.FloatRange(0.0),
        default=1.5,
        show_default=True,
        help="Gaussian noise std / (clipping norm / clients); 0 = no DP noise.",
    ),
    click.option(
        "--clipping-norm",
        type=click.FloatRange(0.0, min_open=True),
        default=0.5,
        show_default=True,
        help="L2 bound of one client's update (initial bound when adaptive).",
    ),
    click.option(
        "--clipping",
        type=click.Choice(["fixed", "adaptive"]),
        default="fixed",
        show_default=True,
    ),
    click.option(
        "--aggregator",
        type=click.Choice(["fedavg", "trimmed-mean"]),
        default="fedavg",
        show_default=True,
        help="fedavg (the epsilon holds) or a trimmed mean (robust; see the docs).",
    ),
    click.option("--local-steps", type=click.IntRange(1), default=10, show_default=True),
    click.option(
        "--lr", type=click.FloatRange(0.0, min_open=True), default=1e-3, show_default=True
    ),
    click.option(
        "--delta",
        type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
        default=1e-5,
        show_default=True,
    ),
)

_model_options = _options(
    click.option("--base-model", default="builtin:smollm2-135m", show_default=True),
    click.option("--lora-rank", type=click.IntRange(1), default=16, show_default=True),
    click.option("--lora-alpha", type=float, default=32.0, show_default=True),
    click.option(
        "--lora-layers",
        type=click.IntRange(0),
        default=4,
        show_default=True,
        help="Top blocks with LoRA (0: the head only).",
    ),
    click.option("--max-tokens", type=click.IntRange(8), default=256, show_default=True),
)


def _lora(kw: dict[str, Any]) -> Any:
    from palate.model.reward_model import LoraConfig

    return LoraConfig(rank=kw["lora_rank"], alpha=kw["lora_alpha"], layers=kw["lora_layers"])


def _spec(kw: dict[str, Any]) -> str:
    from palate.model.local_update import model_spec

    return model_spec(kw["base_model"], _lora(kw))


def _plan(kw: dict[str, Any], federation: str, clients: int, secagg: bool) -> Any:
    from palate.federation.apps import FederationPlan

    return FederationPlan(
        federation=federation,
        spec=_spec(kw),
        rounds=kw["rounds"],
        clients=clients,
        noise_multiplier=kw["noise_multiplier"],
        clipping_norm=kw["clipping_norm"],
        clipping=kw["clipping"],
        aggregator=kw["aggregator"],
        local_steps=kw["local_steps"],
        lr=kw["lr"],
        delta=kw["delta"],
        secagg=secagg,
    )


def _trainer(kw: dict[str, Any]) -> Any:
    from palate.model.base_model import load_base_model
    from palate.model.local_update import LocalTrainer

    base = load_base_model(kw["base_model"])
    return LocalTrainer(base, _lora(kw), max_tokens=kw["max_tokens"])


def _eps(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "inf (no noise)"


@click.group()
def federate() -> None:
    """Federated training on Flower: improve a shared starting point without sharing data.

    Off unless you join. Only clipped, noised LoRA/head weights leave this machine; each
    round you join is recorded in your encrypted store with the epsilon it costs, and you
    stop taking part before a round would exceed your budget. See docs/federated.md.
    """


@federate.command()
@click.option("--clients", type=click.IntRange(1), default=10, show_default=True)
@click.option(
    "--data",
    "data_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="JSONL pairs: prompt, chosen, rejected (optional topic).",
)
@click.option("--pairs-per-client", type=click.IntRange(2), default=100, show_default=True)
@click.option(
    "--shard-by",
    type=click.Choice(["topic", "length"]),
    default="topic",
    show_default=True,
    help="How the shards differ (non-IID).",
)
@click.option(
    "--secagg/--no-secagg",
    default=True,
    show_default=True,
    help="Mask updates with Flower's SecAgg+ (needs 3+ clients).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@_plan_options
@_model_options
@json_option
@handles_errors
def simulate(as_json: bool, **kw: Any) -> None:
    """Run Flower rounds on this machine over non-IID shards of --data (no Ray needed)."""
    _need_flower()
    import logging

    from palate.federation.simulate import load_pairs, run_simulation, shard_pairs

    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round INFO lines: not here
    rows = load_pairs(kw["data_file"])
    shards = shard_pairs(rows, kw["clients"], kw["pairs_per_client"], kw["shard_by"], kw["seed"])
    plan = _plan(kw, "simulation", kw["clients"], kw["secagg"] and kw["clients"] >= 3)
    say = (lambda m: None) if as_json else (lambda m: click.echo(f"... {m}", err=True))
    result = run_simulation(shards, _trainer(kw), plan, progress=say)
    data = {**result.to_json(), "shard_by": kw["shard_by"]}

    def human(d: dict[str, Any]) -> None:
        eps = d["epsilon"]
        click.echo(
            f"{d['clients']} clients x {d['rounds']} rounds, shards by {d['shard_by']}; "
            f"epsilon {eps if eps is None else round(eps, 3)} at delta {d['delta']:g}"
        )
        click.echo(f"global accuracy      {d['global_accuracy']:.3f}")
        click.echo(f"local-only (mean)    {d['local_accuracy_mean']:.3f}")
        click.echo(f"untrained            {d['initial_accuracy']:.3f}")
        b = d["bytes_per_client_per_round"]
        click.echo(
            f"{d['seconds_per_round']:.1f} s/round; per client per round "
            f"{b['up'] / 1e6:.2f} MB up, {b['down'] / 1e6:.2f} MB down"
        )

    emit(data, as_json, human)


@federate.command()
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True)
@click.option(
    "--clients",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="Clients every round waits for (and averages).",
)
@click.option(
    "--min-clients",
    type=click.IntRange(1),
    default=None,
    help="Rounds go on with this many if others drop out [default: all of --clients]; "
    "the first round waits for all.",
)
@click.option("--federation", default="palate", show_default=True, help="A name for this run.")
@click.option(
    "--secagg/--no-secagg",
    default=True,
    show_default=True,
    help="Mask updates with Flower's SecAgg+ (with 3+ clients): the server sees only the sum.",
)
@click.option(
    "--tls",
    "tls_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory with ca.crt, server.pem, server.key (required off loopback).",
)
@_plan_options
@_model_options
@json_option
@handles_errors
def serve(
    as_json: bool,
    address: str,
    clients: int,
    min_clients: int | None,
    federation: str,
    secagg: bool,
    tls_dir: Path | None,
    **kw: Any,
) -> None:
    """Aggregate rounds: FedAvg (or a trimmed mean) of clipped updates, plus DP noise.

    Runs Flower's SuperLink on --address; each client's `join` connects a SuperNode to it.
    With 3+ clients the updates are masked with SecAgg+ unless --no-secagg.
    """
    _need_flower()
    from dataclasses import replace

    from palate.federation.deploy import TlsFiles
    from palate.federation.deploy import serve as run_serve

    if min_clients is not None and min_clients > clients:
        raise PalateError("invalid_request", "--min-clients cannot exceed --clients")
    plan = _plan(kw, federation, clients, secagg=secagg and clients >= 3)
    if min_clients is not None:
        threshold = max(2, -(-2 * clients // 3))
        if plan.secagg and min_clients < threshold:
            raise PalateError(
                "invalid_request",
                f"with SecAgg+ a round needs {threshold} of {clients} clients "
                f"(--min-clients {threshold} or more, or --no-secagg)",
            )
        plan = replace(plan, min_clients=min_clients)
    tls = TlsFiles(tls_dir) if tls_dir is not None else None
    summary = run_serve(plan, address, tls)

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"{d['rounds_aggregated']}/{d['rounds']} rounds aggregated with {d['clients']} "
            f"clients in {d['seconds']} s; noise multiplier {d['noise_multiplier']}; "
            f"SecAgg+ {'on' if d['secagg'] else 'off'}"
        )

    emit(summary, as_json, human)


def _open_store() -> Any:
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager, zero

    paths = resolve()
    dek = KeyManager.for_home(paths).unwrap()
    try:
        return Store(paths.db_file, dek)
    finally:
        zero(dek)


def _exit_hook() -> Any:
    """Tests: ``PALATE_FEDERATE_TEST_EXIT_IN_ROUND=R`` ends this process (SIGTERM, as on a
    shutdown) while it trains in round R, i.e. mid-round."""
    import os

    value = os.environ.get("PALATE_FEDERATE_TEST_EXIT_IN_ROUND")
    if not value:
        return None

    def hook(rnd: int) -> None:
        import signal

        if rnd == int(value):
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@federate.command()
@click.option("--server", "address", default=DEFAULT_ADDRESS, show_default=True)
@click.option(
    "--budget",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help=f"Your epsilon budget over all rounds ever joined [default: the last one "
    f"set, else {DEFAULT_BUDGET:g}].",
)
@click.option(
    "--min-noise",
    type=click.FloatRange(0.0),
    default=1.0,
    show_default=True,
    help="Refuse rounds whose noise multiplier is below this.",
)
@click.option(
    "--delta",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=1e-5,
    show_default=True,
)
@click.option(
    "--tls",
    "tls_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory with the server's ca.crt (required off loopback).",
)
@click.option(
    "--max-wait",
    type=click.FloatRange(1.0),
    default=60.0,
    show_default=True,
    help="Seconds to keep trying to reach the server.",
)
@_model_options
@json_option
@handles_errors
def join(
    as_json: bool,
    address: str,
    budget: float | None,
    min_noise: float,
    delta: float,
    tls_dir: Path | None,
    max_wait: float,
    **kw: Any,
) -> None:
    """Take part in a federation with your own feedback; it never leaves this machine.

    Trains on your training split only (the held-out pairs the gate judges on stay out),
    sends clipped LoRA/head weights, and keeps the shared weights as a starting point for
    your nightly training. Stops before a round would exceed your epsilon budget.
    """
    _need_flower()
    from palate.evaluation.split import example_key, split_items
    from palate.events import to_examples
    from palate.federation.accounting import Budget, epsilon_for
    from palate.federation.apps import PalateClient
    from palate.federation.deploy import StoreLedger, TlsFiles
    from palate.federation.deploy import join as run_join

    store = _open_store()
    try:
        if budget is None:
            budget = float(store.get_meta(META_BUDGET, DEFAULT_BUDGET))
        store.set_meta(META_BUDGET, budget)
        examples = [ex for event in store.iter_events() for ex in to_examples(event)]
        train = split_items(examples, key=example_key).train
        if not train:
            raise PalateError("invalid_request", "no feedback to train on yet")
        ledger = StoreLedger(store)
        bud = Budget(epsilon=budget, delta=delta)
        before = len(ledger.multipliers())
        if bud.spent(ledger.multipliers()) >= budget:
            raise PalateError(
                "conflict",
                f"your privacy budget is spent (epsilon {_eps(bud.spent(ledger.multipliers()))} "
                f"of {budget:g}); not joining",
            )
        trainer = _trainer(kw)
        data = trainer.prepare(train)
        client = PalateClient(
            trainer, data, ledger, bud, _spec(kw), min_noise_multiplier=min_noise, fail=_exit_hook()
        )
        tls = TlsFiles(tls_dir) if tls_dir is not None else None
        reason = run_join(client, address, tls, max_wait_s=max_wait)
        zs = ledger.multipliers()
        out = {
            "stopped": reason,
            "rounds_joined": len(zs) - before,
            "rounds_total": len(zs),
            "epsilon": epsilon_for(zs, delta),
            "delta": delta,
            "budget": budget,
            "train_examples": len(train),
        }
    finally:
        store.close()

    def human(d: dict[str, Any]) -> None:
        why = "budget reached" if d["stopped"] == "budget" else "server finished"
        click.echo(
            f"joined {d['rounds_joined']} round(s) ({why}); epsilon spent {_eps(d['epsilon'])} "
            f"of {d['budget']:g} at delta {d['delta']:g}"
        )

    emit(out, as_json, human)


@federate.command()
@click.option(
    "--delta",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=1e-5,
    show_default=True,
)
@json_option
@handles_errors
def status(as_json: bool, delta: float) -> None:
    """Rounds joined, epsilon spent of your budget, and the shared adapter you hold."""
    store = _open_store()
    try:
        rounds = store.federated_rounds()
        budget = float(store.get_meta(META_BUDGET, DEFAULT_BUDGET))
        adapter = store.federated_adapter()
    finally:
        store.close()
    zs = [float(r["noise_multiplier"]) for r in rounds]
    if zs:
        _need_flower()
        from palate.federation.accounting import epsilon_for

        eps = epsilon_for(zs, delta)
    else:
        eps = 0.0
    per: dict[str, int] = {}
    for r in rounds:
        per[r["federation"]] = per.get(r["federation"], 0) + 1
    data = {
        "rounds_joined": len(rounds),
        "federations": per,
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": delta,
        "budget": budget,
        "last_round": rounds[-1] if rounds else None,
        "adapter": adapter[0] if adapter else None,
    }

    def human(d: dict[str, Any]) -> None:
        if not d["rounds_joined"]:
            click.echo("not federating: no rounds joined (opt in with `palate federate join`)")
            return
        e = d["epsilon"]
        click.echo(
            f"{d['rounds_joined']} round(s) joined in {len(d['federations'])} federation(s); "
            f"epsilon spent {'inf' if e is None else f'{e:.3f}'} of {d['budget']:g} "
            f"at delta {d['delta']:g}"
        )
        if d["adapter"]:
            a = d["adapter"]
            click.echo(f"shared adapter: {a['federation']} after round {a['round']} ({a['spec']})")

    emit(data, as_json, human)


@federate.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    default=("127.0.0.1", "localhost"),
    show_default=True,
    help="Names/addresses the server certificate is valid for.",
)
@handles_errors
def certs(out_dir: Path, hosts: tuple[str, ...]) -> None:
    """Write a private CA and a server certificate (give clients only ca.crt)."""
    from palate.federation.deploy import make_certificates

    tls = make_certificates(out_dir, hosts)
    click.echo(json.dumps({"directory": str(tls.directory), "ca": str(tls.ca)}))
