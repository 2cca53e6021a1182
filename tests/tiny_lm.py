"""A tiny random llama and a word-level chat tokenizer for fast model tests.

Tests of the reward model must not depend on the embedded 135M model (slow to load and to
run), so they build this instead: 4 blocks, 64 dims, a 64-word vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from palate.model.batching import PairExample

WORDS = [f"w{i}" for i in range(48)]
MARKER = "zz"
SPECIAL = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate([*SPECIAL, "user", "assistant", "system", MARKER, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = TEMPLATE
    return fast


@dataclass
class TinyBase:
    """Quacks like palate.model.base_model.BaseModel for the fields the model code uses."""

    model: Any
    tokenizer: Any
    model_id: str = "test:tiny-llama"
    content_hash: str = "tiny"
    tokenizer_hash: str = "tiny-tok"
    hidden_size: int = 64
    num_layers: int = 4
    reward_depth: int = 0


def tiny_base(seed: int = 0, layers: int = 4) -> TinyBase:
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    args = ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=64,
        rope_traditional=True,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return TinyBase(model=model, tokenizer=tiny_tokenizer(), num_layers=layers)


def marker_pairs(n: int, seed: int = 0) -> list[PairExample]:
    """Pairs where the chosen response contains the marker word and the rejected does not."""
    rnd = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(k))

    out = []
    for _ in range(n):
        prompt = f"Human: {words(rnd.randint(3, 12))}\n\nAssistant: {words(3)}\n\nHuman: {words(4)}"
        a = words(rnd.randint(2, 10)).split()
        b = words(rnd.randint(2, 10))
        a.insert(rnd.randint(0, len(a)), MARKER)
        out.append(PairExample(prompt=prompt, chosen=" ".join(a), rejected=b))
    return out


def save_tiny_model_dir(path: Any, seed: int = 0) -> str:
    """Write the tiny llama as an mlx-lm model directory (config, weights, tokenizer), so
    the CLI can load it by path like any real base model."""
    import json
    from pathlib import Path

    import mlx.core as mx
    from mlx.utils import tree_flatten

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    base = tiny_base(seed)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(base.model.parameters())))
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 64,
        "rope_traditional": True,
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config))
    base.tokenizer.save_pretrained(str(out))
    return str(out)
