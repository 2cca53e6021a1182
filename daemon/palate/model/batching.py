"""Training examples, their tokenized form, and length-bucketed batches.

Two kinds of example share one run: a *pair* (prompt, chosen, rejected, optional margin) and
a *rating* (prompt, response, label in [0, 1]). Each is tokenized once into a *group*: one
prompt and its responses (2 for a pair, 1 for a rating), which the model runs with the prompt
computed once (see reward_model.py).

Batches are formed by sorting groups by length and filling a padded-token budget, so a batch
of short examples holds many and a batch of long ones few; the budget bounds memory, sorting
bounds padding. The last, partial batch is always kept (mlx-lm's ``iterate_batches`` drops the
``len % batch_size`` longest examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from palate.events import Example, PairExample, RatingExample
from palate.model.reward_model import Truncation, encode_prompt_responses, truncate_group

__all__ = [
    "Batch",
    "EncodedGroup",
    "Example",
    "PairExample",
    "RatingExample",
    "TruncationStats",
    "bucket_batches",
    "collate",
    "encode_examples",
]


@dataclass
class EncodedGroup:
    """One example, tokenized and truncated: a prompt and its 1 or 2 responses."""

    prompt: np.ndarray  # (Lp,) int32
    responses: list[np.ndarray]  # each (Lr,) int32; [chosen, rejected] for a pair
    kind: str  # "pair" | "rating"
    margin: float = 0.0
    label: float = 0.0
    weight: float = 1.0
    truncation: Truncation = field(default_factory=Truncation)

    @property
    def cost(self) -> int:
        """Tokens this group costs in a batch before padding."""
        return len(self.prompt) + sum(len(r) for r in self.responses)


@dataclass
class TruncationStats:
    """How many examples lost tokens to ``max_tokens``; reported, never silent."""

    examples: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    tokens_cut: int = 0

    def add(self, t: Truncation) -> None:
        self.examples += 1
        self.prompt_truncated += int(t.prompt_tokens_cut > 0)
        self.response_truncated += int(t.response_tokens_cut > 0)
        self.tokens_cut += t.prompt_tokens_cut + t.response_tokens_cut

    def to_json(self) -> dict[str, int]:
        return {
            "examples": self.examples,
            "prompt_truncated": self.prompt_truncated,
            "response_truncated": self.response_truncated,
            "tokens_cut": self.tokens_cut,
        }


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_tokens: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[EncodedGroup], TruncationStats]:
    """Tokenize every example through the chat template; count every truncation."""
    out: list[EncodedGroup] = []
    stats = TruncationStats()
    for n, ex in enumerate(examples):
        if isinstance(ex, PairExample):
            responses = [ex.chosen, ex.rejected]
        elif isinstance(ex, RatingExample):
            responses = [ex.response]
        else:
            raise TypeError(f"example {n}: expected PairExample or RatingExample, got {ex!r}")
        full_prompt, full_responses = encode_prompt_responses(tokenizer, ex.prompt, responses)
        p_ids, r_ids, trunc = truncate_group(full_prompt, full_responses, max_tokens)
        stats.add(trunc)
        group = EncodedGroup(
            prompt=np.asarray(p_ids, dtype=np.int32),
            responses=[np.asarray(r, dtype=np.int32) for r in r_ids],
            kind="pair" if isinstance(ex, PairExample) else "rating",
            weight=float(ex.weight),
            truncation=trunc,
        )
        if isinstance(ex, PairExample):
            group.margin = float(ex.margin)
        else:
            group.label = float(ex.label)
        out.append(group)
        if on_progress is not None and (n + 1) % 256 == 0:
            on_progress(n + 1, len(examples))
    return out, stats


def _padded_cost(n: int, rows: int, max_lp: int, max_lr: int) -> int:
    return n * max_lp + rows * max_lr


def bucket_batches(
    groups: Sequence[EncodedGroup],
    token_budget: int,
    rng: np.random.Generator | None = None,
) -> list[list[int]]:
    """Index lists of groups, sorted by length, each batch within ``token_budget`` padded
    tokens (a single group over budget gets a batch of its own). Every group is in exactly
    one batch. With ``rng``, lengths are jittered within 16-token buckets and the batch
    order shuffled, so each epoch sees different neighbours and order.
    """
    n = len(groups)
    if n == 0:
        return []
    lengths = np.array([len(g.prompt) + max(len(r) for r in g.responses) for g in groups])
    keys = (lengths // 16).astype(np.float64)
    if rng is not None:
        keys = keys + rng.random(n)
    order = np.argsort(keys, kind="stable")
    batches: list[list[int]] = []
    cur: list[int] = []
    max_lp = max_lr = rows = 0
    for i in order.tolist():
        g = groups[i]
        lp = max(max_lp, len(g.prompt))
        lr = max(max_lr, *(len(r) for r in g.responses))
        r = rows + len(g.responses)
        if cur and _padded_cost(len(cur) + 1, r, lp, lr) > token_budget:
            batches.append(cur)
            cur, lp, lr, r = [], len(g.prompt), max(len(x) for x in g.responses), len(g.responses)
        cur.append(i)
        max_lp, max_lr, rows = lp, lr, r
    if cur:
        batches.append(cur)  # the remainder is trained on, never dropped
    if rng is not None:
        perm = rng.permutation(len(batches))
        batches = [batches[k] for k in perm.tolist()]
    return batches


@dataclass
class Batch:
    """A prompt-grouped batch as numpy arrays, ready for ``mx.array``.

    ``prompt``/``response`` hold token ids (G, Lp)/(S, Lr) or, from the frozen-prefix cache,
    hidden states (G, Lp, D)/(S, Lr, D). Pairs index rows of ``response``.
    """

    prompt: np.ndarray
    prompt_len: np.ndarray  # (G,)
    response: np.ndarray
    response_len: np.ndarray  # (S,)
    group: np.ndarray  # (S,) prompt row of each response
    pair_idx: np.ndarray  # (P, 2) rows of chosen, rejected
    margin: np.ndarray  # (P,)
    pair_weight: np.ndarray  # (P,)
    rating_idx: np.ndarray  # (Q,)
    label: np.ndarray  # (Q,)
    rating_weight: np.ndarray  # (Q,)

    @property
    def tokens(self) -> int:
        return int(self.prompt_len.sum() + self.response_len.sum())


def collate(
    groups: Sequence[EncodedGroup],
    index: Sequence[int],
    hidden: Sequence[tuple[np.ndarray, list[np.ndarray]]] | None = None,
) -> Batch:
    """Right-pad a list of groups into a :class:`Batch`.

    With ``hidden`` (the frozen-prefix cache, aligned with ``groups``), the prompt/response
    arrays are the cached hidden states instead of token ids.
    """
    sel = [groups[i] for i in index]
    G = len(sel)
    resp_rows = [r for g in sel for r in g.responses]
    S = len(resp_rows)
    Lp = max(1, max(len(g.prompt) for g in sel))
    Lr = max(len(r) for r in resp_rows)
    prompt_len = np.array([len(g.prompt) for g in sel], dtype=np.int32)
    response_len = np.array([len(r) for r in resp_rows], dtype=np.int32)
    group = np.repeat(np.arange(G, dtype=np.int32), [len(g.responses) for g in sel])
    if hidden is None:
        prompt = np.zeros((G, Lp), dtype=np.int32)
        response = np.zeros((S, Lr), dtype=np.int32)
        for k, g in enumerate(sel):
            prompt[k, : len(g.prompt)] = g.prompt
        for k, r in enumerate(resp_rows):
            response[k, : len(r)] = r
    else:
        hsel = [hidden[i] for i in index]
        D = hsel[0][0].shape[-1]
        prompt = np.zeros((G, Lp, D), dtype=np.float32)
        response = np.zeros((S, Lr, D), dtype=np.float32)
        row = 0
        for k, (hp, hrs) in enumerate(hsel):
            prompt[k, : hp.shape[0]] = hp
            for hr in hrs:
                response[row, : hr.shape[0]] = hr
                row += 1
    pairs, margins, pw, ratings, labels, rw = [], [], [], [], [], []
    row = 0
    for g in sel:
        if g.kind == "pair":
            pairs.append((row, row + 1))
            margins.append(g.margin)
            pw.append(g.weight)
        else:
            ratings.append(row)
            labels.append(g.label)
            rw.append(g.weight)
        row += len(g.responses)
    return Batch(
        prompt=prompt,
        prompt_len=prompt_len,
        response=response,
        response_len=response_len,
        group=group,
        pair_idx=np.array(pairs, dtype=np.int32).reshape(-1, 2),
        margin=np.array(margins, dtype=np.float32),
        pair_weight=np.array(pw, dtype=np.float32),
        rating_idx=np.array(ratings, dtype=np.int32),
        label=np.array(labels, dtype=np.float32),
        rating_weight=np.array(rw, dtype=np.float32),
    )


def split_batch(
    index: Sequence[int], groups: Sequence[EncodedGroup], parts: int
) -> list[list[int]]:
    """Split one batch into ``parts`` shards of similar token cost (for parallel streams)."""
    if parts <= 1 or len(index) < 2:
        return [list(index)]
    parts = min(parts, len(index))
    shards: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(index, key=lambda j: -groups[j].cost):
        k = load.index(min(load))
        shards[k].append(i)
        load[k] += groups[i].cost
    return [s for s in shards if s]
