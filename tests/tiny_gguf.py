"""A tiny random llama written as a llama.cpp-style GGUF file, with tokenizer metadata.

Shared by the base-model tests (which check the loader reproduces the in-memory model) and
the end-to-end training tests (which need a real, loadable base model that trains in seconds):
byte-level BPE over all 256 bytes, so any text tokenizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights
from mlx_lm.models import llama
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_CHARS = list(bytes_to_unicode().values())
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIALS + BYTE_CHARS + ["Ġt", "he", "Ġthe"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_args(tied: bool = True, **extra: Any) -> llama.ModelArgs:
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=len(TOKENS),
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        **extra,
    )


def tiny_model(args: llama.ModelArgs, seed: int = 0) -> llama.Model:
    """Random weights everywhere, norms included, so any swapped tensor changes the logits."""
    mx.random.seed(seed)
    model = llama.Model(args)
    params = tree_flatten(model.parameters())
    assert isinstance(params, list)
    model.load_weights(
        [
            (name, mx.random.normal(p.shape) * (0.5 if p.ndim == 1 else 0.2) + (p.ndim == 1))
            for name, p in params
        ]
    )
    mx.eval(model.parameters())
    return model


def gguf_name(hf: str) -> str:
    module, kind = hf.rsplit(".", 1)
    if module in GGUF_NAMES:
        return f"{GGUF_NAMES[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.{kind}"


def tokenizer_metadata(pre: str = "smollm") -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": mx.array([3] * 3 + [1] * (len(TOKENS) - 3), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def write_gguf(
    path: Path,
    model: llama.Model,
    args: llama.ModelArgs,
    *,
    permute: bool = True,
    arch: str = "llama",
    extra_tensors: dict[str, mx.array] | None = None,
    meta_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as llama.cpp's convert_hf_to_gguf would (fp32 tensors)."""
    u32 = mx.uint32
    head_dim = args.hidden_size // args.num_attention_heads
    tensors: dict[str, mx.array] = {}
    params = tree_flatten(model.parameters())
    assert isinstance(params, list)
    for name, value in params:
        if permute and name.endswith("self_attn.q_proj.weight"):
            value = permute_weights(value, args.num_attention_heads, args.num_attention_heads)
        elif permute and name.endswith("self_attn.k_proj.weight"):
            value = permute_weights(value, args.num_attention_heads, args.num_key_value_heads)
        tensors[gguf_name(name)] = value
    tensors.update(extra_tensors or {})
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": "tiny",
        "llama.block_count": mx.array(args.num_hidden_layers, dtype=u32),
        "llama.embedding_length": mx.array(args.hidden_size, dtype=u32),
        "llama.feed_forward_length": mx.array(args.intermediate_size, dtype=u32),
        "llama.attention.head_count": mx.array(args.num_attention_heads, dtype=u32),
        "llama.attention.head_count_kv": mx.array(args.num_key_value_heads, dtype=u32),
        "llama.rope.freq_base": mx.array(args.rope_theta, dtype=mx.float32),
        "llama.rope.dimension_count": mx.array(head_dim, dtype=u32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(args.rms_norm_eps, dtype=mx.float32),
        "llama.context_length": mx.array(args.max_position_embeddings, dtype=u32),
        "llama.vocab_size": mx.array(args.vocab_size, dtype=u32),
        **tokenizer_metadata(),
        **(meta_overrides or {}),
    }
    mx.save_gguf(str(path), tensors, meta)
    return path
