"""Training throughput: Palate reward-model step vs an mlx_lm.lora-style SFT step.

Same base (the embedded SmolLM2-135M), same HH sequences (each pair = prompt+chosen and
prompt+rejected), same LoRA config (rank, scale, top K blocks). Throughput is counted in
the anchor's unit: tokens of the full sequences a step covers.

- anchor: mlx-lm SFT step: ``mlx_lm.tuner.trainer.default_loss`` (LM head + cross-entropy)
  through ``nn.value_and_grad``, LoRA via ``linear_to_lora_layers``, right-padded batch.
- palate (uncached): the reward model's prompt-grouped forward, BT loss, backward.
- palate (cached): the same step from the frozen-prefix cache (top K blocks only); the
  one-off cache build is reported separately and amortised over 2 epochs.

Anchor and subjects are interleaved and the median of the repeats is used, because the
machine's 2 cores are shared (other jobs make single timings noisy).

    .venv/bin/python bench/train_step.py [--pairs 8 --layers 4 --rank 16 --repeats 3]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

from palate.model.base_model import load_base_model  # noqa: E402
from palate.model.batching import PairExample, collate, encode_examples  # noqa: E402
from palate.model.losses import LossInputs, preference_loss  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel, configure_cpu_threads  # noqa: E402
from palate.model.scoring import batch_arrays, make_streams  # noqa: E402
from palate.model.training import build_prefix_cache  # noqa: E402


def set_blas_threads(n: int) -> None:
    """Anchor runs with BLAS on both cores (its best setting); Palate's streams with one each."""
    import ctypes
    import os

    try:
        lib = ctypes.CDLL("libopenblas.so.0", mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        lib.openblas_set_num_threads(n)
    except (OSError, AttributeError):
        pass


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=2)
    args = ap.parse_args()

    base = load_base_model("builtin:smollm2-135m")
    with DATA.open() as fh:
        rows = [json.loads(next(fh)) for _ in range(args.pairs)]
    ex = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    groups, _ = encode_examples(ex, base.tokenizer, args.max_tokens)
    seqs = [np.concatenate([g.prompt, r]) for g in groups for r in g.responses]
    seq_tokens = sum(len(s) for s in seqs)
    L = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    lengths = mx.array([[0, len(s)] for s in seqs])
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, layers=args.layers)

    # Anchor: mlx-lm SFT on its own copy of the base.
    sft_base = load_base_model("builtin:smollm2-135m").model
    sft_base.freeze()
    linear_to_lora_layers(
        sft_base, args.layers, {"rank": lora.rank, "scale": lora.scale, "dropout": 0.0}
    )
    sft_grad = nn.value_and_grad(sft_base, default_loss)
    batch = mx.array(tokens)

    def sft_step() -> None:
        set_blas_threads(os.cpu_count() or 1)
        (loss, _), g = sft_grad(sft_base, batch, lengths)
        mx.eval(loss, g)

    configure_cpu_threads(args.streams)
    streams = make_streams(args.streams)
    rm = RewardModel(base.model, lora, seed=0)
    from palate.model.batching import split_batch

    def loss_fn(
        m: RewardModel, arrays: tuple[mx.array, ...], li: LossInputs, start: int
    ) -> mx.array:
        r = m.forward_groups(*arrays, start=start)
        assert not isinstance(r, tuple)
        return preference_loss(r, li, 0.0, 0.01, float(len(groups)), float(len(seqs))).loss

    rm_grad = nn.value_and_grad(rm, loss_fn)
    t0 = time.perf_counter()
    hidden = build_prefix_cache(rm, groups, 1 << 20, streams, "float16")
    cache_s = time.perf_counter() - t0

    def shard_inputs(h: object) -> list[tuple[tuple[mx.array, ...], LossInputs]]:
        out = []
        for shard in split_batch(list(range(len(groups))), groups, len(streams)):
            b = collate(groups, shard, h)  # type: ignore[arg-type]
            li = LossInputs(
                *(
                    mx.array(x)
                    for x in (
                        b.pair_idx,
                        b.margin,
                        b.pair_weight,
                        b.rating_idx,
                        b.label,
                        b.rating_weight,
                    )
                )
            )
            out.append((batch_arrays(b), li))
        return out

    plain_in, cached_in = shard_inputs(None), shard_inputs(hidden)

    def rm_step(inputs: list[tuple[tuple[mx.array, ...], LossInputs]], start: int) -> None:
        # One shard per stream, as the trainer does; the grads of the shards are summed.
        configure_cpu_threads(len(streams))
        outs = []
        for (arr, li), s in zip(inputs, streams, strict=False):
            with mx.stream(s):
                outs.append(rm_grad(rm, arr, li, start))
        mx.eval(outs)

    subjects = {
        "mlx_lm SFT (anchor)": sft_step,
        "palate RM, uncached": lambda: rm_step(plain_in, 0),
        "palate RM, cached": lambda: rm_step(cached_in, rm.split),
    }
    times: dict[str, list[float]] = {k: [] for k in subjects}
    for f in subjects.values():
        f()  # warm-up
    for _ in range(args.repeats):
        for name, f in subjects.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    anchor = statistics.median(times["mlx_lm SFT (anchor)"])
    print(
        f"{len(seqs)} sequences, {seq_tokens} tokens (padded {tokens.size}), "
        f"LoRA r{lora.rank} on top {lora.layers} blocks"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:26s} {seq_tokens / med:8.1f} tok/s   {anchor / med:5.2f}x   "
            f"(median of {[round(t, 2) for t in ts]} s)"
        )
    amort = statistics.median(times["palate RM, cached"]) + cache_s / 2
    print(
        f"{'palate RM, cached+build/2':26s} {seq_tokens / amort:8.1f} tok/s   "
        f"{anchor / amort:5.2f}x   (cache build {cache_s:.2f} s amortised over 2 epochs)"
    )


if __name__ == "__main__":
    main()
