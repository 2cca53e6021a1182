"""Ensembles on a small HH slice: single model vs K heads vs K top-block LoRAs, and the
active-learning curve of the review queue (disagreement vs random).

Small on purpose (the machine is 2 loaded cores): a slice of hh_harmless_dev.jsonl split by
the held-out split's function, short sequences, few steps. Every variant trains on ONE
frozen-prefix cache (the lower blocks do not depend on LoRA or heads) and is scored on the
test pairs from one cached prefix too, so the figures compare the variants' own costs:

- ``single``: the plain model (1 head), seed 0. Its wall time (encode + cache + train) is the
  anchor of every time ratio.
- ``heads``: K heads on the shared trunk, each on its own Poisson bootstrap resample (what
  Palate ships, ``TrainConfig.members``); cost = the single run's encode + cache + its own
  training.
- ``loras``: K separately trained top-block LoRAs (seeds 0..K-1, member 0 is ``single``);
  cost = encode + cache + K trainings.

Printed per variant: accuracy, selective accuracy at 50% coverage (the most confident half,
confidence = the members' lower bound of the margin), ECE, training time and its ratio to
single, accuracy per minute of training.

``--step-ratio``: the cost of one optimizer step of K heads vs one head on the same cached
batch (forward, loss, backward and AdamW update of the top blocks), interleaved repeats,
median: the per-step training cost ratio without the noise of whole runs on a loaded machine.

``--active-learning``: a pool of unlabelled training pairs; start from ``--seed-labels``
random labels, then ``--rounds`` times reveal ``--batch`` more labels (from the file) chosen
by the ensemble's disagreement (BALD information, model/ensemble.py) or at random, retrain,
and score the test pairs. Prints accuracy vs labels for both strategies.

    .venv/bin/python bench/ensemble.py [--train 120 --test 100 --members 5 --loras 3]
    .venv/bin/python bench/ensemble.py --active-learning [--seed-labels 16 --batch 16]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from palate.evaluation.selective import selective_report  # noqa: E402
from palate.evaluation.split import example_key, split_items  # noqa: E402
from palate.model import training  # noqa: E402
from palate.model.base_model import load_base_model  # noqa: E402
from palate.model.batching import PairExample, encode_examples  # noqa: E402
from palate.model.cpu_forward import CpuEngine, default_threads  # noqa: E402
from palate.model.ensemble import pair_information  # noqa: E402
from palate.model.scoring import group_rewards, make_streams  # noqa: E402
from palate.model.training import TrainConfig, TrainResult, train_reward_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def member_rewards(model: Any, groups: list[Any], hidden: Any, budget: int) -> np.ndarray:
    """(n, 2, K) member rewards of cached pairs (top blocks only, numpy engine)."""
    engine = CpuEngine(model, threads=default_threads())
    try:
        out = group_rewards(model, groups, budget, make_streams(1), hidden, engine)
    finally:
        engine.close()
    r = np.stack([np.asarray(x) for x in out])
    return r if r.ndim == 3 else r[:, :, None]


def train_time(res: TrainResult) -> float:
    """Training proper (set-up and the top blocks), without encode and cache."""
    t = res.metrics["timings_s"]
    return float(t["total"] - t["prefix_cache"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--train", type=int, default=120, help="training pairs (the pool)")
    ap.add_argument("--test", type=int, default=100, help="test pairs")
    ap.add_argument("--members", type=int, default=5, help="heads of the heads ensemble")
    ap.add_argument("--loras", type=int, default=3, help="LoRAs of the LoRA ensemble (0: skip)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per training")
    ap.add_argument("--batch-tokens", type=int, default=1536)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--active-learning", action="store_true")
    ap.add_argument("--step-ratio", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed-labels", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()

    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    pairs = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    dealt = split_items(pairs, key=example_key, fraction=0.3, salt="palate-bench:")
    pool, test = dealt.train[: args.train], dealt.heldout[: args.test]
    config = TrainConfig(
        lora_layers=args.layers,
        max_tokens=args.max_tokens,
        batch_tokens=args.batch_tokens,
        lr=args.lr,
        epochs=1,
        min_steps=args.steps,
        eval_every=0,
        val_fraction=0.1,
        members=1,
    )
    print(
        f"{len(pool)} training pairs, {len(test)} test pairs; layers {args.layers}, "
        f"max_tokens {args.max_tokens}, >= {args.steps} steps; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    base = load_base_model(config.base_model)
    if args.step_ratio:
        print(json.dumps(step_ratio(base, pool[:24], config, args.members, args.repeats)))
        return 0
    t0 = time.monotonic()
    single = train_reward_model(pool, config, base=base)
    single_s = time.monotonic() - t0
    assert single.prefix is not None
    setup_s = single_s - train_time(single)  # encode + frozen-prefix cache, shared by all
    print(f"single: {single_s:.1f} s ({setup_s:.1f} s encode + cache)", flush=True)

    # The test pairs: encoded and cached once (the lower blocks are the same for every model).
    t0 = time.monotonic()
    test_groups, _ = encode_examples(test, base.tokenizer, config.max_tokens)
    engine = CpuEngine(single.model, threads=default_threads())
    test_hidden = training.build_prefix_cache(
        single.model, test_groups, config.batch_tokens, make_streams(1), engine=engine
    )
    engine.close()
    print(f"test cache: {time.monotonic() - t0:.1f} s", flush=True)

    def judge(name: str, r: np.ndarray, temperature: float, train_s: float) -> dict[str, Any]:
        rep = selective_report(r[:, 0, :], r[:, 1, :], temperature)
        out = {
            "variant": name,
            "members": rep["members"],
            "accuracy": rep["accuracy"],
            "selective_accuracy_50": rep["selective_accuracy_50"],
            "ece": rep["ece"],
            "train_s": round(train_s, 1),
            "time_ratio": round(train_s / single_s, 3),
            "accuracy_per_min": round(rep["accuracy"] / (train_s / 60), 4),
        }
        print(json.dumps(out), flush=True)
        return out

    if args.active_learning:
        report: dict[str, Any] = {
            "active_learning": active_learning(
                args, config, base, pool, single, test_groups, test_hidden
            )
        }
    else:
        results = [
            judge(
                "single",
                member_rewards(single.model, test_groups, test_hidden, config.batch_tokens),
                single.calibration.temperature,
                single_s,
            )
        ]
        t0 = time.monotonic()
        heads = train_reward_model(
            pool,
            TrainConfig(**{**config.to_json(), "members": args.members}),
            base=base,
            prefix=single.prefix,
        )
        heads_s = setup_s + (time.monotonic() - t0)
        results.append(
            judge(
                f"heads x{args.members}",
                member_rewards(heads.model, test_groups, test_hidden, config.batch_tokens),
                heads.calibration.temperature,
                heads_s,
            )
        )
        if args.loras > 1:
            models, loras_s = [single], single_s
            for seed in range(1, args.loras):
                t0 = time.monotonic()
                models.append(
                    train_reward_model(
                        pool,
                        TrainConfig(**{**config.to_json(), "seed": seed}),
                        base=base,
                        prefix=single.prefix,
                    )
                )
                loras_s += time.monotonic() - t0
            r = np.concatenate(
                [
                    member_rewards(m.model, test_groups, test_hidden, config.batch_tokens)
                    for m in models
                ],
                axis=2,
            )
            temp = float(np.mean([m.calibration.temperature for m in models]))
            results.append(judge(f"loras x{args.loras}", r, temp, loras_s))
        report = {"variants": results}
    report["slice"] = {"train": len(pool), "test": len(test), "config": config.to_json()}
    report["load_average"] = os.getloadavg()[0]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def step_ratio(
    base: Any, pairs: list[PairExample], config: TrainConfig, members: int, repeats: int
) -> dict[str, Any]:
    """Median seconds of one training step with 1 head and with ``members`` heads on one
    cached batch, measured interleaved (A B A B ...) so load drifts hit both alike."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from palate.model.batching import collate
    from palate.model.ensemble import bootstrap_weights
    from palate.model.losses import ensemble_loss, preference_loss
    from palate.model.reward_model import RewardModel
    from palate.model.scoring import batch_arrays

    groups, _ = encode_examples(pairs, base.tokenizer, config.max_tokens)
    index = list(range(len(groups)))
    models = {k: RewardModel(base.model, config.lora(), members=k) for k in (1, members)}
    engine = CpuEngine(models[1], threads=default_threads())
    hidden = training.build_prefix_cache(models[1], groups, 1 << 20, make_streams(1), engine=engine)
    engine.close()
    batch = collate(groups, index, hidden)
    arrays = batch_arrays(batch)
    boot = bootstrap_weights(len(groups), members, 0)
    n = float(len(groups))

    def step_fn(k: int) -> Any:
        model = models[k]
        li = training._loss_inputs(batch, groups, index, boot if k > 1 else None)
        opt = optim.AdamW(learning_rate=1e-4)

        def loss(m: Any) -> mx.array:
            r = m.forward_groups(*arrays, start=m.split)
            if r.ndim == 2:
                return ensemble_loss(r, li, 0.0, 0.01, n, 2 * n).loss
            return preference_loss(r, li, 0.0, 0.01, n, 2 * n).loss

        grad = nn.value_and_grad(model, loss)

        def run() -> None:
            _, g = grad(model)
            opt.update(model, g)
            mx.eval(model.trainable_parameters(), opt.state)

        return run

    steps = {k: step_fn(k) for k in models}
    times: dict[int, list[float]] = {k: [] for k in models}
    for k in models:  # warm-up
        steps[k]()
    for _ in range(repeats):
        for k in models:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "pairs_per_batch": len(groups),
        "tokens": int(batch.tokens),
        "step_s_single": round(med[1], 4),
        f"step_s_heads_x{members}": round(med[members], 4),
        "ratio": round(med[members] / med[1], 3),
        "repeats": repeats,
        "load_average": os.getloadavg()[0],
    }


def active_learning(
    args: Any,
    config: TrainConfig,
    base: Any,
    pool: list[PairExample],
    full: TrainResult,
    test_groups: list[Any],
    test_hidden: Any,
) -> dict[str, Any]:
    """Accuracy vs labels, picking by disagreement and at random, from one shared cache."""
    assert full.prefix is not None
    groups, hidden, trunc = full.prefix
    assert hidden is not None
    train_ex, val_ex = training._split(pool, config.val_fraction)
    index = {id(ex): i for i, ex in enumerate([*train_ex, *val_ex])}
    ens = TrainConfig(**{**config.to_json(), "members": args.members})
    rng = np.random.default_rng(0)
    start = [int(i) for i in rng.choice(len(pool), args.seed_labels, replace=False)]
    curves: dict[str, list[list[float]]] = {}
    for strategy in ("disagreement", "random"):
        labelled = list(start)
        curve = []
        pick_rng = np.random.default_rng(1)
        for rnd in range(args.rounds + 1):
            subset = [pool[i] for i in labelled]
            tr, va = training._split(subset, ens.val_fraction)
            order = [index[id(ex)] for ex in [*tr, *va]]
            prefix = ([groups[i] for i in order], [hidden[i] for i in order], trunc)
            res = train_reward_model(subset, ens, base=base, prefix=prefix)
            r = member_rewards(res.model, test_groups, test_hidden, config.batch_tokens)
            acc = float((r.mean(axis=2)[:, 0] > r.mean(axis=2)[:, 1]).mean())
            curve.append([len(labelled), acc])
            print(f"{strategy}: {len(labelled)} labels -> accuracy {acc:.3f}", flush=True)
            if rnd == args.rounds:
                break
            rest = [i for i in range(len(pool)) if i not in set(labelled)]
            if strategy == "random":
                new = [int(i) for i in pick_rng.choice(rest, args.batch, replace=False)]
            else:
                cand = [index[id(pool[i])] for i in rest]
                pr = member_rewards(
                    res.model,
                    [groups[i] for i in cand],
                    [hidden[i] for i in cand],
                    config.batch_tokens,
                )
                t = res.calibration.temperature
                info = [pair_information(p[0], p[1], t)[0] for p in pr]
                new = [rest[k] for k in np.argsort(info)[::-1][: args.batch]]
            labelled += new
        curves[strategy] = curve
    return {
        "curves": curves,
        "members": args.members,
        "seed_labels": args.seed_labels,
        "batch": args.batch,
    }


if __name__ == "__main__":
    raise SystemExit(main())
