"""The length levers of issue 15 on one cached slice of HH-harmless, chosen on validation data.

Trains the default reward model on the first ``--limit`` dev pairs minus a held-out 20% (the
bench split of bench/quality.py), then each length lever on the *same* frozen-prefix cache
(``train_reward_model(prefix=...)``), so the levers differ only in the top-block training.
For each it prints the validation split's length effect (what the default is chosen on:
``length_controlled_accuracy``, ``accuracy_chosen_longer``, ``length_corr``, val loss), the
held-out 20%'s figures for information, and the top-block training time as a ratio of the
plain run's (wall-clock ratios within one run; absolute times on a busy machine mean nothing).
The probe set is never scored here: it stays out of every choice (docs/evaluation.md).

    .venv/bin/python bench/length_levers.py --limit 400 [--json-out F]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from palate.evaluation.heldout import length_effect  # noqa: E402
from palate.evaluation.split import example_key, split_items  # noqa: E402
from palate.model.base_model import load_base_model  # noqa: E402
from palate.model.batching import PairExample  # noqa: E402
from palate.model.scoring import Scorer  # noqa: E402
from palate.model.training import TrainConfig, train_reward_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"
LEVERS: dict[str, dict[str, Any]] = {
    "plain": {},
    "length_balance": {"length_balance": True},
    "length_head+decorr": {"length_head": True, "length_decorr": 5.0},
}


def _round(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=400, help="first N pairs of the file")
    ap.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens)
    ap.add_argument("--val-fraction", type=float, default=0.2, help="validation share")
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated subset")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh][: args.limit]
    pairs = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    dealt = split_items(pairs, key=example_key, fraction=0.2, salt="palate-bench:")
    train, test = dealt.train, dealt.heldout
    base = load_base_model(TrainConfig.base_model)
    config = TrainConfig(max_tokens=args.max_tokens, val_fraction=args.val_fraction)
    print(f"train {len(train)} pairs (validation {args.val_fraction:.0%} of them), "
          f"held out {len(test)}", flush=True)  # fmt: skip
    out: dict[str, Any] = {"limit": args.limit, "train": len(train), "heldout": len(test)}
    prefix = None
    plain_s = None
    for name in args.levers.split(","):
        cfg = replace(config, **LEVERS[name])
        t0 = time.monotonic()
        res = train_reward_model(train, cfg, base=base, prefix=prefix)
        prefix = res.prefix
        train_s = res.metrics["timings_s"]["train"]
        plain_s = plain_s or train_s
        scorer = Scorer(res.model, base.tokenizer, cfg.max_tokens, res.calibration)
        a, b = scorer.score_pairs([(p.prompt, p.chosen, p.rejected) for p in test])
        held = length_effect(a, b, [len(p.chosen) for p in test], [len(p.rejected) for p in test])
        row = {
            "validation": _round(res.metrics["validation_length"]),
            "val_loss": round(res.metrics["val_loss"], 4),
            "val_acc": round(res.metrics["calibration_acc"], 4),
            "heldout": {"accuracy": round(float((a > b).mean()), 4), **(_round(held) or {})},
            "best_step": res.metrics["best_step"],
            "steps": res.metrics["steps"],
            "train_time_ratio_vs_plain": round(train_s / max(plain_s, 1e-9), 3),
            "length_head_weight": res.metrics["length_head_weight"],
            "wall_s_busy_machine": round(time.monotonic() - t0, 1),
        }
        out[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
