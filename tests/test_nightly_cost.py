"""A later night through the nightly run's own code (runtime.training_child._run) on a real
encrypted store: what it reuses from earlier nights (issue 15, "every later night cheap").

- the gate's frozen pass over the held-out set and the probes is kept: night 2 sends only
  its new held-out examples through the frozen blocks, and shares the rest between the
  candidate and the deployed model;
- ``warm_start`` starts from the deployed model's weights when the shapes match, and from
  the seed otherwise (the registry says which); warm, it trains on the new events plus a
  rehearsal sample of earlier ones (``warm_replay``), not on everything again.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from palate.config import Config
from palate.evaluation.gate import GatePolicy
from palate.runtime import training_child
from palate.store.database import IngestGroup, Store
from store_events import pair_events
from tiny_gguf import tiny_args, tiny_model, write_gguf

TRAIN: dict[str, Any] = {
    "lora_layers": 1, "max_tokens": 64, "min_steps": 5, "members": 1, "epochs": 1,
    "lr": 3e-3, "batch_tokens": 1024,
}  # fmt: skip


@pytest.fixture()
def tiny(tmp_path: Path) -> str:
    args = tiny_args()
    return str(write_gguf(tmp_path / "tiny.gguf", tiny_model(args), args))


def night(store: Store, cfg: Config, name: str) -> dict[str, Any]:
    result = training_child._run(store, cfg, name, True, GatePolicy())
    meta, _ = store.get_model(result["version"])
    return {**result, "training": meta["meta"]["training"]}


def test_a_later_night_reuses_the_gates_frozen_pass_and_warm_starts(
    tmp_path: Path, tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training_child, "say", lambda *a, **k: None)  # no daemon to read it
    store = Store(tmp_path / "p.db", secrets.token_bytes(32))
    try:
        store.ingest([IngestGroup(pair_events(100, seed=1))])
        cfg = Config(base_model=tiny, train={**TRAIN, "warm_start": True})
        first = night(store, cfg, "n1")
        assert first["training"]["init"] == "seed"  # nothing deployed yet
        gate1 = first["training"]["frozen_cache"]["gate"]
        assert gate1["reused"] == 0 and gate1["computed"] > 80  # the 80 probes and held-out
        if store.deployed_version() != first["version"]:
            store.deploy_model(first["version"], how="override", reason="test")

        store.ingest([IngestGroup(pair_events(10, seed=2))])
        second = night(store, cfg, "n2")
        assert second["training"]["init"] == f"deployed:v{first['version']}"
        gate2 = second["training"]["frozen_cache"]["gate"]
        # Only new held-out examples ran through the frozen blocks; everything judged before
        # came from the store, and the deployed model read what the candidate computed.
        assert gate2["reused"] == gate1["computed"]
        assert gate2["computed"] <= 10
        assert gate2["shared"] == gate2["reused"] + gate2["computed"]
        # A warm start trains on what is new plus 3x as many earlier examples (rehearsal),
        # with no minimum step count.
        replay = second["training"]["summary"]["warm_replay"]
        assert 0 < replay["new"] <= 10 and replay["replayed"] == 3 * replay["new"]
        assert second["training"]["summary"]["train_examples"] == replay["new"] * 4
        assert second["training"]["config"]["min_steps"] == 0
        # Read from the store: the replayed examples (training) and the gate's rows.
        assert second["training"]["frozen_cache"]["reused"] == replay["replayed"] + gate2["reused"]

        # Another LoRA shape than the deployed model's: it starts from the seed.
        other = Config(base_model=tiny, train={**TRAIN, "warm_start": True, "lora_rank": 4})
        assert night(store, other, "n3")["training"]["init"] == "seed"
    finally:
        store.close()
