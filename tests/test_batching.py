"""Batching: token budget, nothing dropped, pairs stay together."""

from __future__ import annotations

import numpy as np

from palate.model.batching import (
    PairExample,
    RatingExample,
    bucket_batches,
    collate,
    encode_examples,
    split_batch,
)
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
