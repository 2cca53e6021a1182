"""Federated training on the embedded model: global vs local-only accuracy, epsilon, time
per round and bytes per client per round (docs/benchmarks.md, "Federated").

    .venv/bin/python bench/federated.py                 # 10 clients x 100 pairs, 5 rounds
    .venv/bin/python bench/federated.py --pairs-per-client 20 --max-tokens 128   # smaller

Shards are non-IID slices of shared/data/hh_harmless_dev.jsonl (--shard-by topic|length).
Each client's frozen-block activations are computed once and reused by every configuration
listed in --noise-multipliers (0 = clipping only, no DP noise), so the configurations differ
only in the noise. The anchor is each client's local-only model (same local steps in all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--pairs-per-client", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shard-by", choices=["topic", "length"], default="topic")
    ap.add_argument("--noise-multipliers", default="0,1.5", help="comma-separated")
    ap.add_argument("--clipping-norm", type=float, default=0.5)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lora-layers", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--secagg", action="store_true", help="mask updates with SecAgg+")
    ap.add_argument("--base-model", default="builtin:smollm2-135m")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()

    from palate.federation.apps import FederationPlan
    from palate.federation.simulate import (
        load_pairs,
        prepare_clients,
        run_simulation,
        shard_pairs,
    )
    from palate.model.base_model import load_base_model
    from palate.model.local_update import LocalTrainer, model_spec
    from palate.model.reward_model import LoraConfig

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    t0 = time.monotonic()
    base = load_base_model(args.base_model)
    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, layers=args.lora_layers)
    trainer = LocalTrainer(base, lora, max_tokens=args.max_tokens)
    shards = shard_pairs(load_pairs(args.data), args.clients, args.pairs_per_client, args.shard_by)
    prepared = prepare_clients(shards, trainer)
    prep_s = time.monotonic() - t0
    print(f"prepared {args.clients} clients in {prep_s:.0f} s", file=sys.stderr)
    initial = trainer.get_arrays()
    runs = []
    for z in [float(v) for v in args.noise_multipliers.split(",")]:
        trainer.set_arrays(initial)
        plan = FederationPlan(
            federation="bench",
            spec=model_spec(args.base_model, lora),
            rounds=args.rounds,
            clients=args.clients,
            noise_multiplier=z,
            clipping_norm=args.clipping_norm,
            local_steps=args.local_steps,
            lr=args.lr,
            secagg=args.secagg,
        )
        t = time.monotonic()
        result = run_simulation(shards, trainer, plan, prepared=prepared).to_json()
        result["wall_s"] = round(time.monotonic() - t, 1)
        runs.append(result)
        b = result["bytes_per_client_per_round"]
        eps = result["epsilon"]
        print(
            f"z={z:<4g} epsilon={'inf' if eps is None else f'{eps:.2f}':>6}  "
            f"global={result['global_accuracy']:.3f}  "
            f"local-only={result['local_accuracy_mean']:.3f}  "
            f"untrained={result['initial_accuracy']:.3f}  "
            f"{result['seconds_per_round']:.1f} s/round  "
            f"up {b['up'] / 1e6:.2f} MB, down {b['down'] / 1e6:.2f} MB per client per round"
        )
    out = {
        "config": vars(args) | {"data": str(args.data), "json": None},
        "prepare_s": round(prep_s, 1),
        "trainable_parameters": trainer.num_parameters,
        "heldout_pairs": sum(h.pairs for _, h in prepared),
        "runs": runs,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
