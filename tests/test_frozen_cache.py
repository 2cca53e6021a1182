"""The frozen-prefix cache kept across nights (issue 15): keyed by base hash and example
content, exact when reused, bounded, encrypted in the store, emptied by forget and never
reused for another base model."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import dataclasses  # noqa: E402
import io  # noqa: E402
import secrets  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.events import validate_event  # noqa: E402
from palate.model.batching import EncodedGroup, encode_examples  # noqa: E402
from palate.model.prefix import FrozenPrefix, build_prefix_cache  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel  # noqa: E402
from palate.model.scoring import Scorer  # noqa: E402
from palate.model.training import (  # noqa: E402
    TrainConfig,
    frozen_key,
    pack_hidden,
    train_reward_model,
    unpack_hidden,
)
from palate.runtime.training_child import FrozenLookup, keep_frozen  # noqa: E402
from palate.store.database import IngestGroup, Store  # noqa: E402
from tiny_lm import marker_pairs, tiny_base  # noqa: E402

FAST: dict[str, Any] = dict(
    lora_layers=2, lr=3e-3, batch_tokens=1024, max_tokens=64, min_steps=0, members=1, epochs=1
)


def _state(res: Any) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in res.model.trainable_state().items()}


def test_reused_activations_train_the_same_model_and_only_new_examples_are_computed() -> None:
    base = tiny_base()
    data = marker_pairs(80)
    kept: dict[str, bytes] = {}
    first = train_reward_model(data, TrainConfig(**FAST), base=base, frozen=kept.get)
    assert first.metrics["frozen_reused"] == 0 and first.frozen_keys is not None
    assert first.prefix is not None and first.prefix[1] is not None
    kept.update(
        {k: pack_hidden(h) for k, h in zip(first.frozen_keys, first.prefix[1], strict=True)}
    )
    assert len(kept) == len(set(first.frozen_keys))

    again = train_reward_model(data, TrainConfig(**FAST), base=base, frozen=kept.get)
    assert again.metrics["frozen_reused"] == 80
    a, b = _state(first), _state(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # exact: the same numbers, kept

    # A night with 10% new events: only those go through the frozen blocks.
    more = data + marker_pairs(8, seed=7)
    night = train_reward_model(more, TrainConfig(**FAST), base=base, frozen=kept.get)
    assert night.metrics["frozen_reused"] == 80
    assert night.frozen_keys is not None and night.prefix is not None
    assert night.prefix[1] is not None
    fresh = dict(zip(night.frozen_keys, night.prefix[1], strict=True))
    for k, blob in kept.items():  # what was reused is what was kept
        p, rs = unpack_hidden(blob)
        assert np.array_equal(fresh[k][0], p) and all(
            np.array_equal(x, y) for x, y in zip(fresh[k][1], rs, strict=True)
        )

    # Another base model: nothing matches, everything is computed.
    other = dataclasses.replace(base, content_hash="another-base")
    res = train_reward_model(data, TrainConfig(**FAST), base=other, frozen=kept.get)
    assert res.metrics["frozen_reused"] == 0


def test_the_key_covers_base_split_dtype_and_tokens() -> None:
    (g, h), _ = encode_examples(marker_pairs(2), tiny_base().tokenizer, 64)
    k = frozen_key(g, "base", 2, "float16")
    assert k == frozen_key(g, "base", 2, "float16")
    others = [("other", 2, "float16"), ("base", 3, "float16"), ("base", 2, "float32")]
    keys = {k, frozen_key(h, "base", 2, "float16"), *(frozen_key(g, *o) for o in others)}
    assert len(keys) == 5
    entry = (np.arange(6, dtype=np.float16).reshape(2, 3), [np.ones((1, 3), np.float16)] * 2)
    p, rs = unpack_hidden(pack_hidden(entry))
    assert np.array_equal(p, entry[0]) and p.dtype == np.float16 and len(rs) == 2


def test_the_key_is_stable_across_releases_and_id_dtypes() -> None:
    """Keys are kept in the store across nights and upgrades: a change of the key function
    silently recomputes every cached activation, so it must be a deliberate version bump
    (``palate-frozen:v1``). The same ids as int64 (what a tokenizer may return) give the same
    key, and the length prefixes keep ``[1, 2] + [3]`` apart from ``[1] + [2, 3]``."""
    g = EncodedGroup(
        prompt=np.array([1, 2, 3], np.int32),
        responses=[np.array([4, 5], np.int32), np.array([6], np.int32)],
        kind="pair",
    )
    key = frozen_key(g, "base", 2, "float16")
    assert key == "10076a7612044e059adbcfb5f89f4df33b6aa43e3ad313ca25d610ca78293c66"
    wide = dataclasses.replace(
        g, prompt=g.prompt.astype(np.int64), responses=[r.astype(np.int64) for r in g.responses]
    )
    assert frozen_key(wide, "base", 2, "float16") == key
    moved = dataclasses.replace(
        g,
        prompt=np.array([1, 2], np.int32),
        responses=[np.array([3, 4, 5], np.int32), *g.responses[1:]],
    )
    assert frozen_key(moved, "base", 2, "float16") != key


def test_unpack_refuses_pickled_objects() -> None:
    """The blobs come back from a store: loading one must never unpickle (code execution)."""
    buf = io.BytesIO()
    np.savez(buf, np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        unpack_hidden(buf.getvalue())


def test_prefix_cache_dtype_shapes_and_progress() -> None:
    """float16 by default (half the memory), float32 on request; every group's prompt and
    responses come back at their own lengths, split over two streams as over one; progress
    reports each batch's groups and tokens and ends at the total cost."""
    base = tiny_base()
    groups, _ = encode_examples(marker_pairs(6), base.tokenizer, 64)
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    seen: list[tuple[int, int, int]] = []
    two = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    half = build_prefix_cache(model, groups, 256, two, progress=lambda *a: seen.append(a))
    full = build_prefix_cache(model, groups, 256, [mx.default_stream(mx.cpu)], dtype="float32")
    total = sum(g.cost for g in groups)
    assert seen[-1][0] == total and sum(a[2] for a in seen) == total
    assert sum(a[1] for a in seen) == len(groups)
    assert [a[0] for a in seen] == list(np.cumsum([a[2] for a in seen]))
    for g, (p, rs), (p32, rs32) in zip(groups, half, full, strict=True):
        assert p.dtype == np.float16 and p32.dtype == np.float32
        assert p.shape[0] == len(g.prompt)
        assert [r.shape[0] for r in rs] == [len(r) for r in g.responses]
        assert all(r.dtype == np.float16 for r in rs) and all(r.dtype == np.float32 for r in rs32)
        np.testing.assert_allclose(p, p32, rtol=1e-2, atol=1e-2)


def test_activations_too_large_for_float16_are_kept_in_float32() -> None:
    base = tiny_base()
    emb = base.model.model.embed_tokens
    emb.weight = emb.weight * 1e6  # the residual stream carries it past float16's 65504
    groups, _ = encode_examples(marker_pairs(2), base.tokenizer, 64)
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    for p, rs in build_prefix_cache(model, groups, 256, [mx.default_stream(mx.cpu)]):
        assert p.dtype == np.float32 and np.isfinite(p).all() and np.abs(p).max() > 65504
        assert all(r.dtype == np.float32 and np.isfinite(r).all() for r in rs)


def test_frozen_prefix_keys_lookups_counts_and_memory_bound() -> None:
    """What FrozenPrefix asks the store for (the persisted key of this base, split and dtype),
    what it counts, what it offers to keep (only what it computed), and its memory bound
    (an entry that would pass ``max_bytes`` is not kept, and is recomputed when asked again,
    never missing from a result)."""
    base = tiny_base()
    groups, _ = encode_examples(marker_pairs(8), base.tokenizer, 64)
    model = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    cpu = [mx.default_stream(mx.cpu)]
    built = build_prefix_cache(model, groups, 256, cpu)
    keys = [frozen_key(g, "hashA", model.split, "float16") for g in groups]
    stored = {keys[0]: pack_hidden(built[0]), keys[1]: pack_hidden(built[1])}
    asked: list[str] = []

    def lookup(k: str) -> bytes | None:
        asked.append(k)
        return stored.get(k)

    fp = FrozenPrefix("hashA", model.split, lookup=lookup)
    out = fp.hidden(model, groups[:6], 256, cpu)
    assert asked == keys[:6]
    assert fp.stats() == {"reused": 2, "shared": 0, "computed": 4}
    assert [k for k, _ in fp.fresh()] == keys[2:6]
    for i, ((p, rs), (bp, brs)) in enumerate(zip(out, built[:6], strict=True)):
        assert p.dtype == np.float16 and all(r.dtype == np.float16 for r in rs)
        if i < 2:  # read back from the store exactly
            assert np.array_equal(p, bp) and all(map(np.array_equal, rs, brs))
        else:  # computed in other batches: equal up to float16 rounding
            np.testing.assert_allclose(p, bp, atol=2e-2)
    fp.hidden(model, groups, 256, cpu)  # six in memory, two new
    assert fp.stats() == {"reused": 2, "shared": 6, "computed": 6}
    assert asked == keys[:6] + keys[6:]

    sizes = [int(p.nbytes + sum(r.nbytes for r in rs)) for p, rs in built]
    tight = FrozenPrefix("hashA", model.split, max_bytes=sizes[0] + sizes[1])  # no lookup
    first = tight.hidden(model, groups[:3], 256, cpu)
    assert [k for k, _ in tight.fresh()] == keys[:2]  # the third would pass the bound
    assert all(p.shape[0] == len(g.prompt) for (p, _), g in zip(first, groups, strict=False))
    again = tight.hidden(model, groups[:3], 256, cpu)
    assert tight.stats() == {"reused": 0, "shared": 2, "computed": 4}
    np.testing.assert_allclose(again[2][0], built[2][0], atol=2e-2)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "p.db", secrets.token_bytes(32))


def test_store_bounds_evicts_oldest_and_drops_other_bases(store: Store) -> None:
    blob = b"\x01" * 1000
    s = store.frozen_cache_put("A", {"k1": blob, "k2": blob}, [], max_bytes=10_000)
    assert s == {"rows": 2, "bytes": 2000, "added": 2, "evicted": 0}
    assert store.frozen_cache_get("A", "k1") == blob
    assert store.frozen_cache_get("B", "k1") is None  # another base never reads it
    # k1 read again tonight: k2 is now the least recently used and goes first.
    s = store.frozen_cache_put("A", {"k3": blob}, ["k1"], max_bytes=2500)
    assert s["rows"] == 2 and s["bytes"] == 2000 and s["evicted"] == 1
    assert store.frozen_cache_get("A", "k2") is None and store.frozen_cache_get("A", "k1")
    # A new base model: every row of the old one is dropped.
    s = store.frozen_cache_put("B", {"k9": blob}, [], max_bytes=10_000)
    assert s["rows"] == 1 and store.frozen_cache_get("A", "k1") is None
    assert store.frozen_cache_stats() == {"rows": 1, "bytes": 1000}
    assert store.frozen_cache_put("B", {}, [], max_bytes=0)["rows"] == 0


def test_store_encrypts_and_forget_empties_it(tmp_path: Path) -> None:
    st = Store(tmp_path / "p.db", secrets.token_bytes(32))
    marker = b"FROZEN-ACTIVATIONS-" * 50
    st.frozen_cache_put("A", {"k": marker}, [], max_bytes=1 << 20)
    st.checkpoint()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"FROZEN-ACTIVATIONS-" not in raw  # encrypted at rest
    event = validate_event(
        {"id": "e1", "kind": "pair", "source": "t", "ts": 1.79e9, "prompt": "p",
         "chosen": "c", "rejected": "r"},
        now=2e9,
    )  # fmt: skip
    st.ingest([IngestGroup([event])])
    epoch = st.frozen_cache_epoch()
    assert st.forget(ids=["e1"]) == 1
    assert st.frozen_cache_stats()["rows"] == 0 and st.frozen_cache_epoch() == epoch + 1
    st.close()


def test_the_training_run_keeps_and_reuses_through_the_store(store: Store) -> None:
    base = tiny_base()
    tc = TrainConfig(**FAST)
    data = marker_pairs(60)
    epoch = store.frozen_cache_epoch()
    lookup = FrozenLookup(store, base.content_hash)
    first = train_reward_model(data, tc, base=base, frozen=lookup)
    kept = keep_frozen(store, lookup, first, tc, epoch)
    assert kept is not None and kept["added"] == 60 and kept["reused"] == 0
    per_example = kept["bytes"] / 60
    assert per_example > 0 and kept["rows"] == 60

    lookup = FrozenLookup(store, base.content_hash)
    second = train_reward_model(data + marker_pairs(6, seed=9), tc, base=base, frozen=lookup)
    assert second.metrics["frozen_reused"] == 60
    kept = keep_frozen(store, lookup, second, tc, epoch)
    assert kept is not None and kept["added"] == 6 and kept["rows"] == 66
    # Bounded by frozen_cache_mb (the store's LRU eviction is tested above): 0 keeps nothing.
    small = dataclasses.replace(tc, frozen_cache_mb=0)
    assert keep_frozen(store, FrozenLookup(store, "x"), second, small, epoch) is not None
    assert store.frozen_cache_stats()["rows"] == 0
    # A forget during the run: nothing from it is kept.
    assert keep_frozen(store, lookup, second, tc, epoch - 1) is None


def test_the_gate_shares_one_frozen_pass_between_models_and_keeps_it_for_later_nights(
    store: Store,
) -> None:
    """Judging scores the held-out set with the candidate and the deployed model: with a
    FrozenPrefix the frozen blocks run once for both (scores as without it, up to the
    cache's float16 rounding), and a later night reads them from the store."""
    base = tiny_base()
    tc = TrainConfig(**FAST)
    none: dict[str, bytes] = {}
    one = train_reward_model(marker_pairs(40), tc, base=base, frozen=none.get)
    two = train_reward_model(marker_pairs(40, seed=5), tc, base=base)
    held = [(p.prompt, p.chosen, p.rejected) for p in marker_pairs(12, seed=11)]
    split = one.model.split
    assert split > 0 and two.model.split == split

    def scorer(res: Any, prefix: FrozenPrefix | None) -> Scorer:
        return Scorer(res.model, base.tokenizer, tc.max_tokens, res.calibration, prefix=prefix)

    plain = [scorer(r, None).score_pairs(held) for r in (one, two)]
    lookup = FrozenLookup(store, base.content_hash)
    shared = FrozenPrefix(base.content_hash, split, tc.cache_dtype, lookup)
    cached = [scorer(r, shared).score_pairs(held) for r in (one, two)]
    for (a0, b0), (a1, b1) in zip(plain, cached, strict=True):
        np.testing.assert_allclose(a1, a0, rtol=0, atol=2e-2 * max(1.0, float(np.abs(a0).max())))
        np.testing.assert_allclose(b1, b0, rtol=0, atol=2e-2 * max(1.0, float(np.abs(b0).max())))
    # The second model read the first one's frozen pass: nothing computed twice.
    assert shared.computed == 12 and shared.shared == 12 and shared.reused == 0
    # The two models still score differently (only the frozen part is shared).
    assert not np.allclose(cached[0][0], cached[1][0])

    epoch = store.frozen_cache_epoch()
    kept = keep_frozen(store, lookup, one, dataclasses.replace(tc), epoch, shared)
    assert kept is not None and kept["added"] == 40 + 12  # training's and the gate's

    lookup = FrozenLookup(store, base.content_hash)
    later = FrozenPrefix(base.content_hash, split, tc.cache_dtype, lookup)
    again = scorer(two, later).score_pairs(held)
    assert later.reused == 12 and later.computed == 0
    np.testing.assert_array_equal(again[0], cached[1][0])  # the same kept numbers
    # Another split (another LoRA placement) never reads them: the scorer computes its own.
    other = FrozenPrefix(base.content_hash, split - 1, tc.cache_dtype, lookup)
    assert scorer(one, other).prefix is None
