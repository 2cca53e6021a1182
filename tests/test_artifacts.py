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
