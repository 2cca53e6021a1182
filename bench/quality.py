"""Quality benchmark: train on 80% of hh_harmless_dev.jsonl, evaluate on the other 20%.

The split is the held-out split's function (evaluation/split.py: sha256 of the first user turn,
salted so it is independent of how the file itself was cut), so no conversation is on both
sides. Validation for early stopping and calibration is carved out of the 80% by the trainer;
the 20% is never looked at before the final number.

Prints accuracy with a 95% Wilson CI next to the always-shorter / always-longer baselines,
wall times (train, eval) and peak RSS, and writes the report as JSON with --json-out.

    .venv/bin/python bench/quality.py [--epochs 2 --layers 4 ...]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from palate.evaluation.metrics import pairwise_report  # noqa: E402
from palate.evaluation.split import example_key, split_items  # noqa: E402
from palate.model.base_model import load_base_model  # noqa: E402
from palate.model.batching import PairExample  # noqa: E402
from palate.model.training import ProgressEvent, TrainConfig, train_reward_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--layers", type=int, default=TrainConfig.lora_layers)
    ap.add_argument("--rank", type=int, default=TrainConfig.lora_rank)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens)
    ap.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens)
    ap.add_argument("--streams", type=int, default=TrainConfig.streams)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pairs (smoke)")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()

    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if args.limit:
        rows = rows[: args.limit]
    pairs = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    # The held-out split's own function (first user turn as the key), salted for this bench.
    dealt = split_items(pairs, key=example_key, fraction=0.2, salt="palate-bench:")
    test, train = dealt.heldout, dealt.train
    config = TrainConfig(
        epochs=args.epochs,
        lora_layers=args.layers,
        lora_rank=args.rank,
        lora_alpha=2.0 * args.rank,
        lr=args.lr,
        max_tokens=args.max_tokens,
        batch_tokens=args.batch_tokens,
        streams=args.streams,
    )
    print(
        f"train {len(train)} pairs, eval {len(test)} pairs; config {config.to_json()}", flush=True
    )
    t0 = time.monotonic()
    base = load_base_model(config.base_model)
    load_s = time.monotonic() - t0

    last = [0.0]

    def progress(e: ProgressEvent) -> None:
        now = time.monotonic()
        if e.phase in ("validate", "done") or now - last[0] > 30:
            last[0] = now
            print(
                f"  [{now - t0:7.1f}s] {e.phase} {e.step}/{e.total} loss={e.loss} acc={e.acc} "
                f"tok/s={e.tokens_per_s} eta={e.eta_s}",
                flush=True,
            )

    t1 = time.monotonic()
    result = train_reward_model(train, config, progress=progress, base=base)
    train_s = time.monotonic() - t1
    from palate.model.scoring import Scorer

    scorer = Scorer(
        result.model,
        base.tokenizer,
        config.max_tokens,
        result.calibration,
        token_budget=config.batch_tokens,
        n_streams=config.streams,
    )
    t2 = time.monotonic()
    a, b = scorer.score_pairs([(p.prompt, p.chosen, p.rejected) for p in test])
    eval_s = time.monotonic() - t2
    rep = pairwise_report(a, b, [len(p.chosen) for p in test], [len(p.rejected) for p in test])
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    best_base = max(rep.baseline_shorter, rep.baseline_longer)
    out = {
        **rep.to_json(),
        "beats_best_baseline_by_points": round(100 * (rep.accuracy - best_base), 2),
        "load_s": round(load_s, 1),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "peak_rss_gb": round(rss_gb, 2),
        "train_metrics": result.metrics,
        "data": result.data_summary,
        "config": config.to_json(),
    }
    print(json.dumps(out, indent=2))
    print(
        f"\naccuracy {rep.accuracy:.3f} [{rep.ci_low:.3f}, {rep.ci_high:.3f}] n={rep.n}  "
        f"always-shorter {rep.baseline_shorter:.3f}  always-longer {rep.baseline_longer:.3f}  "
        f"ratio vs best baseline {rep.accuracy / max(best_base, 1e-9):.3f}x  "
        f"train {train_s / 60:.1f} min  eval {eval_s / 60:.1f} min  peak RSS {rss_gb:.2f} GB"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
