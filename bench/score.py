"""Scoring throughput of the embedded model (SmolLM2-135M), tokens/s of the scored sequences.

Rows, all in one run on the same HH pairs (each pair = prompt+chosen and prompt+rejected):

- anchor: plain mlx-lm forward of the concatenated sequences (``model.model(tokens)``) +
  head, i.e. what a naive MLX reward model does (right-padded batch, one pass per row);
- palate Scorer, numpy CPU forward (the default on a CPU): prompt-grouped forward (prompt
  once per pair), the final block at the pooled position only, in numpy (palate.model.cpu_forward)
  with its batch split over the cores;
- palate Scorer, MLX forward, 1 or 2 streams: the same grouped forward in MLX;
- with ``--no-openblas-child``: skip re-running the anchor in a child with PALATE_OPENBLAS=0
  (MLX's bundled reference BLAS), which is slow, so it uses a quarter of the pairs.

- with ``--torch-python PATH``: PyTorch + transformers on the same GGUF weights and the same
  token sequences (bench/score_torch.py, run under an interpreter that has torch; torch is
  never installed into the project venv).

    .venv/bin/python bench/score.py [--pairs 16] [--torch-python /tmp/torchvenv/bin/python]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from palate.model.base_model import load_base_model  # noqa: E402
from palate.model.batching import PairExample, encode_examples  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel, configure_cpu_threads  # noqa: E402
from palate.model.scoring import Scorer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def plain_rate(pairs: int, max_tokens: int) -> tuple[float, int]:
    """Anchor: mlx-lm's forward over the full right-padded sequences, tokens/s."""
    base = load_base_model("builtin:smollm2-135m")
    with DATA.open() as fh:
        rows = [json.loads(next(fh)) for _ in range(pairs)]
    ex = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    groups, _ = encode_examples(ex, base.tokenizer, max_tokens)
    seqs = sorted((np.concatenate([g.prompt, r]) for g in groups for r in g.responses), key=len)
    rm = RewardModel(base.model, LoraConfig(layers=4), seed=0)
    n_tok = sum(len(s) for s in seqs)
    t = time.perf_counter()
    for i in range(0, len(seqs), 8):  # length-sorted batches of 8, like the Scorer's budget
        chunk = seqs[i : i + 8]
        arr = np.zeros((len(chunk), max(map(len, chunk))), np.int32)
        for k, s in enumerate(chunk):
            arr[k, : len(s)] = s
        mx.eval(rm.reference_rewards(mx.array(arr), mx.array([len(s) for s in chunk])))
    return n_tok / (time.perf_counter() - t), n_tok


def _sequences(base: object, pairs: int, max_tokens: int) -> list[list[int]]:
    """The exact token sequences the anchor scores (prompt + response, truncated alike)."""
    with DATA.open() as fh:
        rows = [json.loads(next(fh)) for _ in range(pairs)]
    ex = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    groups, _ = encode_examples(ex, base.tokenizer, max_tokens)  # type: ignore[attr-defined]
    return [np.concatenate([g.prompt, r]).tolist() for g in groups for r in g.responses]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-openblas-child", action="store_true")
    ap.add_argument(
        "--torch-python",
        help="interpreter with torch+transformers for the PyTorch row (bench/score_torch.py)",
    )
    args = ap.parse_args()
    if args.child:
        rate, n = plain_rate(args.pairs, args.max_tokens)
        print(json.dumps({"rate": rate, "tokens": n}))
        return

    anchor, n_tok = plain_rate(args.pairs, args.max_tokens)
    base = load_base_model("builtin:smollm2-135m")
    with DATA.open() as fh:
        rows = [json.loads(next(fh)) for _ in range(args.pairs)]
    items = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    results = {"mlx-lm plain forward + head (anchor)": anchor}
    runs = [("palate Scorer, numpy CPU forward (default)", 1, True)]
    runs += [(f"palate Scorer, MLX forward, {n} stream(s)", n, False) for n in (1, 2)]
    for name, streams, cpu_forward in runs:
        rm = RewardModel(base.model, LoraConfig(layers=4), seed=0)
        configure_cpu_threads(streams)
        sc = Scorer(
            rm,
            base.tokenizer,
            args.max_tokens,
            token_budget=4096,
            n_streams=streams,
            cpu_forward=cpu_forward,
        )
        sc.score_pairs(items[:2])  # warm-up
        t = time.perf_counter()
        sc.score_pairs(items)
        results[name] = n_tok / (time.perf_counter() - t)
    if args.torch_python:
        from palate.model.base_model import locate_builtin

        seqs = _sequences(base, args.pairs, args.max_tokens)
        job = {"gguf": str(locate_builtin("smollm2-135m")), "seqs": seqs, "threads": 2}
        out = subprocess.run(
            [args.torch_python, str(Path(__file__).with_name("score_torch.py"))],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            check=True,
        )
        results["PyTorch + transformers, same weights"] = json.loads(
            out.stdout.strip().splitlines()[-1]
        )["rate"]
    if not args.no_openblas_child:
        env = dict(os.environ, PALATE_OPENBLAS="0")
        out = (
            subprocess.run(
                [sys.executable, __file__, "--child", "--pairs", str(max(1, args.pairs // 4))],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        results["mlx-lm plain, bundled reference BLAS"] = json.loads(out)["rate"]
    print(f"{2 * args.pairs} sequences, {n_tok} tokens (each pair = 2 full sequences)")
    for name, rate in results.items():
        print(f"{name:40s} {rate:8.1f} tok/s   {rate / anchor:5.2f}x")


if __name__ == "__main__":
    main()
