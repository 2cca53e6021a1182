"""N samples from one prompt with one prefill: the prompt's KV cache is computed once and
replicated into an N-row batch, then every decode step runs all live rows in one forward.

Why not ``mlx_lm.batch_generate``: it serves many *different* prompts (left padding, a
``BatchKVCache`` with a mask every step, prefill per prompt). Here every row shares one
prompt, so the rows have one length, the cache is mlx-lm's plain ``KVCache`` with a batch
dimension, single-token steps need no mask, and the prompt is prefilled once. The loop keeps
``generate_step``'s pipelining (step t+1 is queued with ``mx.async_eval`` before step t's
tokens are read back) and its sampler (``mlx_lm.sample_utils.make_sampler``); finished rows
are dropped from the batch so they cost nothing afterwards.

Any mlx-lm model whose cache is ``KVCache`` works this way (llama, qwen, mistral, phi...);
models with other caches (sliding windows, state-space layers) fall back to N runs of
``mlx_lm.generate_step`` from copies of the prefilled cache.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import KVCache, make_prompt_cache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from palate.model.reward_model import Messages, encode_prompt_responses  # noqa: E402

__all__ = ["SampleConfig", "Samples", "eos_ids", "prompt_ids", "sample"]

#: Tokens that end an assistant turn in the chat formats Palate meets.
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
PREFILL_STEP = 512


@dataclass(frozen=True)
class SampleConfig:
    """How candidates are drawn."""

    max_tokens: int = 128  # new tokens per candidate
    temperature: float = 0.8  # 0 = greedy (then every candidate is the same)
    top_p: float = 0.95  # nucleus sampling; 1.0 = off
    seed: int | None = None  # fixed seed: the same candidates for the same prompt and model
    max_prompt_tokens: int = 2048  # a longer prompt is cut from the left (as the scorer cuts)


@dataclass
class Samples:
    """N candidates for one prompt, in sampling order, and what producing them cost."""

    texts: list[str]
    tokens: list[list[int]]  # generated ids, without the end-of-turn token
    finish: list[str]  # "stop" (end of turn) or "length" (max_tokens reached)
    logprob: list[float]  # sum of log p(token) under the model (untempered), end token included
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    prompt_tokens_cut: int = 0  # tokens cut from the left of a prompt over max_prompt_tokens

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) + (f == "stop") for t, f in zip(self.tokens, self.finish, strict=True))


def eos_ids(tokenizer: Any) -> set[int]:
    """Ids that end a turn: the tokenizer's eos plus the chat end markers it knows."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in _END_TOKENS if t in vocab)
    return ids


def prompt_ids(tokenizer: Any, prompt: str | Messages) -> list[int]:
    """The prompt as the reward model sees it: chat template with the generation prompt."""
    ids, _ = encode_prompt_responses(tokenizer, prompt, [])
    return ids


def _prefill(model: Any, ids: Sequence[int]) -> list[Any]:
    """The cache of every prompt token but the last, in chunks (as ``generate_step``)."""
    cache = make_prompt_cache(model)
    prompt = mx.array(list(ids[:-1]), dtype=mx.int32)
    while prompt.shape[0] > 0:
        n = min(PREFILL_STEP, prompt.shape[0])
        model(prompt[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
    return cache


def _replicate(cache: list[Any], n: int) -> None:
    """Make a 1-row prefilled ``KVCache`` list an n-row one, in place."""
    for c in cache:
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        c.keys = mx.repeat(k, n, axis=0)  # (n, Hkv, L, hd)
        c.values = mx.repeat(v, n, axis=0)


def _keep_rows(cache: list[Any], rows: mx.array) -> None:
    for c in cache:
        c.keys = c.keys[rows]
        c.values = c.values[rows]


def sample(
    model: Any,
    tokenizer: Any,
    prompt: str | Messages | Sequence[int],
    n: int,
    config: SampleConfig = SampleConfig(),
    *,
    between_steps: Callable[[], None] | None = None,
) -> Samples:
    """Draw ``n`` candidates for ``prompt`` (text, chat messages or token ids).

    ``between_steps`` is called after every decode step (the daemon serves queued scoring
    requests there, so a long generation never starves them); it must not touch ``model``.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if config.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if isinstance(prompt, str) or not _all_ints(prompt):
        ids = prompt_ids(tokenizer, cast("str | Messages", prompt))
    else:
        ids = [int(t) for t in cast("Sequence[int]", prompt)]
    if not ids:
        raise ValueError("the prompt has no tokens")
    cut = max(0, len(ids) - config.max_prompt_tokens)
    ids = ids[cut:]
    if config.seed is not None:
        mx.random.seed(config.seed)
    sampler = make_sampler(temp=config.temperature, top_p=config.top_p)
    stop = eos_ids(tokenizer)
    t0 = time.perf_counter()
    cache = _prefill(model, ids)
    batched = all(isinstance(c, KVCache) for c in cache)
    if batched:
        logits = model(mx.array(ids[-1:], dtype=mx.int32)[None], cache=cache)[:, -1, :]
        mx.eval(logits)
    prefill_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if batched:
        toks, finish, lps = _decode_batched(
            model, cache, logits, n, config.max_tokens, sampler, stop, between_steps
        )
    else:
        toks, finish, lps = _decode_each(model, cache, ids[-1], n, config, sampler, stop)
    decode_s = time.perf_counter() - t1
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in toks]
    return Samples(texts, toks, finish, lps, len(ids), prefill_s, decode_s, cut)


def _all_ints(xs: Sequence[Any]) -> bool:
    return bool(xs) and all(isinstance(x, int) for x in xs)


def _decode_batched(
    model: Any,
    cache: list[Any],
    logits: mx.array,
    n: int,
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array],
    stop: set[int],
    between_steps: Callable[[], None] | None,
) -> tuple[list[list[int]], list[str], list[float]]:
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (1, V)
    if n > 1:  # one prefilled row becomes n: same cache, same first distribution
        logprobs = mx.broadcast_to(logprobs, (n, logprobs.shape[-1]))  # (n, V)
        _replicate(cache, n)
    rows = list(range(n))  # live row -> candidate index
    out: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    total = [0.0] * n

    def pick(lp: mx.array) -> tuple[mx.array, mx.array]:
        y = sampler(lp)  # (B,)
        return y, mx.take_along_axis(lp, y[:, None], axis=-1)[:, 0]  # (B,)

    y, y_lp = pick(logprobs)
    mx.async_eval(y, y_lp)
    for step in range(max_tokens):
        last = step == max_tokens - 1
        if not last:  # queue step t+1 before reading step t back
            nxt_logits = model(y[:, None], cache=cache)[:, -1, :]
            nxt_lp = nxt_logits - mx.logsumexp(nxt_logits, axis=-1, keepdims=True)
            ny, ny_lp = pick(nxt_lp)
            mx.async_eval(ny, ny_lp)
        toks = cast("list[int]", y.tolist())
        tlps = cast("list[float]", y_lp.tolist())
        keep = []
        for j, (t, lp) in enumerate(zip(toks, tlps, strict=True)):
            i = rows[j]
            total[i] += lp
            if t in stop:
                finish[i] = "stop"
            else:
                out[i].append(int(t))
                keep.append(j)
        if last or not keep:
            break
        y, y_lp = ny, ny_lp
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            idx = mx.array(keep, dtype=mx.int32)
            _keep_rows(cache, idx)
            y, y_lp = y[idx], y_lp[idx]
            rows = [rows[j] for j in keep]
        if between_steps is not None:
            between_steps()
    return out, finish, total


def _decode_each(
    model: Any,
    cache: list[Any],
    last: int,
    n: int,
    config: SampleConfig,
    sampler: Callable[[mx.array], mx.array],
    stop: set[int],
) -> tuple[list[list[int]], list[str], list[float]]:
    """Fallback for caches that cannot be batched this way: n runs of ``generate_step``
    from copies of the prefilled cache (only the last prompt token is fed per sample)."""
    out, finish, total = [], [], []
    for _ in range(n):
        c = copy.deepcopy(cache)
        toks: list[int] = []
        fin, lp_sum = "length", 0.0
        gen = generate_step(
            mx.array([last]), model, max_tokens=config.max_tokens, sampler=sampler, prompt_cache=c
        )
        for t, lp in gen:
            lp_sum += float(lp[t])
            if t in stop:
                fin = "stop"
                break
            toks.append(int(t))
        out.append(toks)
        finish.append(fin)
        total.append(lp_sum)
    return out, finish, total
