"""Best-of-N with Palate: generate N candidates locally, let the daemon pick.

    .venv/bin/python examples/best_of_n.py "How do I center a div?" -n 4

Generates with mlx-lm from a local model (default: the embedded SmolLM2-135M that Palate
ships with; any spec `palate.model.base_model.load_base_model` accepts works), asks the running
daemon to rerank, and prints the candidates best-first. Needs a deployed model
(`palate train --wait` after some feedback).
"""

from __future__ import annotations

import argparse
import sys

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

from mlx_lm import generate  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from palate.errors import PalateError  # noqa: E402
from palate.model.base_model import DEFAULT_BASE_MODEL, load_base_model  # noqa: E402
from palate.wire.client import Client  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("-n", type=int, default=4, help="candidates to generate")
    ap.add_argument("--model", default=DEFAULT_BASE_MODEL, help="generator model spec")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temp", type=float, default=0.8, help="sampling temperature")
    args = ap.parse_args()

    base = load_base_model(args.model)
    chat = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
    )
    sampler = make_sampler(temp=args.temp)
    candidates = [
        generate(base.model, base.tokenizer, chat, max_tokens=args.max_tokens, sampler=sampler)
        for _ in range(args.n)
    ]
    try:
        with Client() as c:
            r = c.rerank(args.prompt, candidates)
    except PalateError as e:
        print(f"palate: {e.message}", file=sys.stderr)
        return 1
    print(f"model version {r['version']}, confident: {r['confident']}")
    for rank, i in enumerate(r["order"], 1):
        print(f"\n#{rank}  p_best={r['p_best'][i]:.2f}  score={r['scores'][i]:+.3f}\n"
              f"{candidates[i].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
