"""Federated training on Flower (palate.federation): privacy accounting against the
reference library, the noise Flower adds, what crosses the wire, crashes mid-round, the
budget, the store's ledger and the `palate federate` commands. Tiny random model only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from click.testing import CliRunner

from palate.federation.accounting import (
    Budget,
    BudgetExhausted,
    epsilon_for,
    noise_std,
)
from palate.federation.apps import FederationPlan, build_strategy
from palate.federation.loopback import WireLog
from palate.federation.simulate import run_simulation, shard_pairs
from palate.model.local_update import LocalTrainer, model_spec
from palate.model.reward_model import LoraConfig
from tiny_lm import marker_pairs, save_tiny_model_dir, tiny_base

LORA = LoraConfig(rank=4, alpha=8.0, layers=2)


@pytest.fixture(scope="module")
def trainer() -> LocalTrainer:
    return LocalTrainer(tiny_base(), LORA, max_tokens=64)


def plan(**kw: Any) -> FederationPlan:
    base = {
        "federation": "test",
        "spec": model_spec("tiny", LORA),
        "rounds": 2,
        "clients": 3,
        "noise_multiplier": 1.0,
        "clipping_norm": 0.5,
        "local_steps": 4,
        "lr": 3e-3,
    }
    return FederationPlan(**{**base, **kw})


def shards(clients: int = 3, per_client: int = 16, seed: int = 0) -> list[list[Any]]:
    rows = [(p, None) for p in marker_pairs(clients * per_client, seed=seed)]
    return shard_pairs(rows, clients, per_client, by="length")


# -- accounting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "rounds", "delta"), [(1.0, 5, 1e-5), (1.1, 7, 1e-6), (2.5, 40, 1e-5)]
)
def test_epsilon_matches_the_reference_accountant(z: float, rounds: int, delta: float) -> None:
    import dp_accounting
    from dp_accounting import rdp

    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert epsilon_for([z] * rounds, delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-9)


def test_epsilon_of_mixed_rounds_composes_them_all() -> None:
    import dp_accounting
    from dp_accounting import rdp

    reference = rdp.RdpAccountant()
    for z in (1.0, 2.0, 1.5):
        reference.compose(dp_accounting.GaussianDpEvent(z))
    assert epsilon_for([1.0, 2.0, 1.5]) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert epsilon_for([]) == 0.0
    assert epsilon_for([1.0, 0.0]) == math.inf  # a round without noise has no bound


def test_budget_refuses_the_round_that_would_exceed_it() -> None:
    budget = Budget(epsilon=epsilon_for([1.0] * 3) + 1e-9)
    assert budget.allows([1.0, 1.0], 1.0)
    budget.check([1.0, 1.0], 1.0)
    assert not budget.allows([1.0] * 3, 1.0)
    with pytest.raises(BudgetExhausted, match="budget"):
        budget.check([1.0] * 3, 1.0)


# -- noise ----------------------------------------------------------------------------------


class _Proxy:
    cid = "x"
    node_id = 0


def _fit_results(n: int, size: int) -> list[Any]:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    zeros = ndarrays_to_parameters([np.zeros(size, np.float32)])
    return [(_Proxy(), FitRes(Status(Code.OK, ""), zeros, 1, {})) for _ in range(n)]


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_noise_std_is_multiplier_times_clip_over_clients(clipping: str) -> None:
    from flwr.common import parameters_to_ndarrays

    z, clip, n, size = 1.3, 0.7, 4, 400_000
    strategy = build_strategy(
        plan(noise_multiplier=z, clipping_norm=clip, clients=n, clipping=clipping)
    )
    if clipping == "adaptive":  # the norm bit the adaptive mod sends
        results = _fit_results(n, size)
        for _, res in results:
            res.metrics["norm_bit"] = False
    else:
        results = _fit_results(n, size)
    params, _ = strategy.aggregate_fit(1, results, [])
    noise = parameters_to_ndarrays(params)[0]
    assert noise_std(z, clip, n) == pytest.approx(z * clip / n)
    expected = z * clip / n
    if clipping == "adaptive":  # part of the budget goes to the clipped-count query, so
        # the updates get a larger multiplier, and the pair composes to z (Andrew et al.)
        z_updates = strategy.noise_multiplier
        sigma_b = strategy.clipped_count_stddev
        assert z_updates > z
        assert z_updates**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
        expected = z_updates * clip / n
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    assert strategy.noise_log[-1]["clients"] == n
    assert strategy.noise_log[-1]["clipping_norm"] == clip


def test_noise_follows_the_clients_actually_averaged_when_one_failed() -> None:
    from flwr.common import parameters_to_ndarrays

    z, clip, n = 1.0, 0.5, 4
    strategy = build_strategy(plan(noise_multiplier=z, clipping_norm=clip, clients=n))
    params, _ = strategy.aggregate_fit(1, _fit_results(n - 1, 400_000), [RuntimeError("crash")])
    assert params is not None  # Flower's own wrapper would have skipped the round
    noise = parameters_to_ndarrays(params)[0]
    assert float(noise.std()) == pytest.approx(z * clip / (n - 1), rel=0.01)
    assert strategy.noise_log[-1] == {
        "round": 1,
        "clients": n - 1,
        "failures": 1,
        "clipping_norm": clip,
        "noise_multiplier": z,
        "std": pytest.approx(z * clip / (n - 1)),
        "distinct_updates": 1,  # the fake results are all zeros
    }


# -- the wire ---------------------------------------------------------------------------------


def _token_runs(trainer: LocalTrainer, pairs: list[Any]) -> list[bytes]:
    from palate.model.reward_model import encode_prompt_responses

    runs = []
    for p in pairs:
        prompt, responses = encode_prompt_responses(trainer.base.tokenizer, p.prompt, [p.chosen])
        for ids in (prompt, responses[0]):
            if len(ids) >= 4:
                for dtype in (np.int32, np.int64, np.float32):
                    runs.append(np.asarray(ids[:4], dtype=dtype).tobytes())
    return runs


def test_only_clipped_weights_cross_the_wire(trainer: LocalTrainer) -> None:
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    data = shards()
    wire = WireLog(capture=True)
    clip = 0.5
    run_simulation(data, trainer, plan(clipping_norm=clip, secagg=False), wire=wire)
    assert wire.messages
    texts = {t.encode() for shard in data for p in shard for t in (p.prompt, p.chosen, p.rejected)}
    ids = _token_runs(trainer, [p for shard in data for p in shard])
    shapes = set(trainer.shapes)
    last_sent: dict[int, list[np.ndarray]] = {}
    fit_replies = 0
    for node, direction, kind, blob in wire.messages:
        for t in texts:
            assert t not in blob, "event text on the wire"
        for run in ids:
            assert run not in blob, "token ids on the wire"
        proto = ProtoMessage()
        proto.ParseFromString(blob)
        msg = message_from_proto(proto)
        if msg.has_error():
            continue
        arrays = [a for rec in msg.content.array_records.values() for a in rec.to_numpy_ndarrays()]
        for a in arrays:  # LoRA/head tensors only: no hidden states, no token ids
            assert a.dtype == np.float32 and tuple(a.shape) in shapes, a.shape
        if direction == "down" and kind == "train":
            last_sent[node] = arrays
        if direction == "up":
            # Constants only: one example (uniform weights; the real count stays home), a
            # zero loss from `evaluate`, and no metric computed on local data.
            for rec in [*msg.content.metric_records.values(), *msg.content.config_records.values()]:
                extra = {
                    k: v
                    for k, v in rec.items()
                    if (k, v) not in {("num_examples", 1), ("loss", 0.0)}
                }
                assert extra in ({}, {"code": 0, "message": "Success"}), extra
        if direction == "up" and kind == "train":
            fit_replies += 1
            update = [a - b for a, b in zip(arrays, last_sent[node], strict=True)]
            norm = math.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update))
            assert norm <= clip * (1 + 1e-4), f"update of norm {norm} was not clipped to {clip}"
    assert fit_replies == 3 * 2


def test_secagg_plus_masks_the_update_and_keeps_the_sum(trainer: LocalTrainer) -> None:
    data = shards()
    start = trainer.get_arrays()
    plain = run_simulation(data, trainer, plan(rounds=1, secagg=False, noise_multiplier=0.0))
    trainer.set_arrays(start)
    wire = WireLog(capture=True)
    masked = run_simulation(
        data, trainer, plan(rounds=1, secagg=True, noise_multiplier=0.0), wire=wire
    )
    texts = {p.chosen.encode() for shard in data for p in shard}
    for *_, blob in wire.messages:
        assert not any(t in blob for t in texts)
    assert len(masked.noise) == 1 and masked.noise[-1]["clients"] == 3
    # SecAgg+ hides each update from the server, yet the average it unmasks is the same
    # (up to its quantization): without noise, one round ends at the same weights.
    for a, b in zip(plain.arrays, masked.arrays, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


# -- faults and budget --------------------------------------------------------------------


@pytest.mark.parametrize("secagg", [False, True])
def test_a_client_crashing_mid_round_does_not_break_the_round(
    trainer: LocalTrainer, secagg: bool
) -> None:
    def fail(client: int, rnd: int) -> None:
        if client == 1 and rnd == 2:
            raise RuntimeError("simulated crash in the middle of local training")

    result = run_simulation(
        shards(4, 12), trainer, plan(rounds=3, clients=4, secagg=secagg), fail=fail
    )
    assert [n["round"] for n in result.noise] == [1, 2, 3]
    by_round = {n["round"]: n for n in result.noise}
    assert by_round[2]["clients"] == 3
    assert by_round[1]["clients"] == by_round[3]["clients"] == 4
    joined = [c["rounds_joined"] for c in result.per_client]
    assert joined == [3, 2, 3, 3]  # the crashed round is not charged to its budget


def test_a_client_stops_before_its_budget_is_exceeded(trainer: LocalTrainer) -> None:
    budget = epsilon_for([1.0] * 2) + 1e-6
    result = run_simulation(
        shards(), trainer, plan(rounds=3, noise_multiplier=1.0), epsilon_budget=budget
    )
    assert [c["rounds_joined"] for c in result.per_client] == [2, 2, 2]
    assert result.epsilon <= budget
    assert len(result.noise) == 2  # round 3 had no one left to average


def test_non_iid_shards_differ() -> None:
    rows = [(p, None) for p in marker_pairs(120)]
    by_len = shard_pairs(rows, 4, 20, by="length")
    means = [np.mean([len(p.prompt) + len(p.chosen) for p in s]) for s in by_len]
    assert means == sorted(means) and means[-1] > means[0] * 1.3
    topical = shard_pairs([(p, f"t{i % 3}") for i, (p, _) in enumerate(rows)], 3, 20)
    assert all(len(s) == 20 for s in topical)
    by_topic = shard_pairs(rows, 4, 20, by="topic")
    assert sum(len(s) for s in by_topic) == 80


# -- store and CLI ----------------------------------------------------------------------------


def make_home(home: Path, pairs: int = 30, seed: int = 0) -> None:
    """A Palate home with a file-backed key and ``pairs`` feedback events in its store."""
    from palate.events import from_simple, validate_event
    from palate.paths import resolve
    from palate.store.database import IngestGroup, Store
    from palate.store.keys import KeyManager

    paths = resolve(home)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    dek = KeyManager.for_home(paths).create()
    store = Store(paths.db_file, dek)
    try:
        events = [
            validate_event(
                from_simple({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}, "t")
            )
            for p in marker_pairs(pairs, seed=seed)
        ]
        store.ingest([IngestGroup(events)])
    finally:
        store.close()


@pytest.fixture
def fed_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("PALATE_HOME", str(home))
    monkeypatch.setenv("PALATE_KEY_BACKEND", "file")
    make_home(home)
    return home


def test_ledger_lives_in_the_encrypted_store(fed_home: Path) -> None:
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    paths = resolve(fed_home)
    dek = KeyManager.for_home(paths).unwrap()
    store = Store(paths.db_file, dek)
    try:
        assert store.federated_rounds() == [] and store.federated_adapter() is None
        store.record_federated_round(
            federation="a",
            round=1,
            noise_multiplier=1.5,
            clipping_norm=0.5,
            delta=1e-5,
            epsilon=2.98,
        )
        store.record_federated_round(
            federation="b",
            round=4,
            noise_multiplier=2.0,
            clipping_norm=0.5,
            delta=1e-5,
            epsilon=4.0,
        )
        store.set_federated_adapter("a", {"spec": "s", "round": 1}, b"one")
        store.set_federated_adapter("a", {"spec": "s", "round": 2}, b"two")
        rows = store.federated_rounds()
        assert [(r["federation"], r["round"]) for r in rows] == [("a", 1), ("b", 4)]
        assert [r["round"] for r in store.federated_rounds("b")] == [4]
        meta, blob = store.federated_adapter("a")  # type: ignore[misc]
        assert blob == b"two" and meta["round"] == 2 and meta["federation"] == "a"
    finally:
        store.close()
    raw = paths.db_file.read_bytes()
    assert b"federation_rounds" not in raw  # the schema itself is encrypted

    from palate.cli.main import cli

    out = CliRunner().invoke(cli, ["federate", "status", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["rounds_joined"] == 2 and data["federations"] == {"a": 1, "b": 1}
    assert data["epsilon"] == pytest.approx(epsilon_for([1.5, 2.0]))


def test_status_says_not_federating_by_default(fed_home: Path) -> None:
    from palate.cli.main import cli

    out = CliRunner().invoke(cli, ["federate", "status"])
    assert out.exit_code == 0, out.output
    assert "not federating" in out.output


def test_simulate_command_json(tmp_path: Path) -> None:
    from palate.cli.main import cli

    model = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in marker_pairs(60)
        )
    )
    args = [
        "federate",
        "simulate",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--data",
        str(data),
        "--pairs-per-client",
        "16",
        "--shard-by",
        "length",
        "--base-model",
        model,
        "--lora-rank",
        "4",
        "--lora-alpha",
        "8",
        "--lora-layers",
        "2",
        "--max-tokens",
        "64",
        "--local-steps",
        "3",
        "--json",
    ]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    for key in ("rounds", "clients", "epsilon", "delta", "global_accuracy", "local_accuracy_mean"):
        assert key in result
    assert result["rounds"] == 2 and result["clients"] == 3
    assert result["epsilon"] == pytest.approx(epsilon_for([1.5, 1.5], result["delta"]))
    assert result["config"]["secagg"] is True
    assert 0.0 <= result["global_accuracy"] <= 1.0


def test_plain_transport_is_loopback_only() -> None:
    from palate.errors import PalateError
    from palate.federation.deploy import is_loopback, serve

    assert is_loopback("127.0.0.1:9092") and is_loopback("[::1]:9092")
    assert is_loopback("localhost:1")
    assert not is_loopback("10.0.0.1:9092") and not is_loopback("0.0.0.0:9092")
    with pytest.raises(PalateError, match="TLS"):
        serve(plan(), "0.0.0.0:9092")


def test_flower_is_optional_outside_the_federation_package() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import palate.cli.main, palate.runtime.daemon, palate.store.database; "
        "sys.exit(1 if 'flwr' in sys.modules else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


# -- the nightly run starts from the shared adapter ---------------------------------------


def test_shared_adapter_starts_the_nightly_run(fed_home: Path, trainer: LocalTrainer) -> None:
    from palate.federation.apps import arrays_to_bytes
    from palate.model.reward_model import RewardModel
    from palate.model.training import TrainConfig, load_trainable_state
    from palate.paths import resolve
    from palate.runtime.training_child import federated_start
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    arrays = [a + 0.01 for a in trainer.get_arrays()]
    tc = TrainConfig(base_model="tiny", lora_rank=4, lora_alpha=8.0, lora_layers=2, members=3)
    paths = resolve(fed_home)
    dek = KeyManager.for_home(paths).unwrap()
    store = Store(paths.db_file, dek)
    try:
        assert federated_start(store, tc) == (None, None)  # never joined: the usual start
        store.set_federated_adapter(
            "team",
            {"spec": model_spec("tiny", LORA), "round": 5},
            arrays_to_bytes(trainer.keys, arrays),
        )
        state, origin = federated_start(store, tc)
        other = TrainConfig(base_model="tiny", lora_rank=8, lora_alpha=8.0, lora_layers=2)
        assert federated_start(store, other) == (None, None)  # another shape: not used
    finally:
        store.close()
    assert origin == "federated:team@5"
    model = RewardModel(trainer.base.model, tc.lora(), seed=1, members=3)
    before = np.array(model.trainable_state()["head.weight"])
    load_trainable_state(model, state)
    after = {k: np.array(v) for k, v in model.trainable_state().items()}
    shared = dict(zip(trainer.keys, arrays, strict=True))
    for key, value in after.items():
        if key.startswith("head."):
            np.testing.assert_allclose(value[0], shared[key][0])  # member 0 from the team
        else:
            np.testing.assert_allclose(value, shared[key])
    np.testing.assert_allclose(after["head.weight"][1:], before[1:])  # the rest keep theirs


def test_control_and_runtime_apis_answer_loopback_peers_only() -> None:
    """The SuperLink's Control and Runtime APIs share the Fleet port: remote peers get 403."""
    import asyncio

    from palate.federation.engine import _LoopbackOnly

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    def status(path: str, peer: str) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": path, "client": (peer, 5000)}
        asyncio.run(_LoopbackOnly(app)(scope, None, send))
        return int(sent[0]["status"])

    assert status("/v1/fleet/pull-messages", "10.0.0.7") == 200  # remote SuperNodes
    assert status("/v1/control/start-run", "10.0.0.7") == 403
    assert status("/v1/runtime/acquire-task", "10.0.0.7") == 403
    assert status("/v1/control/start-run", "127.0.0.1") == 200  # serve's own ServerApp
    assert status("/v1/runtime/acquire-task", "::1") == 200
