"""Quality benchmark: train on 80% of hh_harmless_dev.jsonl, evaluate on the other 20%.

The split is the held-out split's function (evaluation/split.py: sha256 of the first user turn,
salted so it is independent of how the file itself was cut), so no conversation is on both
sides. Validation for early stopping and calibration is carved out of the 80% by the trainer;
the 20% is never looked at before the final number.

Prints accuracy with a 95% Wilson CI next to the always-shorter / always-longer baselines,
wall times (train, eval) and peak RSS, the length effect (length_corr, length-controlled
accuracy, accuracy on chosen-longer / chosen-shorter pairs), and writes the report as JSON
with --json-out.

``--anchor trl`` also trains TRL's RewardTrainer on the same train pairs (same base from the
same GGUF, LoRA r8 on the top 8 blocks, lr 5e-4, 1 epoch; bench/quality_trl.py) in a separate
virtual environment it creates on first use (``--trl-venv``; torch CPU, transformers, trl,
peft, gguf from the package index, versions pinned below), scores the same held-out pairs,
judges both with the same evaluator and prints the Palate/TRL ratios of training time, peak
RSS and accuracy. Both run in one invocation, one after the other, so the ratios share the
machine's state; on a busy machine only the ratios mean anything.

    .venv/bin/python bench/quality.py [--epochs 2 --layers 4 ...] [--anchor trl --limit 60]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from palate.evaluation.gate import GatePolicy, decide  # noqa: E402
from palate.evaluation.heldout import length_effect  # noqa: E402
from palate.evaluation.metrics import pairwise_report  # noqa: E402
from palate.evaluation.split import example_key, split_items  # noqa: E402
from palate.model.base_model import BUILTIN_PREFIX, load_base_model, locate_builtin  # noqa: E402
from palate.model.batching import PairExample  # noqa: E402
from palate.model.training import ProgressEvent, TrainConfig, train_reward_model  # noqa: E402
from palate.runtime.training_child import judge  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"
TRL_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "palate-bench/trl-venv"
#: The anchor's environment, pinned so two runs train the same TRL. torch 2.13.0 CPU.
TRL_PACKAGES = [
    "torch==2.13.0",
    "transformers==5.24.0",
    "trl==1.16.0",
    "peft==0.21.2",
    "gguf==0.19.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
]
#: TRL's setup in issue 15 (already tuned: length-grouped, no gradient checkpointing).
TRL_SETUP = {"layers": 8, "rank": 8, "lr": 5e-4, "epochs": 1, "batch_size": 8}


def trl_python(venv: Path) -> Path:
    """The anchor venv's interpreter, created (python -m venv, pip install) when missing or
    incomplete. Never the project venv: torch and trl stay out of Palate's dependencies."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import torch, transformers, trl, peft, gguf"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    print(f"creating the TRL anchor venv in {venv} (once; a few minutes)", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    subprocess.run(check, check=True)
    return py


def run_trl(
    py: Path, gguf: str, train: list[PairExample], test: list[PairExample], max_tokens: int
) -> dict[str, Any]:
    """bench/quality_trl.py in the anchor venv on the same pairs; its JSON result."""
    job = {
        "gguf": gguf,
        "train": [[p.prompt, p.chosen, p.rejected] for p in train],
        "test": [[p.prompt, p.chosen, p.rejected] for p in test],
        "max_tokens": max_tokens,
        "threads": os.cpu_count() or 2,
        **TRL_SETUP,
    }
    script = Path(__file__).with_name("quality_trl.py")
    proc = subprocess.run(
        [str(py), str(script)], input=json.dumps(job), capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the TRL anchor failed (exit {proc.returncode})")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--layers", type=int, default=TrainConfig.lora_layers)
    ap.add_argument("--rank", type=int, default=TrainConfig.lora_rank)
    ap.add_argument(
        "--depth", type=int, default=TrainConfig.depth,
        help="use only the base's first N blocks (0: all)",
    )  # fmt: skip
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--max-tokens", type=int, default=TrainConfig.max_tokens)
    ap.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens)
    ap.add_argument("--streams", type=int, default=TrainConfig.streams)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pairs (smoke)")
    ap.add_argument(
        "--min-steps",
        type=int,
        default=TrainConfig.min_steps,
        help="Palate's minimum optimizer steps (lower it for a quick --limit smoke)",
    )
    ap.add_argument("--json-out", default="")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON",
        help="any other TrainConfig field, e.g. --set length_balance=true (repeatable)",
    )  # fmt: skip
    ap.add_argument(
        "--anchor",
        choices=["none", "trl"],
        default="none",
        help="also train TRL's RewardTrainer on the same data and print the ratios",
    )
    ap.add_argument("--trl-venv", default=str(TRL_VENV), help="the anchor's virtual env")
    args = ap.parse_args()
    trl_py = trl_python(Path(args.trl_venv)) if args.anchor == "trl" else None

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
        depth=args.depth,
        lora_alpha=2.0 * args.rank,
        lr=args.lr,
        max_tokens=args.max_tokens,
        batch_tokens=args.batch_tokens,
        streams=args.streams,
        min_steps=args.min_steps,
        **{k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.set)},
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
    # The gate's own judging (runtime/training_child.judge): the held-out pairs and, at the
    # very end, the probe set, which stays out of training and of every choice made here.
    metrics, (records, _) = judge(scorer, result.calibration.temperature, test, [])
    eval_s = time.monotonic() - t2
    a = np.array([r.score_chosen for r in records], dtype=np.float64)
    b = np.array([r.score_rejected for r in records], dtype=np.float64)
    decision = decide(metrics, None, GatePolicy())
    probes = metrics.get("probes") or {}
    held_ens = (metrics.get("ensemble") or {}).get("heldout") or {}
    rep = pairwise_report(a, b, [len(p.chosen) for p in test], [len(p.rejected) for p in test])
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    best_base = max(rep.baseline_shorter, rep.baseline_longer)
    lengths = ([len(p.chosen) for p in test], [len(p.rejected) for p in test])
    out: dict[str, Any] = {
        **rep.to_json(),
        **length_effect(a, b, *lengths),
        "beats_best_baseline_by_points": round(100 * (rep.accuracy - best_base), 2),
        "load_s": round(load_s, 1),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "peak_rss_gb": round(rss_gb, 2),
        "train_metrics": result.metrics,
        "gate": {
            "decision": decision.action,
            "reasons": decision.reasons,
            "probes": probes,
            "calibration": metrics.get("calibration"),
            "ensemble_heldout": held_ens,
        },
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
    cats = probes.get("by_category") or {}
    print(
        f"gate (no deployed model): {decision.action}; probes {probes.get('correct')}/"
        f"{probes.get('n')} ("
        + ", ".join(f"{k} {v.get('accuracy', 0):.2f}" for k, v in sorted(cats.items()))
        + ")"
    )
    if trl_py is not None:
        print("\nTRL anchor: RewardTrainer on the same pairs ...", flush=True)
        t3 = time.monotonic()
        gguf = str(locate_builtin(config.base_model.removeprefix(BUILTIN_PREFIX)))
        trl = run_trl(trl_py, gguf, train, test, config.max_tokens)
        trl_rep = pairwise_report(trl["chosen"], trl["rejected"], *lengths)
        trl_rss = trl["peak_rss_kb"] / 1024**2
        trl_out = {
            **trl_rep.to_json(),
            **length_effect(trl["chosen"], trl["rejected"], *lengths),
            "setup": TRL_SETUP,
            "train_pairs": trl["train_pairs"],
            "train_s": round(trl["train_s"], 1),
            "load_s": round(trl["load_s"], 1),
            "peak_rss_gb": round(trl_rss, 2),
            "wall_s": round(time.monotonic() - t3, 1),
        }
        ratios = {
            "train_time": _ratio(train_s, trl["train_s"]),
            "peak_rss": _ratio(rss_gb, trl_rss),
            "accuracy": _ratio(rep.accuracy, trl_rep.accuracy),
            "length_controlled_accuracy": _ratio(
                out["length_controlled_accuracy"], trl_out["length_controlled_accuracy"]
            ),
        }
        out["trl"] = trl_out
        out["palate_over_trl"] = ratios
        print(json.dumps({"trl": trl_out, "palate_over_trl": ratios}, indent=2))
        print(
            f"\nTRL accuracy {trl_rep.accuracy:.3f} [{trl_rep.ci_low:.3f}, {trl_rep.ci_high:.3f}]"
            f"  train {trl['train_s'] / 60:.1f} min  peak RSS {trl_rss:.2f} GB\n"
            f"Palate / TRL: train time {ratios['train_time']}x (goal <= 0.5), peak RSS "
            f"{ratios['peak_rss']}x, accuracy {ratios['accuracy']}x"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
