"""The frozen blocks' outputs: computed once per example, shared, and kept across nights.

LoRA sits on the top blocks only, so blocks ``[0, split)`` compute the same activations for
an example whatever was trained above them. Three users of that fact live here:

- training (model/training.py) runs every example through the frozen blocks once and trains
  the top blocks on the kept outputs (:func:`build_prefix_cache`);
- a nightly run keeps those outputs in the encrypted store under :func:`frozen_key`, so a
  later night sends only its new examples through the frozen blocks;
- the gate scores the held-out set and the probes with the candidate *and* the deployed
  model: with a :class:`FrozenPrefix` both read one frozen pass (and the held-out examples'
  outputs are kept for later nights too), so judging costs the top blocks twice plus one
  frozen pass over what is new, instead of two full passes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from palate.model.batching import EncodedGroup, bucket_batches, collate, split_batch
from palate.model.cpu_forward import CpuEngine
from palate.model.reward_model import RewardModel
from palate.model.scoring import batch_arrays

__all__ = [
    "EMPTY_HIDDEN",
    "FrozenPrefix",
    "Hidden",
    "build_prefix_cache",
    "frozen_key",
    "pack_hidden",
    "unpack_hidden",
]

Hidden = list[tuple[np.ndarray, list[np.ndarray]]]
EMPTY_HIDDEN: tuple[np.ndarray, list[np.ndarray]] = (np.zeros((0, 0), np.float32), [])


def frozen_key(group: EncodedGroup, base_hash: str, split: int, dtype: str) -> str:
    """The key of one example's frozen-prefix activations across runs (nights).

    The outputs of blocks ``[0, split)`` depend only on the base weights (``base_hash``, the
    sha256 of the weight file), the split, the storage dtype and the token ids (which already
    carry the tokenizer, the chat template and the truncation to ``max_tokens``); so the same
    key means the same activations, and a new base model means new keys: nothing stale is
    ever reused.
    """
    h = hashlib.sha256(f"palate-frozen:v1|{base_hash}|{split}|{dtype}|".encode())
    for arr in (group.prompt, *group.responses):
        ids = np.ascontiguousarray(arr, dtype=np.int32)
        h.update(len(ids).to_bytes(4, "little"))
        h.update(ids.tobytes())
    return h.hexdigest()


def pack_hidden(entry: tuple[np.ndarray, list[np.ndarray]]) -> bytes:
    """One example's frozen activations as bytes (npz, no pickle) for a store outside the
    model layer; :func:`unpack_hidden` reads them back exactly."""
    buf = io.BytesIO()
    np.savez(buf, entry[0], *entry[1])  # arr_0: the prompt, arr_1...: the responses
    return buf.getvalue()


def unpack_hidden(blob: bytes) -> tuple[np.ndarray, list[np.ndarray]]:
    """The inverse of :func:`pack_hidden`."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return z["arr_0"], [z[f"arr_{i}"] for i in range(1, len(z.files))]


def build_prefix_cache(
    model: RewardModel,
    groups: Sequence[EncodedGroup],
    token_budget: int,
    streams: Sequence[Any],
    dtype: str = "float16",
    progress: Callable[[int, int, int], None] | None = None,
    engine: CpuEngine | None = None,
) -> Hidden:
    """Outputs of the frozen blocks ``[0, model.split)`` for every group, unpadded.

    float16 halves memory (about 0.5 GB for 1.5k HH pairs); a batch whose activations
    would overflow float16 is kept in float32. With ``engine`` the blocks run in numpy.
    """
    np_dtype = np.float16 if dtype == "float16" else np.float32
    out: Hidden = [(np.zeros((0, 0), np.float32), [])] * len(groups)
    done = 0
    for index in bucket_batches(groups, token_budget):
        results: list[tuple[Any, Any, Any]] = []
        if engine is not None:
            b = collate(groups, index)
            hidden = engine.forward_groups(
                b.prompt, b.prompt_len, b.response, b.response_len, b.group, end=model.split
            )
            assert isinstance(hidden, tuple)
            results.append((index, hidden[0], hidden[1]))
        else:
            for shard, stream in zip(
                split_batch(index, groups, len(streams)), streams, strict=False
            ):
                with mx.stream(stream):
                    hp, hr = model.forward_groups(
                        *batch_arrays(collate(groups, shard)), start=0, end=model.split
                    )
                results.append((shard, hp, hr))
            mx.eval([(hp, hr) for _, hp, hr in results])
        for shard, hp, hr in results:
            hp_np, hr_np = np.asarray(hp), np.asarray(hr)
            peak = max(float(np.abs(hp_np).max()), float(np.abs(hr_np).max()))
            store = np_dtype if peak < 60000 else np.float32
            hp_np, hr_np = hp_np.astype(store), hr_np.astype(store)
            row = 0
            for k, i in enumerate(shard):
                g = groups[i]
                p = hp_np[k, : len(g.prompt)].copy()
                rs = []
                for r in g.responses:
                    rs.append(hr_np[row, : len(r)].copy())
                    row += 1
                out[i] = (p, rs)
            done += sum(groups[i].cost for i in shard)
        if progress is not None:
            progress(done, len(index), sum(groups[i].cost for i in index))
    return out


def _nbytes(entry: tuple[np.ndarray, list[np.ndarray]]) -> int:
    return int(entry[0].nbytes + sum(r.nbytes for r in entry[1]))


class FrozenPrefix:
    """Frozen-block outputs for scoring, by :func:`frozen_key`, shared by every model on
    one base and split (the gate's candidate and deployed model), read from ``lookup``
    (the store's cache of earlier nights) where it has them.

    A :class:`~palate.model.scoring.Scorer` given one runs only its own top blocks on them.
    What this run computed is kept in memory up to ``max_bytes`` (beyond that it is
    recomputed when asked again, never dropped silently from a result) and listed by
    :meth:`fresh` for the caller to keep for later nights.
    """

    def __init__(
        self,
        base_hash: str,
        split: int,
        dtype: str = "float16",
        lookup: Callable[[str], bytes | None] | None = None,
        max_bytes: int = 1 << 30,
    ) -> None:
        self.base_hash, self.split, self.dtype = base_hash, split, dtype
        self.lookup = lookup
        self.max_bytes = max_bytes
        self._memo: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
        self._fresh: list[str] = []
        self._bytes = 0
        #: Examples read from ``lookup`` / found in memory / run through the frozen blocks.
        self.reused = 0
        self.shared = 0
        self.computed = 0

    def hidden(
        self,
        model: RewardModel,
        groups: Sequence[EncodedGroup],
        token_budget: int,
        streams: Sequence[Any],
        engine: CpuEngine | None = None,
    ) -> Hidden:
        """The frozen outputs of every group, in order; the missing ones are computed with
        ``model``'s frozen blocks (on ``engine`` where given)."""
        keys = [frozen_key(g, self.base_hash, self.split, self.dtype) for g in groups]
        out: Hidden = [EMPTY_HIDDEN] * len(groups)
        todo: list[int] = []
        for i, k in enumerate(keys):
            if k in self._memo:
                out[i] = self._memo[k]
                self.shared += 1
                continue
            blob = self.lookup(k) if self.lookup is not None else None
            if blob is None:
                todo.append(i)
                continue
            out[i] = unpack_hidden(blob)
            self.reused += 1
            self._remember(k, out[i], fresh=False)
        if todo:
            built = build_prefix_cache(
                model, [groups[i] for i in todo], token_budget, streams, self.dtype, None, engine
            )
            for i, entry in zip(todo, built, strict=True):
                out[i] = entry
                self._remember(keys[i], entry, fresh=True)
            self.computed += len(todo)
        return out

    def _remember(self, key: str, entry: tuple[np.ndarray, list[np.ndarray]], fresh: bool) -> None:
        size = _nbytes(entry)
        if key in self._memo or self._bytes + size > self.max_bytes:
            return
        self._memo[key] = entry
        self._bytes += size
        if fresh:
            self._fresh.append(key)

    def fresh(self) -> list[tuple[str, tuple[np.ndarray, list[np.ndarray]]]]:
        """(key, outputs) computed by this run and still in memory: what to keep."""
        return [(k, self._memo[k]) for k in self._fresh if k in self._memo]

    def stats(self) -> dict[str, int]:
        return {"reused": self.reused, "shared": self.shared, "computed": self.computed}
