"""The policy: the base language model, optionally with a trained LoRA adapter on its top
blocks, and the log-probabilities DPO and the evaluation need.

A policy adapter is the reward model's sibling: the same frozen base, LoRA (attached by
``palate.model.reward_model``, the one module that touches ``mlx_lm.tuner``) on the top K
blocks, no head; the LM head of the base stays. It is stored as a self-describing artifact in
the reward model's container (``palate.model.artifacts``: safetensors bytes with the config
in the header) under its own format name, so a reward model can never be loaded as a policy
or the other way round.

Log-probabilities are taken over *response* tokens only (the prompt is masked, as TRL's
``completion_mask``), and the LM head runs only at those positions: with a 49k vocabulary
the head costs more per token than a block, and the prompt is most of each sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from palate.model import artifacts  # noqa: E402
from palate.model.reward_model import (  # noqa: E402
    LoraConfig,
    Messages,
    _clone,
    _lora_blocks,
    encode_prompt_responses,
    truncate_group,
)

__all__ = [
    "POLICY_FORMAT",
    "Policy",
    "Rows",
    "base_policy",
    "encode_rows",
    "lm_with_lora",
    "load_policy",
    "policy_artifact",
    "response_logprobs",
]

POLICY_FORMAT = "palate-policy/1"


def lm_with_lora(lm: nn.Module, config: LoraConfig) -> nn.Module:
    """A copy of the mlx-lm language model ``lm`` whose top ``config.layers`` blocks carry LoRA.

    The copy shares every array with ``lm`` (left untouched, and frozen), so a policy adapter
    and reward models sit on one loaded base. LoRA's B starts at zero, so until trained the
    copy computes exactly what ``lm`` does: the base *is* the DPO reference.
    """
    inner = lm.model
    n = len(inner.layers)
    if not 0 < config.layers <= n:
        raise ValueError(f"lora layers must be in 1..{n}, got {config.layers}")
    lm.freeze()
    top = n - config.layers
    new_inner = _clone(inner)
    new_inner.layers = list(inner.layers[:top]) + _lora_blocks(list(inner.layers[top:]), config)
    out = _clone(lm)
    out.model = new_inner
    return out


def trainable_state(lm: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(lm.trainable_parameters()))


@dataclass
class Policy:
    """A model to sample from and what it is: ``name`` is ``base`` or the adapter's label."""

    lm: nn.Module
    tokenizer: Any
    base: Any  # palate.model.base_model.BaseModel (or a test double)
    name: str = "base"
    config: dict[str, Any] = field(default_factory=dict)  # the adapter's artifact config
    version: int | None = None  # registry version, when it came from the store

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "base_model": self.base.model_id}


def base_policy(base: Any) -> Policy:
    return Policy(lm=base.model, tokenizer=base.tokenizer, base=base)


def policy_artifact(
    lm: nn.Module, base: Any, lora: LoraConfig, **sections: dict[str, Any]
) -> artifacts.ModelArtifact:
    """The adapter's LoRA tensors and a config naming its base (id, hashes) and LoRA shape;
    ``sections`` (train_config, metrics, training_data...) are stored as given."""
    config = {
        "format": POLICY_FORMAT,
        "base_model": {
            "id": base.model_id,
            "content_hash": base.content_hash,
            "tokenizer_hash": base.tokenizer_hash,
            "num_layers": int(base.num_layers),
        },
        "lora": lora.to_json(),
        **sections,
    }
    tensors = {k: np.array(v, dtype=np.float32) for k, v in trainable_state(lm).items()}
    return artifacts.ModelArtifact(tensors=tensors, config=config)


def load_policy(
    art: artifacts.ModelArtifact, base: Any, *, name: str = "adapter", version: int | None = None
) -> Policy:
    """Rebuild a policy on ``base``; a different base, or tensors that do not fit, are refused
    with every problem named (as reward-model artifacts are)."""
    cfg = art.config
    want = cfg["base_model"]
    problems = [
        f"{key}: adapter has {want.get(key)!r}, base has {getattr(base, key)!r}"
        for key in ("content_hash", "tokenizer_hash")
        if want.get(key) != getattr(base, key)
    ]
    if problems:
        raise artifacts.ArtifactError(
            f"the policy adapter was trained on a different base than {base.model_id!r}: "
            + "; ".join(problems),
            problems=problems,
        )
    lm = lm_with_lora(base.model, LoraConfig.from_json(cfg["lora"]))
    expected = {k: tuple(v.shape) for k, v in trainable_state(lm).items()}
    got = {k: tuple(v.shape) for k, v in art.tensors.items()}
    issues = [f"missing tensor {k}" for k in sorted(expected.keys() - got.keys())]
    issues += [f"unexpected tensor {k}" for k in sorted(got.keys() - expected.keys())]
    issues += [
        f"shape mismatch {k}: adapter {got[k]}, model {expected[k]}"
        for k in sorted(expected.keys() & got.keys())
        if expected[k] != got[k]
    ]
    if issues:
        raise artifacts.ArtifactError(
            f"the policy adapter does not fit its model ({len(issues)} problems): "
            + "; ".join(issues[:8]),
            problems=issues,
        )
    lm.update(tree_unflatten([(k, mx.array(v)) for k, v in art.tensors.items()]))
    mx.eval(lm.parameters())
    return Policy(
        lm=lm, tokenizer=base.tokenizer, base=base, name=name, config=cfg, version=version
    )


# ---------------------------------------------------------------------------- log-probs


@dataclass
class Rows:
    """Prompt+response sequences, right-padded: the unit DPO and the evaluation score."""

    tokens: np.ndarray  # (S, L) int32
    prompt_len: np.ndarray  # (S,) tokens of prompt (the response starts here)
    length: np.ndarray  # (S,) prompt + response tokens
    truncated: int = 0  # sequences whose prompt or response was cut

    @property
    def response_len(self) -> np.ndarray:
        return self.length - self.prompt_len

    def take(self, idx: Sequence[int]) -> Rows:
        i = np.asarray(idx, dtype=np.int64)
        width = int(self.length[i].max())
        return Rows(self.tokens[i, :width], self.prompt_len[i], self.length[i])


def encode_rows(
    tokenizer: Any,
    items: Sequence[tuple[str | Messages, Sequence[str]]],
    max_tokens: int,
) -> Rows:
    """Rows for (prompt, responses) items, in order: every response of an item after its
    prompt, which is cut from the left (once per item) to fit ``max_tokens``."""
    seqs: list[list[int]] = []
    plens: list[int] = []
    cut = 0
    for prompt, responses in items:
        p_ids, r_ids = encode_prompt_responses(tokenizer, prompt, list(responses))
        p, rs, trunc = truncate_group(p_ids, r_ids, max_tokens)
        cut += len(rs) if trunc.truncated else 0
        for r in rs:
            seqs.append(p + r)
            plens.append(len(p))
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return Rows(
        tokens, np.asarray(plens, np.int32), np.asarray([len(s) for s in seqs], np.int32), cut
    )


def hidden(
    lm: nn.Module,
    tokens: mx.array,
    start: int = 0,
    end: int | None = None,
    h: mx.array | None = None,
) -> mx.array:
    """Run blocks ``[start, end)`` of ``lm`` (all: through the final norm) over full
    sequences; ``h`` is the input to block ``start`` when it is not 0."""
    inner = lm.model
    n = len(inner.layers)
    end = n if end is None else end
    x = inner.embed_tokens(tokens) if start == 0 else h  # (S, L, D)
    assert x is not None, "start > 0 needs the hidden states h"
    for layer in inner.layers[start:end]:
        x = layer(x, "causal")
    return inner.norm(x) if end == n else x


def head(lm: nn.Module, h: mx.array) -> mx.array:
    """The LM head (tied or not), as mlx-lm's llama-family models apply it."""
    args = getattr(lm, "args", None)
    if getattr(args, "tie_word_embeddings", False) or not hasattr(lm, "lm_head"):
        return lm.model.embed_tokens.as_linear(h)
    return lm.lm_head(h)


def response_positions(rows: Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions (S, R), targets (S, R), mask (S, R)): hidden state t predicts token t+1,
    so response token j of row s is read from position prompt_len + j - 1."""
    rl = rows.response_len
    R = int(rl.max())
    j = np.arange(R)[None, :]
    mask = j < rl[:, None]
    pos = np.minimum(rows.prompt_len[:, None] - 1 + j, rows.length[:, None] - 2)
    pos = np.maximum(pos, 0)
    tgt = np.take_along_axis(rows.tokens, np.minimum(pos + 1, rows.tokens.shape[1] - 1), axis=1)
    return pos.astype(np.int32), tgt.astype(np.int32), mask


def response_logprobs(
    lm: nn.Module,
    rows: Rows,
    *,
    start: int = 0,
    h: mx.array | None = None,
    full: bool = False,
) -> tuple[mx.array, mx.array] | tuple[mx.array, mx.array, mx.array]:
    """Summed log p(response | prompt) per row (S,) and the response lengths (S,).

    ``start``/``h`` resume from a cached frozen prefix. With ``full``, also the per-position
    log-distributions (S, R, V) (for KL), masked rows filled with zeros.
    """
    out = hidden(lm, mx.array(rows.tokens), start=start, h=h)  # (S, L, D)
    pos, tgt, mask = response_positions(rows)
    sel = mx.take_along_axis(out, mx.array(pos)[..., None], axis=1)  # (S, R, D)
    logits = head(lm, sel).astype(mx.float32)  # (S, R, V)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tok = mx.take_along_axis(logp, mx.array(tgt)[..., None], axis=-1)[..., 0]  # (S, R)
    m = mx.array(mask.astype(np.float32))
    total = (tok * m).sum(axis=1)  # (S,)
    n = m.sum(axis=1)
    if full:
        return total, n, logp
    return total, n
