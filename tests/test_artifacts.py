"""Artifacts: bytes and dir round trips reproduce scores exactly; mismatches all reported."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.model.artifacts import (  # noqa: E402
    ArtifactError,
    artifact_from_model,
    build_config,
    from_bytes,
    load_dir,
    load_model,
    save_dir,
    to_bytes,
)
from palate.model.scoring import Scorer  # noqa: E402
from palate.model.training import TrainConfig, train_reward_model  # noqa: E402
from tiny_lm import marker_pairs, tiny_base  # noqa: E402


@pytest.fixture(scope="module")
def trained():  # type: ignore[no-untyped-def]
    base = tiny_base()
    cfg = TrainConfig(epochs=1, lora_layers=2, lr=3e-3, batch_tokens=1024, max_tokens=64)
    res = train_reward_model(marker_pairs(60), cfg, base=base)
    config = build_config(
        base,
        cfg.lora(),
        cfg.max_tokens,
        res.calibration,
        res.data_summary,
        res.metrics,
        cfg.to_json(),
    )
    return base, res, artifact_from_model(res.model, config)


def _scores(scorer: Scorer) -> np.ndarray:
    return scorer.raw_scores("Human: w1 w2 w3", ["w4 zz", "w5 w6 w7", "w8"])


def test_bytes_round_trip_reproduces_scores_exactly(trained) -> None:  # type: ignore[no-untyped-def]
    base, res, art = trained
    before = _scores(Scorer(res.model, base.tokenizer, 64, res.calibration))
    loaded = load_model(from_bytes(to_bytes(art)), base=base)
    np.testing.assert_array_equal(_scores(loaded.scorer()), before)
    assert loaded.calibration == res.calibration


def test_dir_round_trip_and_self_description(trained, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, res, art = trained
    save_dir(art, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["base_model"]["id"] == base.model_id
    assert cfg["base_model"]["content_hash"] == base.content_hash
    assert cfg["base_model"]["tokenizer_hash"] == base.tokenizer_hash
    assert cfg["lora"]["rank"] == 16 and cfg["calibration"]["temperature"] > 0
    assert cfg["training_data"]["pairs"] == 60
    loaded = load_model(load_dir(tmp_path / "m"), base=base)
    np.testing.assert_array_equal(
        _scores(loaded.scorer()), _scores(Scorer(res.model, base.tokenizer, 64, res.calibration))
    )


def test_all_mismatches_reported_at_once(trained) -> None:  # type: ignore[no-untyped-def]
    base, _, art = trained
    tensors = dict(art.tensors)
    names = sorted(tensors)
    del tensors[names[0]]
    tensors[names[1]] = tensors[names[1]][:, :1]
    tensors["bogus.weight"] = np.zeros(3, np.float32)
    bad = from_bytes(to_bytes(type(art)(tensors=tensors, config=art.config)))
    with pytest.raises(ArtifactError) as info:
        load_model(bad, base=base)
    problems = info.value.details["problems"]
    assert len(problems) == 3
    assert any("missing" in p for p in problems) and any("unexpected" in p for p in problems)
    assert any("shape mismatch" in p for p in problems)


def test_wrong_base_and_garbage_rejected(trained) -> None:  # type: ignore[no-untyped-def]
    _, _, art = trained
    other = tiny_base()
    other.content_hash = "different"
    with pytest.raises(ArtifactError, match="different base"):
        load_model(art, base=other)
    with pytest.raises(ArtifactError):
        from_bytes(b"not an artifact at all")


def test_a_shallower_model_reads_the_reward_at_its_depth_and_round_trips() -> None:
    """``depth``: only the base's first N blocks exist in the reward model; LoRA sits on the
    top ``lora_layers`` of those; the artifact records it, so a reload scores the same; the
    numpy engine agrees with MLX; and the blocks above N never influence a score."""
    from palate.model.cpu_forward import PARITY_TOLERANCE, CpuEngine, parity_error
    from palate.model.training import federation_spec

    base = tiny_base(layers=4)
    cfg = TrainConfig(epochs=1, lora_layers=1, depth=2, lr=3e-3, batch_tokens=1024,
                      max_tokens=64, min_steps=5, members=1)  # fmt: skip
    res = train_reward_model(marker_pairs(40), cfg, base=base)
    model = res.model
    assert model.num_layers == 2 and model.split == 1 and len(model.layers) == 2
    assert "depth=2" in federation_spec("b", cfg.lora())
    assert "depth" not in federation_spec("b", TrainConfig().lora())  # old specs unchanged
    eng = CpuEngine(model, threads=1)
    try:
        assert parity_error(model, eng) < PARITY_TOLERANCE
    finally:
        eng.close()
    art = artifact_from_model(
        model, build_config(base, cfg.lora(), 64, res.calibration, {}, {}, cfg.to_json())
    )
    assert art.config["lora"]["depth"] == 2
    before = _scores(Scorer(model, base.tokenizer, 64, res.calibration))
    loaded = load_model(from_bytes(to_bytes(art)), base=base)
    assert loaded.model.num_layers == 2
    np.testing.assert_array_equal(_scores(loaded.scorer()), before)
    # Scrambling block 3 (above the depth) changes nothing.
    import mlx.core as mx
    from mlx.utils import tree_flatten

    top = base.model.model.layers[3]
    top.load_weights(
        [(k, mx.random.normal(v.shape)) for k, v in tree_flatten(top.parameters())], strict=False
    )
    np.testing.assert_array_equal(_scores(loaded.scorer()), before)
    with pytest.raises(ValueError, match="depth 9"):
        train_reward_model(marker_pairs(8), TrainConfig(depth=9, lora_layers=1), base=base)


def test_an_unset_depth_takes_the_bases_shipped_depth() -> None:
    """The embedded model ships ``reward_depth`` 18 (chosen on validation loss); a config
    with depth 0 resolves to it wherever a reward model is built from a config, an explicit
    depth wins, and a depth the LoRA blocks do not fit under is left unset."""
    from dataclasses import replace

    from palate.model.base_model import BUILTIN_MODELS, _builtin_reward_depth
    from palate.model.reward_model import LoraConfig, lora_for_base

    assert BUILTIN_MODELS["smollm2-135m"].reward_depth == 18
    assert _builtin_reward_depth("builtin:smollm2-135m", 30) == 18
    assert _builtin_reward_depth("/some/model.gguf", 30) == 0
    assert _builtin_reward_depth("builtin:smollm2-135m", 12) == 0  # does not fit: all blocks
    base = replace(tiny_base(layers=4), reward_depth=3)
    assert lora_for_base(LoraConfig(layers=1), base).depth == 3
    assert lora_for_base(LoraConfig(layers=1, depth=2), base).depth == 2
    assert lora_for_base(LoraConfig(layers=3), base).depth == 0
    cfg = TrainConfig(epochs=1, lora_layers=1, lr=3e-3, batch_tokens=1024, max_tokens=64,
                      min_steps=2, members=1)  # fmt: skip
    res = train_reward_model(marker_pairs(24), cfg, base=base)
    assert res.model.num_layers == 3 and res.model.lora.depth == 3
