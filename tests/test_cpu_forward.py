"""The numpy CPU forward equals MLX's grouped forward (cache pass and full scoring path)."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from palate.model.batching import bucket_batches, collate, encode_examples  # noqa: E402
from palate.model.cpu_forward import CpuEngine, cpu_engine_unsupported  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel  # noqa: E402
from palate.model.scoring import batch_arrays  # noqa: E402
from tiny_lm import marker_pairs, tiny_base  # noqa: E402


def _model_with_trained_lora(layers: int = 2) -> tuple[RewardModel, object]:
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(rank=4, alpha=8, layers=layers), seed=0)
    # LoRA B starts at zero; make it non-zero so the merged weights really differ from the base.
    mx.random.seed(1)
    upd = [
        (k, mx.random.normal(v.shape) * 0.05)
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith("lora_b")
    ]
    assert upd
    model.load_weights(upd, strict=False)
    return model, base


@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_forward_equals_mlx(threads: int) -> None:
    model, base = _model_with_trained_lora()
    assert cpu_engine_unsupported(model) is None
    eng = CpuEngine(model, threads=threads)
    groups, _ = encode_examples(marker_pairs(24), base.tokenizer, 64)  # type: ignore[attr-defined]
    for index in bucket_batches(groups, 400):
        b = collate(groups, index)
        args = (b.prompt, b.prompt_len, b.response, b.response_len, b.group)
        ref = np.array(model.forward_groups(*batch_arrays(b)))  # type: ignore[arg-type]
        got = eng.forward_groups(*args)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        # The lower (cached) blocks: same hidden states at every real position.
        hp_ref, hr_ref = (
            np.array(x) for x in model.forward_groups(*batch_arrays(b), end=model.split)
        )  # type: ignore[misc]
        hp, hr = eng.forward_groups(*args, end=model.split)  # type: ignore[misc]
        for k, n in enumerate(b.prompt_len):
            np.testing.assert_allclose(hp[k, :n], hp_ref[k, :n], rtol=1e-4, atol=1e-4)
        for k, n in enumerate(b.response_len):
            np.testing.assert_allclose(hr[k, :n], hr_ref[k, :n], rtol=1e-4, atol=1e-4)
        # And from the cache up: the top blocks over cached hidden states.
        top = eng.forward_groups(hp, b.prompt_len, hr, b.response_len, b.group, start=model.split)
        np.testing.assert_allclose(top, ref, rtol=1e-4, atol=1e-4)
    eng.close()


def test_quantized_model_is_reported_unsupported() -> None:
    import mlx.nn as nn

    model, _ = _model_with_trained_lora()
    nn.quantize(model.layers[0], group_size=32, bits=4)
    assert "quantized" in (cpu_engine_unsupported(model) or "")
