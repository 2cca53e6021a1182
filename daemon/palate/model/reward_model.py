"""The reward model: a frozen base LM, LoRA on its top K blocks, and a scalar head.

Everything about *what* the model computes lives here: how a (prompt, response) becomes
tokens (the base model's chat template; truncation that keeps the template's header and
generation prompt, the text nearest the response, or for an editor prompt the code nearest
the cursor; a cut response keeps its end-of-turn token), how LoRA is
attached (the only module that touches ``mlx_lm.tuner``, which is not public API), and the
forward pass.

The forward pass is *prompt-grouped*: a batch holds G prompts and S >= G responses, each
response pointing at its prompt. Every prompt runs through a block once and its keys/values
are shared by all of its responses (a pair's chosen and rejected, a best-of-N request's
candidates). In HH-style data the prompt is ~60% of each sequence, so this removes ~40% of
the work of the naive "prompt+response per row" batch, and it is exact: with causal
attention a response sees the same keys/values it would see in one long sequence. A
reference path (:meth:`RewardModel.reference_rewards`) runs mlx-lm's own blocks over the
concatenated sequences, and the tests hold the two together.

The final block only needs the output at each response's last real token (the head reads
nothing else), so it computes keys/values for every position but queries, attention output
and MLP for one token per response.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

try:  # The parallel engineer's module; before it exists, MLX falls back to its own BLAS.
    from palate.model.blas import ensure_fast_blas

    ensure_fast_blas()
except ImportError:  # pragma: no cover - only while the tree is being assembled
    pass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from palate.events import CODE_CURSOR

__all__ = [
    "LoraConfig",
    "Messages",
    "PromptIds",
    "RewardModel",
    "Truncation",
    "configure_cpu_threads",
    "encode_prompt_responses",
    "parse_turns",
    "truncate_group",
]

Messages = list[dict[str, str]]

#: Linear layers of a llama-family block that get LoRA by default: all of them. Attention-only
#: LoRA learns markedly less for reward modelling at this size; the MLP is where features live.
DEFAULT_LORA_KEYS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class LoraConfig:
    """Where and how big the LoRA adapters are.

    ``alpha`` follows the PEFT convention (the update is scaled by ``alpha / rank``); mlx-lm
    calls that product ``scale``. ``layers`` counts blocks from the top; 0 trains the head only.
    ``depth`` keeps only the base's first ``depth`` blocks (0: all): the reward is read from
    that block's output, and the blocks above it are never run (cheaper, see docs/model.md).
    """

    rank: int = 8
    alpha: float = 16.0
    layers: int = 4
    dropout: float = 0.0
    keys: tuple[str, ...] = DEFAULT_LORA_KEYS
    depth: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"] = list(self.keys)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            layers=int(d["layers"]),
            dropout=float(d.get("dropout", 0.0)),
            keys=tuple(d.get("keys", DEFAULT_LORA_KEYS)),
            depth=int(d.get("depth", 0)),  # absent in artifacts before it existed: all blocks
        )


def lora_for_base(lora: LoraConfig, base: Any) -> LoraConfig:
    """``lora`` with its depth resolved on ``base``: an unset depth (0) takes the base's
    ``reward_depth`` (the embedded model ships one, chosen on validation data), when the
    LoRA blocks fit below it; everything that builds a reward model from a config (training,
    federated clients) resolves it here, so the same config gives the same shapes."""
    depth = int(getattr(base, "reward_depth", 0) or 0)
    if lora.depth or not depth or lora.layers >= depth:
        return lora
    return replace(lora, depth=depth)


def configure_cpu_threads(n_streams: int) -> None:
    """Give each MLX CPU stream one BLAS thread when several streams run in parallel.

    MLX's CPU element-wise kernels (exp in softmax and SiLU dominate this model) run on the
    stream's single thread, so one stream leaves a core idle for about half of each block.
    Two streams, each with a single-threaded BLAS, keep both cores busy (measured ~1.6x on a
    2-core machine). With one stream, BLAS keeps its own threads. A no-op without OpenBLAS.
    """
    if n_streams <= 1:
        return
    for name in ("libopenblas.so.0", "libopenblasp.so.0", "libopenblas.so"):
        try:
            lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except (OSError, AttributeError):
            continue
        setter = getattr(lib, "openblas_set_num_threads", None)
        if setter is not None:
            setter(1)
        return


# ---------------------------------------------------------------------------- formatting

_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_turns(prompt: str | Messages) -> Messages:
    """Turn a prompt into chat messages.

    HH-style transcripts ("Human: ...\\n\\nAssistant: ...") become alternating user/assistant
    turns; anything else is a single user turn. A trailing empty "Assistant:" is dropped (the
    template adds the generation prompt itself) and consecutive turns of one role are merged,
    because most chat templates reject two user turns in a row.
    """
    if not isinstance(prompt, str):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    if not prompt.lstrip().startswith(("Human:", "Assistant:")):
        return [{"role": "user", "content": prompt.strip()}]
    parts = _HH_MARKER.split(prompt.lstrip())
    turns: Messages = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=False):
        role = "user" if speaker == "Human" else "assistant"
        content = text.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns or [{"role": "user", "content": ""}]


def _render(tokenizer: Any, messages: Messages, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(text)
    # No template: a plain, stable transcript format (documented in docs/model.md).
    body = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)
    return body + ("assistant: " if generation_prompt else "")


class PromptIds(list[int]):
    """A prompt's token ids and the parts truncation must keep.

    ``head``: the template's tokens before the first message's text (the chat header, a
    default system prompt); ``tail``: those after the last message's text (end of turn and
    the generation prompt). Without them the model reads a prompt whose chat markup is cut
    off, unlike anything it was trained on. ``cursor``/``cursor_len``: where the editor
    cursor marker's tokens are (-1: not an editor prompt).
    """

    head: int = 0
    tail: int = 0
    cursor: int = -1
    cursor_len: int = 0


#: Stands in for each message's text to find where the template puts it (no whitespace, so
#: a template that trims its contents leaves it whole).
_SENTINEL = "\x00palate-message-{}\x00"


def _frame(tokenizer: Any, messages: Messages, prompt_text: str) -> tuple[str, str] | None:
    """The template text before the first message and after the last, or None if unknown."""
    marked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = _render(tokenizer, marked, generation_prompt=True)
    except Exception:  # a template that refuses the marked copy: no frame, plain left cut
        return None
    first, last = _SENTINEL.format(0), _SENTINEL.format(len(messages) - 1)
    if first not in rendered or last not in rendered:
        return None
    head = rendered[: rendered.index(first)]
    tail = rendered[rendered.rindex(last) + len(last) :]
    ok = prompt_text.startswith(head) and prompt_text.endswith(tail)
    return (head, tail) if ok and len(head) + len(tail) <= len(prompt_text) else None


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def encode_prompt(tokenizer: Any, prompt: str | Messages) -> PromptIds:
    """The prompt's ids with its generation prompt, marked for :func:`truncate_group`.

    Header, body and tail are tokenized separately (and an editor prompt's body again at the
    cursor marker), so every part's tokens are known exactly; the join is at template markup
    or at the marker, where BPE merges rarely cross anyway.
    """
    messages = parse_turns(prompt)
    text = _render(tokenizer, messages, generation_prompt=True)
    frame = _frame(tokenizer, messages, text) if messages else None
    if frame is None:
        return PromptIds(_encode(tokenizer, text))
    head_text, tail_text = frame
    body = text[len(head_text) : len(text) - len(tail_text)]
    head, tail = _encode(tokenizer, head_text), _encode(tokenizer, tail_text)
    if CODE_CURSOR in body:
        before, after = body.split(CODE_CURSOR, 1)
        b, c, a = (_encode(tokenizer, t) for t in (before, CODE_CURSOR, after))
        out = PromptIds([*head, *b, *c, *a, *tail])
        out.cursor, out.cursor_len = len(head) + len(b), len(c)
    else:
        out = PromptIds([*head, *_encode(tokenizer, body), *tail])
    out.head, out.tail = len(head), len(tail)
    return out


def encode_prompt_responses(
    tokenizer: Any, prompt: str | Messages, responses: Sequence[str]
) -> tuple[PromptIds, list[list[int]]]:
    """Token ids of the prompt (with the generation prompt) and of each response turn.

    The two parts are tokenized separately so that every response of one prompt shares the
    prompt's ids exactly (the forward pass computes the prompt once). A response's ids are
    what the template appends for that assistant turn, with trailing whitespace removed so
    the last token (where the head reads) is the end-of-turn token, not a newline.
    """
    messages = parse_turns(prompt)
    prompt_text = _render(tokenizer, messages, generation_prompt=True)
    prompt_ids = encode_prompt(tokenizer, prompt)
    out: list[list[int]] = []
    for response in responses:
        full = _render(tokenizer, [*messages, {"role": "assistant", "content": response}], False)
        if full.startswith(prompt_text):
            suffix = full[len(prompt_text) :].rstrip()
        else:  # a template that renders history differently once answered
            eos = getattr(tokenizer, "eos_token", None) or ""
            suffix = response + eos
        ids = list(tokenizer.encode(suffix, add_special_tokens=False))
        if not ids:  # an empty response still needs one position for the head to read
            ids = [int(tokenizer.eos_token_id or 0)]
        out.append(ids)
    return prompt_ids, out


@dataclass(frozen=True)
class Truncation:
    """What truncation did to one group (a prompt and its responses)."""

    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_tokens_cut or self.response_tokens_cut)


def truncate_group(
    prompt_ids: Sequence[int], responses: Sequence[Sequence[int]], max_tokens: int
) -> tuple[list[int], list[list[int]], Truncation]:
    """Fit prompt + each response into ``max_tokens``.

    The prompt is cut once for the whole group (by the longest response) so its responses
    still share it, by :func:`cut_prompt`. A response longer than 3/4 of the budget keeps its
    head and its last token (the end-of-turn token, where the head reads the score) and loses
    the rest, so at least a quarter of the budget (or the whole prompt) stays for the context.
    """
    if max_tokens < 4:
        raise ValueError(f"max_tokens must be >= 4, got {max_tokens}")
    keep_prompt = min(len(prompt_ids), max_tokens // 4)
    cap = max_tokens - keep_prompt
    cut_resp = sum(max(0, len(r) - cap) for r in responses)
    kept = [list(r) if len(r) <= cap else [*r[: cap - 1], r[-1]] for r in responses]
    budget = max_tokens - max(len(r) for r in kept)
    prompt = cut_prompt(prompt_ids, budget)
    return prompt, kept, Truncation(len(prompt_ids) - len(prompt), cut_resp)


def cut_prompt(ids: Sequence[int], budget: int) -> list[int]:
    """At most ``budget`` of a prompt's ids, keeping what matters most for the response.

    The template's header and tail always stay (:class:`PromptIds`); of the text between,
    an editor prompt keeps the code nearest the cursor (the end of the prefix, with up to a
    quarter of the room for the code after the cursor, more when the prefix is short), any
    other prompt its end (the latest turns, nearest the response). Plain id lists, or a
    budget too small for header and tail, are cut from the left.
    """
    if len(ids) <= budget:
        return list(ids)
    head, tail = getattr(ids, "head", 0), getattr(ids, "tail", 0)
    cursor, clen = getattr(ids, "cursor", -1), getattr(ids, "cursor_len", 0)
    room = budget - head - tail
    if room < 1 or (cursor >= 0 and room <= clen):
        return list(ids[len(ids) - budget :]) if budget > 0 else []
    body = list(ids[head : len(ids) - tail])
    if cursor < 0:
        kept = body[len(body) - room :]
    else:
        at = cursor - head
        before, marker, after = body[:at], body[at : at + clen], body[at + clen :]
        left = room - clen
        n_after = min(len(after), max(left // 4, left - len(before)))
        n_before = min(len(before), left - n_after)
        kept = [*before[len(before) - n_before :], *marker, *after[:n_after]]
    return [*ids[:head], *kept, *ids[len(ids) - tail :]]


# ---------------------------------------------------------------------------- the model


def _clone(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s arrays and children (copy-free)."""
    c = module.__class__.__new__(module.__class__)
    dict.update(c, module)
    c.__dict__.update(module.__dict__)
    c._no_grad = set(module._no_grad)
    return c


class _Blocks(nn.Module):
    """Holder with a ``layers`` list, the shape ``linear_to_lora_layers`` expects."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = layers


def _lora_blocks(blocks: list[nn.Module], config: LoraConfig) -> list[nn.Module]:
    """Copies of ``blocks`` with mlx-lm LoRA layers; the originals stay untouched.

    Each block and its attention/MLP containers are cloned (arrays shared), so one loaded
    base can carry any number of reward models (the daemon hot-swaps them on one base).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    clones = []
    for block in blocks:
        c = _clone(block)
        for name, child in list(c.items()):
            if isinstance(child, nn.Module):
                c[name] = _clone(child)
        c.freeze()
        clones.append(c)
    holder = _Blocks(clones)
    params = {
        "rank": config.rank,
        "scale": config.scale,
        "dropout": config.dropout,
        "keys": list(config.keys),
    }
    linear_to_lora_layers(holder, len(clones), params)
    return list(holder.layers)


def _qkv(attn: Any, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Project, (optionally) norm and rotate queries/keys/values as the mlx-lm block does."""
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)  # (B, L, H, hd)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)  # (B, L, Hkv, hd)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1)
    if hasattr(attn, "q_norm"):  # qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, hd)
    return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v


def _mlp_residual(layer: Any, h: mx.array) -> mx.array:
    return h + layer.mlp(layer.post_attention_layernorm(h))


class RewardModel(nn.Module):
    """Frozen base + LoRA on the top ``lora.layers`` blocks + ``Linear(hidden, 1)`` head.

    Only the backbone of the base is kept (no LM head). Trainable parameters are the LoRA
    matrices and the head; everything else is frozen.
    """

    def __init__(
        self, base_lm: nn.Module, lora: LoraConfig, seed: int = 0, members: int = 1
    ) -> None:
        super().__init__()
        backbone = base_lm.model
        n_all = len(backbone.layers)
        if not 0 <= lora.depth <= n_all:
            raise ValueError(f"depth {lora.depth}: the base has {n_all} blocks")
        n_layers = lora.depth or n_all
        if lora.layers > n_layers:
            raise ValueError(f"lora layers {lora.layers} > model blocks {n_layers}")
        attn = backbone.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads"):
            if not hasattr(attn, name):
                raise ValueError(
                    f"unsupported architecture: attention has no {name!r} "
                    "(llama, mistral, qwen2 and qwen3 style blocks are supported)"
                )
        mx.random.seed(seed)  # LoRA A and the head are random: same seed, same model
        top = n_layers - lora.layers
        self.embed_tokens = backbone.embed_tokens
        self.norm = backbone.norm
        self.embed_tokens.freeze()
        self.norm.freeze()
        lower = list(backbone.layers[:top])
        for block in lower:
            block.freeze()
        self.layers = lower + _lora_blocks(list(backbone.layers[top:n_layers]), lora)
        self.lora = lora
        # The final norm's weight, not the embedding's: a quantized embedding (Metal keeps
        # the GGUF packed) stores D * bits / 32 columns, and the head would be too narrow.
        hidden = int(self.norm.weight.shape[-1])
        # One output per ensemble member (model/ensemble.py); each row its own random init.
        self.members = members
        self.head = nn.Linear(hidden, members)
        # Small init (as OpenRLHF): scores start near 0, yet gradients reach the LoRA weights.
        self.head.weight = mx.random.normal((members, hidden)) * (1.0 / (hidden + 1))
        self.head.bias = mx.zeros((members,))
        self.hidden_size = hidden
        self.num_layers = n_layers
        #: Blocks below this index are frozen and can be cached (see training.py). The last
        #: block always stays above the split: it runs in its cheap pooled-positions form.
        self.split = min(n_layers - lora.layers, n_layers - 1)

    # -- pieces -------------------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        return self.embed_tokens(tokens)  # (B, L, D)

    def _head(self, h_last: mx.array) -> mx.array:
        out = self.head(self.norm(h_last))  # (S, K)
        return out[..., 0] if self.members == 1 else out  # (S,) for one member

    def forward_groups(
        self,
        prompt: mx.array,
        prompt_len: mx.array,
        response: mx.array,
        response_len: mx.array,
        group: mx.array,
        start: int = 0,
        end: int | None = None,
    ) -> tuple[mx.array, mx.array] | mx.array:
        """Run blocks ``[start, end)`` over a prompt-grouped batch.

        ``prompt``: token ids (G, Lp) when ``start == 0``, else hidden states (G, Lp, D);
        ``response`` likewise (S, Lr[, D]); both right-padded. ``group`` (S,) maps each
        response to its prompt row. Returns the hidden states ``(hp, hr)`` after block
        ``end - 1``, or, when ``end`` is the last block, the rewards (S,).
        """
        end = self.num_layers if end is None else end
        hp, hr = prompt, response
        if start == 0:
            hp, hr = self.embed(prompt), self.embed(response)  # (G, Lp, D), (S, Lr, D)
        hp = hp.astype(mx.float32) if hp.dtype != mx.float32 else hp
        hr = hr.astype(mx.float32) if hr.dtype != mx.float32 else hr
        lp = prompt_len[group]  # (S,) prompt length of each response's prompt
        Lp, Lr = hp.shape[1], hr.shape[1]
        # Response queries see their prompt's real tokens and, causally, their own tokens.
        cols = mx.arange(Lp + Lr)
        rows = mx.arange(Lr)
        mask = mx.where(
            cols[None, :] < Lp,
            cols[None, None, :] < lp[:, None, None],
            (cols[None, :] - Lp) <= rows[:, None],
        )[:, None]  # (S, 1, Lr, Lp+Lr)
        for i in range(start, end):
            layer = self.layers[i]
            if i == self.num_layers - 1:
                return self._last_block(layer, hp, hr, lp, response_len, group, mask)
            hp, hr = self._block(layer, hp, hr, lp, group, mask)
        return hp, hr

    def _block(
        self, layer: Any, hp: mx.array, hr: mx.array, lp: mx.array, group: mx.array, mask: mx.array
    ) -> tuple[mx.array, mx.array]:
        attn = layer.self_attn
        qp, kp, vp = _qkv(attn, layer.input_layernorm(hp), 0)  # (G, H, Lp, hd)
        qr, kr, vr = _qkv(attn, layer.input_layernorm(hr), lp)  # (S, H, Lr, hd)
        keys = mx.concatenate([kp[group], kr], axis=2)  # (S, Hkv, Lp+Lr, hd)
        values = mx.concatenate([vp[group], vr], axis=2)
        op = mx.fast.scaled_dot_product_attention(qp, kp, vp, scale=attn.scale, mask="causal")
        orr = mx.fast.scaled_dot_product_attention(qr, keys, values, scale=attn.scale, mask=mask)
        G, _, Lp, _ = qp.shape
        S, _, Lr, _ = qr.shape
        hp = hp + attn.o_proj(op.transpose(0, 2, 1, 3).reshape(G, Lp, -1))  # (G, Lp, D)
        hr = hr + attn.o_proj(orr.transpose(0, 2, 1, 3).reshape(S, Lr, -1))  # (S, Lr, D)
        return _mlp_residual(layer, hp), _mlp_residual(layer, hr)

    def _last_block(
        self,
        layer: Any,
        hp: mx.array,
        hr: mx.array,
        lp: mx.array,
        response_len: mx.array,
        group: mx.array,
        mask: mx.array,
    ) -> mx.array:
        """Final block at the pooled positions only: keys/values everywhere, one query each."""
        attn = layer.self_attn
        _, kp, vp = _qkv(attn, layer.input_layernorm(hp), 0)
        xr = layer.input_layernorm(hr)
        _, kr, vr = _qkv(attn, xr, lp)
        last = (response_len - 1).astype(mx.int32)  # (S,)
        idx = last[:, None, None]
        h_last = mx.take_along_axis(hr, idx, axis=1)  # (S, 1, D)
        x_last = mx.take_along_axis(xr, idx, axis=1)  # (S, 1, D)
        S = hr.shape[0]
        q = attn.q_proj(x_last).reshape(S, 1, attn.n_heads, -1)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = attn.rope(q.transpose(0, 2, 1, 3), offset=lp + last)  # (S, H, 1, hd)
        keys = mx.concatenate([kp[group], kr], axis=2)  # (S, Hkv, Lp+Lr, hd)
        values = mx.concatenate([vp[group], vr], axis=2)
        row_mask = mx.take_along_axis(mask, last[:, None, None, None], axis=2)  # (S, 1, 1, Lk)
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=row_mask)
        h_last = h_last + attn.o_proj(o.transpose(0, 2, 1, 3).reshape(S, 1, -1))  # (S, 1, D)
        return self._head(_mlp_residual(layer, h_last)[:, 0])  # (S,)

    def __call__(
        self,
        prompt: mx.array,
        prompt_len: mx.array,
        response: mx.array,
        response_len: mx.array,
        group: mx.array,
    ) -> mx.array:
        """Rewards (S,) for token inputs: the full model, no cache."""
        out = self.forward_groups(prompt, prompt_len, response, response_len, group)
        assert not isinstance(out, tuple)
        return out

    def reference_rewards(self, tokens: mx.array, lengths: mx.array) -> mx.array:
        """Rewards (B,) of right-padded full sequences through mlx-lm's own blocks.

        Independent of the grouped path on purpose: tests compare the two.
        """
        h = self.embed_tokens(tokens)  # (B, L, D)
        for layer in self.layers:
            h = layer(h, "causal")
        last = mx.take_along_axis(h, (lengths - 1)[:, None, None].astype(mx.int32), axis=1)
        return self._head(last[:, 0])  # (B,)

    def trainable_state(self) -> dict[str, mx.array]:
        """Flat name -> array of every trainable tensor (LoRA matrices and head)."""
        return dict(tree_flatten(self.trainable_parameters()))


def lora_param_count(model: RewardModel) -> int:
    return sum(int(math.prod(v.shape)) for v in model.trainable_state().values())
