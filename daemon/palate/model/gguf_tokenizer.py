"""Build a Hugging Face fast tokenizer from the tokenizer a GGUF file carries in its metadata.

A GGUF file has no ``tokenizer.json``; llama.cpp stores the vocabulary, merges, token types,
special ids, the pre-tokenizer *name* (``tokenizer.ggml.pre``) and the chat template as
metadata. We rebuild the equivalent ``tokenizers`` pipeline so the reward model sees exactly
the token ids the base model was trained on, and wrap it in ``PreTrainedTokenizerFast`` so
``apply_chat_template`` works as it does for any hub model.

The pre-tokenizer matters as much as the merges: with the wrong split regex every number or
contraction tokenizes differently and nothing fails loudly. Unknown pre-tokenizer names are
therefore an error, not a silent GPT-2 fallback.

This module does not import MLX: metadata arrives as plain Python values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["GGUFTokenizerError", "tokenizer_from_gguf_metadata"]

# llama.cpp token types (llama_token_type).
_NORMAL = 1
_CONTROL = 3
_USER_DEFINED = 4
_NO_LIMIT = int(1e30)  # transformers' own "no maximum length" sentinel

# Split regexes of the BPE pre-tokenizers llama.cpp names in ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's byte-level regex, optionally preceded by splitting every digit on its own
# (StarCoder lineage, which SmolLM inherits: llama.cpp's "smollm" is "\p{N}" then GPT-2).
_GPT2_NAMES = frozenset({"default", "gpt2", "gpt-2", "olmo", "poro-chat"})
_DIGITS_THEN_GPT2_NAMES = frozenset(
    {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b", "command-r"}
)
_SPLIT_NAMES: Mapping[str, str] = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class GGUFTokenizerError(ValueError):
    """The GGUF metadata describes a tokenizer this module cannot rebuild faithfully."""


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_NAMES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_NAMES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_NAMES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted(_GPT2_NAMES | _DIGITS_THEN_GPT2_NAMES | set(_SPLIT_NAMES))
    raise GGUFTokenizerError(
        f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: {known}. "
        "Convert the model with mlx_lm.convert and load the directory instead."
    )


def _byte_level_bpe(meta: Mapping[str, Any]) -> Tokenizer:
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    merges_raw: Sequence[str] | None = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise GGUFTokenizerError("byte-level BPE tokenizer without tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFTokenizerError("tokenizer.ggml.tokens contains duplicate tokens")
    merges = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise GGUFTokenizerError(f"malformed merge {merge!r}")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    return tok


def _special_token(meta: Mapping[str, Any], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    if index is None:
        return None
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    if not 0 <= int(index) < len(tokens):
        raise GGUFTokenizerError(f"tokenizer.ggml.{key}={index} is outside the vocabulary")
    return tokens[int(index)]


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` equivalent to the tokenizer described by GGUF metadata.

    ``meta`` maps GGUF keys to plain Python values (lists, str, int, bool). Control tokens
    (type 3, e.g. ``<|im_start|>``) become special added tokens and user-defined ones
    (type 4) plain added tokens, so both are matched whole in text, as llama.cpp does.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFTokenizerError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "convert the model with mlx_lm.convert and load the directory instead."
        )
    tok = _byte_level_bpe(meta)

    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFTokenizerError(f"{len(types)} token types for {len(tokens)} tokens")
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )

    bos = _special_token(meta, "bos_token_id")
    eos = _special_token(meta, "eos_token_id")
    if bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )

    arch = meta.get("general.architecture", "llama")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=_special_token(meta, "unknown_token_id"),
        pad_token=_special_token(meta, "padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get(f"{arch}.context_length", 0)) or _NO_LIMIT,
    )
    return fast
