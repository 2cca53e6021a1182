"""Batching: token budget, nothing dropped, pairs stay together."""

from __future__ import annotations

import numpy as np
import pytest

from palate.model.batching import (
    EncodedGroup,
    PairExample,
    RatingExample,
    TruncationStats,
    bucket_batches,
    collate,
    encode_examples,
    split_batch,
)
from palate.model.reward_model import Truncation
from tiny_lm import marker_pairs, tiny_tokenizer


def test_every_group_in_exactly_one_batch_within_budget() -> None:
    groups, _ = encode_examples(marker_pairs(57), tiny_tokenizer(), 64)
    for rng in (None, np.random.default_rng(0)):
        batches = bucket_batches(groups, 300, rng)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(57))  # the remainder is not dropped
        for b in batches:
            c = collate(groups, b)
            assert len(b) == 1 or c.prompt.size + c.response.size <= 300


def test_collate_pairs_and_ratings_in_one_batch() -> None:
    ex = [PairExample("w1 w2", "w3", "w4 w5"), RatingExample("w6", "w7 w8", 1.0)]
    groups, _ = encode_examples(ex, tiny_tokenizer(), 64)
    b = collate(groups, [0, 1])
    assert b.response.shape[0] == 3 and b.group.tolist() == [0, 0, 1]
    assert b.pair_idx.tolist() == [[0, 1]] and b.rating_idx.tolist() == [2]
    assert b.label.tolist() == [1.0]
    assert (b.response_len == [len(r) for g in groups for r in g.responses]).all()


def test_split_batch_keeps_every_group() -> None:
    groups, _ = encode_examples(marker_pairs(9), tiny_tokenizer(), 64)
    shards = split_batch(list(range(9)), groups, 2)
    assert len(shards) == 2 and sorted(i for s in shards for i in s) == list(range(9))


def _group(lp: int, *lrs: int, kind: str = "pair", **kw: float) -> EncodedGroup:
    """A group with token ids that say where they came from (prompt 100+, response 10*k+)."""
    return EncodedGroup(
        prompt=np.arange(100, 100 + lp, dtype=np.int32),
        responses=[
            np.arange(10 * (k + 1), 10 * (k + 1) + n, dtype=np.int32) for k, n in enumerate(lrs)
        ],
        kind=kind,
        **kw,  # type: ignore[arg-type]
    )


def test_truncation_stats_count_examples_and_tokens() -> None:
    s = TruncationStats()
    for t in (Truncation(0, 0), Truncation(1, 0), Truncation(0, 1), Truncation(4, 5)):
        s.add(t)
    assert s.to_json() == {
        "examples": 4,
        "prompt_truncated": 2,
        "response_truncated": 2,
        "tokens_cut": 11,
    }


def test_encode_examples_keeps_kind_margin_label_weight_and_reports_progress() -> None:
    tok = tiny_tokenizer()
    ex: list = [
        PairExample("w1 w2", "w3", "w4 w5", margin=0.5, weight=2.0),
        RatingExample("w6", "w7 w8", 0.25, weight=3.0),
    ] * 300
    seen: list[tuple[int, int]] = []
    groups, stats = encode_examples(ex, tok, 64, on_progress=lambda *a: seen.append(a))
    assert seen == [(256, 600), (512, 600)]
    p, r = groups[0], groups[1]
    assert (p.kind, p.margin, p.weight, p.label, len(p.responses)) == ("pair", 0.5, 2.0, 0.0, 2)
    assert (r.kind, r.margin, r.weight, r.label, len(r.responses)) == ("rating", 0.0, 3.0, 0.25, 1)
    assert p.prompt.dtype == np.int32 and all(x.dtype == np.int32 for x in p.responses)
    assert stats.examples == 600 and stats.tokens_cut == 0
    with pytest.raises(TypeError, match="example 0"):
        encode_examples(["not an example"], tok, 64)  # type: ignore[list-item]
    # Cut to 8 tokens: every example counted, and the ids are the kept part of the full ones.
    short, cut = encode_examples(ex[:2], tok, 8)
    assert cut.examples == 2 and cut.tokens_cut > 0
    assert all(len(g.prompt) + max(len(r) for r in g.responses) <= 8 for g in short)
    assert [g.truncation for g in short] == [g.truncation for g in short if g.truncation.truncated]
    assert sum(
        g.truncation.prompt_tokens_cut + g.truncation.response_tokens_cut for g in short
    ) == (cut.tokens_cut)


def _cost(groups: list[EncodedGroup], batch: list[int]) -> int:
    sel = [groups[i] for i in batch]
    rows = sum(len(g.responses) for g in sel)
    lp = max(len(g.prompt) for g in sel)
    lr = max(len(r) for g in sel for r in g.responses)
    return len(sel) * lp + rows * lr


def test_bucket_batches_fill_the_budget_greedily_in_length_order() -> None:
    """Each batch's padded cost is within the budget (or it holds one group), and adding the
    next group in length order would have passed it: batches are as full as allowed."""
    rng = np.random.default_rng(7)
    groups = [
        _group(int(rng.integers(0, 40)), *rng.integers(1, 30, int(rng.integers(1, 3))))
        for _ in range(80)
    ]
    groups.append(_group(90, 80, 80))  # alone over budget
    budget = 300
    batches = bucket_batches(groups, budget)
    flat = [i for b in batches for i in b]
    lengths = [len(g.prompt) + max(len(r) for r in g.responses) for g in groups]
    assert flat == sorted(range(len(groups)), key=lambda i: lengths[i] // 16)  # stable
    for b, nxt in zip(batches, [*batches[1:], None], strict=True):
        assert len(b) == 1 or _cost(groups, b) <= budget
        if nxt is not None:
            assert _cost(groups, b + nxt[:1]) > budget
    assert [len(groups) - 1] in batches
    assert bucket_batches([], budget) == []
    assert bucket_batches(groups[:1], budget) == [[0]]
    # A budget met exactly is within it: three ratings of 2 tokens, no prompt, cost 6.
    exact = [_group(0, 2, kind="rating") for _ in range(3)]
    assert bucket_batches(exact, 6) == [[0, 1, 2]]
    assert bucket_batches(exact, 5) == [[0, 1], [2]]
    # Shuffled: the same groups, another order, reproducible from the seed.
    a = bucket_batches(groups, budget, np.random.default_rng(1))
    b2 = bucket_batches(groups, budget, np.random.default_rng(1))
    assert a == b2 and sorted(i for x in a for i in x) == list(range(len(groups)))
    assert a != batches
    # ... and other neighbours: lengths are jittered within their 16-token bucket.
    assert sorted(map(sorted, a)) != sorted(map(sorted, batches))
    for b in a:
        assert len(b) == 1 or _cost(groups, b) <= budget


def test_collate_by_hand() -> None:
    groups = [
        _group(3, 2, 4, margin=0.5, weight=2.0),
        _group(0, 1, kind="rating", label=0.75, weight=3.0),
        _group(1, 3, 1),
    ]
    b = collate(groups, [2, 0, 1])
    assert b.prompt.tolist() == [[100, 0, 0], [100, 101, 102], [0, 0, 0]]
    assert b.prompt_len.tolist() == [1, 3, 0] and b.response_len.tolist() == [3, 1, 2, 4, 1]
    assert b.response.tolist() == [
        [10, 11, 12, 0],
        [20, 0, 0, 0],
        [10, 11, 0, 0],
        [20, 21, 22, 23],
        [10, 0, 0, 0],
    ]
    assert b.group.tolist() == [0, 0, 1, 1, 2]
    assert b.pair_idx.tolist() == [[0, 1], [2, 3]]
    assert b.margin.tolist() == [0.0, 0.5] and b.pair_weight.tolist() == [1.0, 2.0]
    assert b.rating_idx.tolist() == [4] and b.label.tolist() == [0.75]
    assert b.rating_weight.tolist() == [3.0]
    assert b.tokens == 4 + 11
    assert b.prompt.dtype == np.int32 and b.response.dtype == np.int32
    ints = (b.prompt_len, b.response_len, b.group, b.pair_idx, b.rating_idx)
    floats = (b.margin, b.pair_weight, b.label, b.rating_weight)
    assert all(x.dtype == np.int32 for x in ints) and all(x.dtype == np.float32 for x in floats)
    # Only empty prompts: one padded column, so the model's arrays are never zero-width.
    assert collate(groups, [1]).prompt.shape == (1, 1)
    # From the frozen-prefix cache: hidden states in place of ids, zero-padded.
    d = 2
    hidden = [
        (
            np.full((len(g.prompt), d), 1.0 + k),
            [np.full((len(r), d), 10.0 * k + j) for j, r in enumerate(g.responses)],
        )
        for k, g in enumerate(groups)
    ]
    h = collate(groups, [2, 0], hidden)
    assert h.prompt.shape == (2, 3, d) and h.response.shape == (4, 4, d)
    assert h.prompt.dtype == np.float32 and h.response.dtype == np.float32
    assert h.prompt[0, :, 0].tolist() == [3.0, 0.0, 0.0] and h.prompt[1, :, 0].tolist() == [1.0] * 3
    assert h.response[:, :, 1].tolist() == [
        [20.0, 20.0, 20.0, 0.0],
        [21.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0, 1.0],
    ]
    assert h.pair_idx.tolist() == [[0, 1], [2, 3]]


def test_split_batch_balances_token_cost() -> None:
    groups = [_group(0, n, kind="rating") for n in (1, 9, 5, 7, 4, 6)]
    shards = split_batch(list(range(6)), groups, 2)
    # Longest first onto the lighter shard: 9 -> a, 7 -> b, 6 -> b (13), 5 -> a (14),
    # 4 -> b (17), 1 -> a (15).
    assert shards == [[1, 2, 0], [3, 5, 4]]
    assert split_batch([0, 1], groups, 5) == [[1], [0]]  # no more shards than groups
    assert split_batch([2, 0, 1], groups, 1) == [[2, 0, 1]]  # one part: as given
    assert split_batch([3], groups, 2) == [[3]]
