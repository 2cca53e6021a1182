"""Load llama-family GGUF files (llama.cpp's format) into ``mlx_lm.models.llama``.

``mx.load(path, return_metadata=True)`` reads GGUF natively: Q4_0, Q4_1 and Q8_0 tensors come
back as MLX affine-quantized triples (``name.weight`` packed uint32, ``name.scales``,
``name.biases``, group size 32); every other quantization type is cast to float16; F32/F16
tensors come back as they are. This module

1. builds ``ModelArgs`` from the ``llama.*`` metadata,
2. renames llama.cpp tensors to mlx-lm's (Hugging Face) names,
3. undoes llama.cpp's Q/K row permutation (see :func:`unpermute_rows`), so the result is the
   same model, in the same layout, as mlx-lm would load from the original safetensors,
4. dequantizes to float32 on CPU (MLX's CPU quantized and half-precision matmuls are far slower
   than fp32 BLAS) or keeps the quantized weights (Metal: QLoRA on a small footprint),
5. rebuilds the tokenizer from the metadata (:mod:`palate.model.gguf_tokenizer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from palate.model.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf_metadata  # noqa: E402

__all__ = [
    "GGUFError",
    "GGUFModel",
    "load_gguf",
    "model_args_from_metadata",
    "permute_rows",
    "unpermute_rows",
]

GROUP_SIZE = 32  # every GGUF block type MLX keeps quantized (Q4_0, Q4_1, Q8_0) has 32-wide blocks

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp writes that carry nothing the mlx-lm model needs.
_IGNORED = re.compile(r"^(blk\.\d+\.attn_rot_embd|rope_freqs)\.")
ROPE_FREQS = "rope_freqs.weight"
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias|scales|biases)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|bias|scales|biases)$")


class GGUFError(ValueError):
    """The GGUF file is not a llama-family model this loader can map faithfully."""


@dataclass(frozen=True)
class GGUFModel:
    """A loaded GGUF model: the mlx-lm module, its tokenizer, config and raw metadata."""

    model: llama.Model
    tokenizer: PreTrainedTokenizerFast
    args: llama.ModelArgs
    metadata: dict[str, Any]
    quantized: bool


def _plain(value: Any) -> Any:
    """GGUF metadata from ``mx.load`` holds scalars and arrays as ``mx.array``; unwrap them."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def model_args_from_metadata(meta: dict[str, Any], vocab_size: int, tied: bool) -> llama.ModelArgs:
    """``llama.ModelArgs`` from GGUF metadata (plain values), as convert_hf_to_gguf wrote them."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported (only 'llama'); convert the model "
            "with mlx_lm.convert and load the directory instead"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks llama.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dims = int(key("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
    rope_scaling: dict[str, float | str] | None = None
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise GGUFError(f"RoPE scaling {scaling_type!r} is not supported")

    return llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=int(key("block_count")),
        intermediate_size=int(key("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=vocab_size,
        max_position_embeddings=int(key("context_length", 2048)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_traditional=False,  # the rows are un-permuted to Hugging Face order below
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
    )


def permute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Hugging Face -> llama.cpp row order of a Q or K projection (what convert_hf_to_gguf does).

    Hugging Face's llama rotates the two *halves* of each head (``rotate_half``); llama.cpp
    rotates *adjacent pairs*. The converter reorders each head's rows from
    ``[x0..x(d/2-1), y0..y(d/2-1)]`` to ``[x0, y0, x1, y1, ...]`` so the pairs line up.
    Works on weights, quantization scales/biases and linear biases alike (rows are dim 0).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Inverse of :func:`permute_rows`: llama.cpp -> Hugging Face row order.

    Done at load time instead of switching to ``rope_traditional=True`` so the model is the
    exact mlx-lm llama (same weights, same RoPE kernel) as loading the original checkpoint:
    LoRA adapters and artifacts then mean the same thing whichever file the base came from.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class FactorRoPE(nn.Module):
    """RoPE with per-frequency divisors, as llama.cpp applies ``rope_freqs.weight``.

    Llama 3.1-style GGUF files store their RoPE scaling as this tensor instead of metadata:
    llama.cpp uses ``theta_i = pos * base**(-2i/d) / factor_i``. ``mx.fast.rope`` takes the
    reciprocal frequencies, so ``freqs_i = base**(2i/d) * factor_i`` reproduces it exactly
    (mlx-lm's own ``Llama3RoPE`` computes the same quantity from config values).
    """

    def __init__(self, dims: int, base: float, factors: mx.array) -> None:
        super().__init__()
        self.dims = dims
        exponents = mx.arange(0, dims, 2, dtype=mx.float32) / dims
        self._freqs = (base**exponents) * factors.astype(mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )


def _rename(name: str) -> str | None:
    """mlx-lm parameter name for a llama.cpp tensor name; None for tensors to skip."""
    if _IGNORED.match(name):
        return None
    if m := _BLOCK.match(name):
        layer, stem, kind = m.groups()
        if stem in _PER_BLOCK:
            return f"model.layers.{layer}.{_PER_BLOCK[stem]}.{kind}"
    elif (m := _TOP.match(name)) and m.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise GGUFError(f"unexpected tensor {name!r} in a llama GGUF file")


def _bits(packed: mx.array, scales: mx.array) -> int:
    in_dims = scales.shape[-1] * GROUP_SIZE
    return packed.shape[-1] * 32 // in_dims


def _convert(
    tensors: dict[str, mx.array], args: llama.ModelArgs, keep_quantized: bool, dtype: mx.Dtype
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """Renamed, un-permuted weights (dequantized unless ``keep_quantized``) and the bit width
    of every module left quantized."""
    renamed: dict[str, mx.array] = {}
    for name, value in tensors.items():
        new = _rename(name)
        if new is None:
            continue
        if ".self_attn.q_proj." in new:
            value = unpermute_rows(value, args.num_attention_heads)
        elif ".self_attn.k_proj." in new:
            value = unpermute_rows(value, int(args.num_key_value_heads or args.num_attention_heads))
        renamed[new] = value

    out: dict[str, mx.array] = {}
    quant_bits: dict[str, int] = {}
    for name, value in renamed.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.rsplit(".", 1)[0]
        scales = renamed.get(f"{module}.scales")
        if name.endswith(".weight") and scales is not None:
            biases = renamed[f"{module}.biases"]
            bits = _bits(value, scales)
            if keep_quantized:
                out[name], out[f"{module}.scales"], out[f"{module}.biases"] = value, scales, biases
                quant_bits[module] = bits
                continue
            # Dequantize in float32 (as llama.cpp does): fp16 arithmetic would add rounding.
            value = mx.dequantize(
                value,
                scales.astype(mx.float32),
                biases.astype(mx.float32),
                group_size=GROUP_SIZE,
                bits=bits,
            )
        out[name] = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    return out, quant_bits


def load_gguf(
    path: str | Path, *, keep_quantized: bool = False, dtype: mx.Dtype = mx.float32
) -> GGUFModel:
    """Load a llama-family GGUF file as an ``mlx_lm.models.llama.Model`` plus tokenizer.

    ``keep_quantized`` keeps Q4_0/Q4_1/Q8_0 weights packed (``QuantizedLinear`` /
    ``QuantizedEmbedding``, for Metal); otherwise everything is dequantized to ``dtype``.
    Raises :class:`GGUFError` (or ``OSError`` for unreadable files) with the reason.
    """
    loaded = mx.load(str(path), return_metadata=True)
    if not isinstance(loaded, tuple):  # pragma: no cover - mx.load contract
        raise GGUFError(f"{path}: mx.load returned no metadata")
    tensors, raw_meta = loaded
    meta = {k: _plain(v) for k, v in raw_meta.items()}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight; not a llama GGUF file")
    args = model_args_from_metadata(
        meta,
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        tied="output.weight" not in tensors,
    )
    weights, quant_bits = _convert(tensors, args, keep_quantized, dtype)

    model = llama.Model(args)
    if quant_bits:
        nn.quantize(
            model,
            group_size=GROUP_SIZE,
            class_predicate=lambda p, m: (
                {"group_size": GROUP_SIZE, "bits": quant_bits[p], "mode": "affine"}
                if p in quant_bits
                else False
            ),
        )
    if ROPE_FREQS in tensors:
        factors = tensors[ROPE_FREQS]
        head_dim = int(args.head_dim or args.hidden_size // args.num_attention_heads)
        if factors.shape != (head_dim // 2,):
            raise GGUFError(
                f"{path}: {ROPE_FREQS} has shape {factors.shape}, expected ({head_dim // 2},)"
            )
        for layer in model.layers:
            layer.self_attn.rope = FactorRoPE(head_dim, float(args.rope_theta), factors)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())

    try:
        tokenizer = tokenizer_from_gguf_metadata(meta)
    except (GGUFTokenizerError, KeyError) as exc:
        raise GGUFError(f"{path}: cannot rebuild the tokenizer: {exc}") from exc
    return GGUFModel(model, tokenizer, args, meta, quantized=bool(quant_bits))
