"""The numpy CPU forward equals MLX's grouped forward (cache pass and full scoring path) on
every supported kind of base, the self-checks that guard both, and the allowlist."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import math  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from palate.model import scoring  # noqa: E402
from palate.model.base_model import (  # noqa: E402
    SELF_CHECK_TOLERANCE,
    ModelLoadError,
    _describe,
    self_check_error,
    unsupported_architecture,
)
from palate.model.batching import bucket_batches, collate, encode_examples  # noqa: E402
from palate.model.cpu_forward import (  # noqa: E402
    PARITY_TOLERANCE,
    CpuEngine,
    cpu_engine_unsupported,
    parity_error,
)
from palate.model.reward_model import LoraConfig, RewardModel  # noqa: E402
from palate.model.scoring import Scorer, batch_arrays, use_cpu_engine  # noqa: E402
from tiny_lm import TinyBase, marker_pairs, tiny_base, tiny_tokenizer  # noqa: E402

#: Tiny bases covering what the numpy forward must reproduce: both RoPE styles (the
#: embedded SmolLM2 uses the non-traditional one), linear RoPE scaling, qwen2's q/k/v
#: biases, llama's o_proj/MLP biases, and a head_dim that is not hidden / heads.
BASES = {
    "llama-traditional-rope": ("llama", dict(rope_traditional=True)),
    "llama-rope": ("llama", dict(rope_traditional=False)),
    "llama-rope-scaling": (
        "llama",
        dict(rope_traditional=False, rope_scaling={"type": "linear", "factor": 4.0}),
    ),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-head-dim": ("llama", dict(head_dim=24)),
    "qwen2-biases": ("qwen2", dict()),
}


#: The tiny bases' shape, shared by every architecture built here.
TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=4,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=64,
)


def tiny_variant(name: str, seed: int = 0) -> Any:
    """A 4-block tiny base of the named kind, with random (non-zero) biases if it has any."""
    import mlx.nn as nn
    from mlx_lm.models import llama, qwen2

    kind, extra = BASES[name]
    common = dict(model_type=kind, **TINY_SHAPE)
    mx.random.seed(seed)
    module = llama if kind == "llama" else qwen2
    model = module.Model(module.ModelArgs(**{**common, **extra}))  # type: ignore[arg-type]
    biases = [
        (k, mx.random.normal(v.shape) * 0.1)
        for k, v in tree_flatten(model.parameters())
        if k.endswith(".bias") and isinstance(v, mx.array)
    ]
    if biases:  # mlx-lm initialises biases at zero, which would hide a dropped bias
        model.load_weights(biases, strict=False)
    mx.eval(model.parameters())
    assert all(isinstance(m, nn.Module) for m in model.layers)
    return TinyBase(model=model, tokenizer=tiny_tokenizer())


def _model_with_trained_lora(layers: int = 2, base: Any = None) -> tuple[RewardModel, Any]:
    base = base or tiny_base()
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
@pytest.mark.parametrize("variant", sorted(BASES))
def test_numpy_forward_equals_mlx(variant: str, threads: int) -> None:
    model, base = _model_with_trained_lora(base=tiny_variant(variant))
    assert cpu_engine_unsupported(model) is None
    eng = CpuEngine(model, threads=threads)
    assert parity_error(model, eng) < PARITY_TOLERANCE
    groups, _ = encode_examples(marker_pairs(24), base.tokenizer, 64)
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


@pytest.mark.parametrize("variant", sorted(BASES))
def test_zero_lora_reward_model_is_the_head_on_the_base(variant: str) -> None:
    """The load-time self-check passes on every supported variant."""
    base = tiny_variant(variant)
    assert unsupported_architecture(base.model) is None
    assert self_check_error(base.model) < SELF_CHECK_TOLERANCE[False]


def test_qwen3_norms_are_in_the_reward_model_and_keep_scoring_on_mlx() -> None:
    """Qwen3's per-head q/k norms (on the allowlist) are applied by the reward model's own
    forward, both the full and the last-token path, and the numpy engine, which does not
    implement them, is never used for it. The norms' weights are randomised so that one
    dropped or misapplied shows (found by mutation testing: no test built a qwen3)."""
    from mlx_lm.models import qwen3

    mx.random.seed(0)
    args = qwen3.ModelArgs(
        model_type="qwen3",
        **TINY_SHAPE,
        max_position_embeddings=256,
        head_dim=16,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    model = qwen3.Model(args)
    norms = [
        # Scaled up so attention is sharp: near-uniform attention (small random weights)
        # hides a norm missing on the last token's query (an error of 3e-4, under the 1e-3
        # the self-check allows real checkpoints).
        (k, 3.0 * (1.0 + 0.5 * mx.random.normal(v.shape)))
        for k, v in tree_flatten(model.parameters())
        if k.endswith(("q_norm.weight", "k_norm.weight")) and isinstance(v, mx.array)
    ]
    assert len(norms) == 8
    model.load_weights(norms, strict=False)
    mx.eval(model.parameters())
    assert unsupported_architecture(model) is None
    assert self_check_error(model) < 1e-4  # float32 round-off; a skipped norm gives 4e-3
    assert "q/k norms" in (cpu_engine_unsupported(model) or "")
    rm, base = _model_with_trained_lora(base=TinyBase(model=model, tokenizer=tiny_tokenizer()))
    scorer = Scorer(rm, base.tokenizer, 64, cpu_forward=True)
    assert scorer.engine is None
    result = scorer.score("Human: which is better?", ["the first", "a second one here"])
    assert all(math.isfinite(x) for x in result.raw) and result.raw[0] != result.raw[1]


def test_unsupported_bases_are_refused_at_load() -> None:
    """Gemma scales its embeddings outside the blocks: not on the allowlist, and the
    self-check sees the reward model compute another function."""
    from mlx_lm.models import gemma

    mx.random.seed(0)
    shape = {**TINY_SHAPE, "num_hidden_layers": 2}
    args = gemma.ModelArgs(model_type="gemma", **shape, head_dim=16)
    model = gemma.Model(args)
    mx.eval(model.parameters())
    assert "'gemma' is not supported" in (unsupported_architecture(model) or "")
    assert self_check_error(model) > 10 * SELF_CHECK_TOLERANCE[True]
    with pytest.raises(ModelLoadError, match="not supported"):
        _describe(model, tiny_tokenizer(), "test:gemma", "x", False)
    llama = tiny_variant("llama-rope").model
    llama.args.layer_types = ["sliding_attention"] * 4
    assert "sliding-window" in (unsupported_architecture(llama) or "")


def test_an_engine_that_disagrees_with_mlx_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The parity self-check when an engine is first built: a numpy forward that computes
    something else (here: every reward off by 0.1) falls back to MLX, and says so."""
    model, base = _model_with_trained_lora(base=tiny_variant("llama-rope"))
    monkeypatch.setattr(scoring, "_parity", {})
    assert scoring.engine_parity(model) is None  # the real engine agrees
    monkeypatch.setattr(scoring, "_parity", {})
    real = CpuEngine._forward

    def off(self: CpuEngine, *a: Any) -> Any:
        out = real(self, *a)
        return out + 0.1 if isinstance(out, np.ndarray) else out

    monkeypatch.setattr(CpuEngine, "_forward", off)
    if mx.default_device() == mx.cpu:
        with caplog.at_level("WARNING", logger="palate.model"):
            assert not use_cpu_engine(model)
        assert "numpy forward differs from MLX" in caplog.text
        assert Scorer(model, base.tokenizer, 64).engine is None
    reason = scoring.engine_parity(model)
    assert reason is not None and "stay on MLX" in reason


def test_quantized_model_is_reported_unsupported() -> None:
    import mlx.nn as nn

    model, _ = _model_with_trained_lora()
    nn.quantize(model.layers[0], group_size=32, bits=4)
    assert "quantized" in (cpu_engine_unsupported(model) or "")
    with pytest.raises(ValueError, match=r"numpy forward unsupported: .*quantized"):
        CpuEngine(model)  # refused when built, not only when asked
    assert not use_cpu_engine(model)


def test_parity_is_checked_per_base_not_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base the engine gets wrong stays on MLX even after another base passed its check
    (the verdict is kept per base weights and LoRA placement, not shared)."""
    good, _ = _model_with_trained_lora()
    bad, _ = _model_with_trained_lora(base=tiny_variant("llama-rope"))
    monkeypatch.setattr(scoring, "_parity", {})
    monkeypatch.setattr(scoring, "parity_error", lambda m, e: 1.0 if m is bad else 0.0)
    assert scoring.engine_parity(good) is None
    assert scoring.engine_parity(bad) is not None
    assert scoring.engine_parity(good) is None


def test_the_environment_can_turn_the_numpy_forward_off(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _model_with_trained_lora()
    if mx.default_device() != mx.cpu:
        pytest.skip("the numpy forward is for the CPU device only")
    assert use_cpu_engine(model)
    monkeypatch.setenv("PALATE_CPU_FORWARD", "0")
    assert not use_cpu_engine(model)


def test_softmax_is_shifted_so_large_logits_do_not_overflow() -> None:
    from palate.model.cpu_forward import _softmax_

    s = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32)
    p = _softmax_(s.copy())
    e = 1 / (1 + math.exp(-1.0))
    np.testing.assert_allclose(p, [[e, 1 - e, 0.0]], rtol=1e-6, atol=1e-7)


def test_a_failure_in_a_worker_thread_reaches_the_caller() -> None:
    from palate.model.cpu_forward import _shared_workers

    fut = _shared_workers(2).submit(lambda: 1 // 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(timeout=10)
    assert _shared_workers(2).submit(lambda x: x + 1, 41).result(timeout=10) == 42


def _blas_threads() -> int | None:
    import ctypes
    import glob
    import os

    libs = glob.glob(
        os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")
    )
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in (
            "scipy_openblas_get_num_threads64_",
            "openblas_get_num_threads64_",
            "openblas_get_num_threads",
        ):
            getter = getattr(lib, name, None)
            if getter is not None:
                return int(getter())
    return None


def test_an_engine_with_its_own_threads_sets_numpy_blas_to_one_thread() -> None:
    """Shard threads x BLAS threads must not outnumber the cores (docs/model.md)."""
    from palate.model.cpu_forward import set_numpy_blas_threads

    before = _blas_threads()
    if before is None:
        pytest.skip("numpy is not linked against a findable OpenBLAS here")
    try:
        assert set_numpy_blas_threads(2) and _blas_threads() == 2
        model, _ = _model_with_trained_lora()
        CpuEngine(model, threads=2).close()
        assert _blas_threads() == 1
    finally:
        set_numpy_blas_threads(before)


@pytest.mark.slow
def test_embedded_smollm2_numpy_equals_mlx_and_passes_its_self_checks() -> None:
    """The real embedded model (non-traditional RoPE, tied embeddings, GQA): loading it runs
    the zero-LoRA self-check, and the numpy engine matches MLX on real text."""
    from palate.model.base_model import load_base_model

    try:
        base = load_base_model("builtin:smollm2-135m")
    except ModelLoadError as e:
        from conftest import missing

        missing(f"embedded model not installed: {e}")
    assert base.model.layers[0].self_attn.rope.traditional is False
    model, _ = _model_with_trained_lora(layers=2, base=base)
    eng = CpuEngine(model, threads=2)
    assert parity_error(model, eng) < PARITY_TOLERANCE
    groups, _ = encode_examples(marker_pairs(6), base.tokenizer, 96)
    b = collate(groups, list(range(len(groups))))
    ref = np.array(model.forward_groups(*batch_arrays(b)))  # type: ignore[arg-type]
    got = eng.forward_groups(b.prompt, b.prompt_len, b.response, b.response_len, b.group)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
    eng.close()
