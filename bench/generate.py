"""Generation benchmark: sampling throughput against mlx-lm, the best-of-N curve, and DPO.

Stages (``--stages``, default all, in this order; ``--json-out`` writes every figure):

- ``throughput``: tokens/s of ``palate.generation.sampling.sample`` against
  ``mlx_lm.generate.stream_generate`` on the same loaded model (the embedded SmolLM2-135M),
  same prompt, same sampler (temperature 0.8, top-p 0.95), ``--max-tokens`` new tokens:
  one sample (anchor: one mlx-lm run) and 8 samples (anchor: 8 sequential mlx-lm runs).
  Runs are interleaved and repeated (``--repeats``); medians are reported. Wall time includes
  the prefill on both sides; tokens are those actually generated (end-of-turn included).
- ``reward``: trains the reward model the other stages judge with, on the training side of the
  held-out split (``--rm-train`` pairs); ``dpo`` reports its held-out accuracy.
- ``bon``: for ``--bon-prompts`` held-out prompts, 16 samples each from the base; the expected
  best-of-N reward (z) for N = 1..16 from all subsets of the pool (the order-statistics
  estimator, not one draw), and, per N, how often the best-of-N pick beats the human-chosen
  and the human-rejected reference answers under the same reward model.
- ``dpo``: trains DPO adapters on ``--dpo-train`` pairs for each ``--lrs`` value, reports the
  held-out implicit-reward accuracy of each next to the reward model's accuracy on the same
  pairs, then evaluates the best adapter with ``evaluate_policy`` (win rate over base samples
  judged by the reward model, KL) and the policy gate's verdict.

    .venv/bin/python bench/generate.py [--stages throughput] [--json-out F]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from palate.evaluation.metrics import pairwise_report, wilson_interval  # noqa: E402
from palate.evaluation.split import example_key, split_items  # noqa: E402
from palate.events import PairExample  # noqa: E402
from palate.generation.dpo import PolicyTrainConfig, train_policy  # noqa: E402
from palate.generation.evaluate import evaluate_policy, pair_logprobs  # noqa: E402
from palate.generation.gate import decide_policy  # noqa: E402
from palate.generation.policy import load_policy, policy_artifact  # noqa: E402
from palate.generation.sampling import SampleConfig, prompt_ids, sample  # noqa: E402
from palate.model.base_model import load_base_model  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"
STAGES = ("throughput", "reward", "bon", "dpo")
THROUGHPUT_PROMPT = (
    "Human: Write a long, detailed story about a lighthouse keeper who finds a message in a "
    "bottle, with dialogue.\n\nAssistant:"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_pairs(path: str) -> tuple[list[PairExample], list[PairExample]]:
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    pairs = [PairExample(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    dealt = split_items(pairs, key=example_key, fraction=0.2, salt="palate-bench:")
    return dealt.train, dealt.heldout


# ---------------------------------------------------------------------------- throughput


def throughput(base: Any, max_tokens: int, repeats: int) -> dict[str, Any]:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = base.model, base.tokenizer
    ids = prompt_ids(tok, THROUGHPUT_PROMPT)
    cfg = SampleConfig(max_tokens=max_tokens, temperature=0.8, top_p=0.95)

    def mlx_lm_run() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for r in stream_generate(
            model, tok, ids, max_tokens=max_tokens, sampler=make_sampler(0.8, 0.95)
        ):
            n = r.generation_tokens
        return n, time.perf_counter() - t0

    def ours(k: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        s = sample(model, tok, ids, k, cfg)
        return s.generated_tokens, time.perf_counter() - t0

    mlx_lm_run()
    ours(2)  # warm-up both paths
    rows: dict[str, list[float]] = {"mlx_lm_1": [], "ours_1": [], "mlx_lm_8seq": [], "ours_8": []}

    def eight_sequential() -> tuple[int, float]:
        tot, tt = 0, 0.0
        for _ in range(8):
            n, dt = mlx_lm_run()
            tot, tt = tot + n, tt + dt
        return tot, tt

    pairs = (
        (("mlx_lm_1", mlx_lm_run), ("ours_1", lambda: ours(1))),
        (("mlx_lm_8seq", eight_sequential), ("ours_8", lambda: ours(8))),
    )
    for rep in range(repeats):
        for pair in pairs:  # alternate who goes first: no side always runs after the other
            for name, run in pair if rep % 2 == 0 else pair[::-1]:
                n, dt = run()
                rows[name].append(n / dt)
        log(
            f"throughput rep {rep + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rows.items())
        )
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "prompt_tokens": len(ids),
        "max_tokens": max_tokens,
        "repeats": repeats,
        "tokens_per_s_median": {k: round(v, 2) for k, v in med.items()},
        "single_ratio": round(med["ours_1"] / med["mlx_lm_1"], 3),
        "eight_ratio": round(med["ours_8"] / med["mlx_lm_8seq"], 3),
        "single_ratio_median_of_reps": round(
            statistics.median(a / b for a, b in zip(rows["ours_1"], rows["mlx_lm_1"], strict=True)),
            3,
        ),
        "eight_ratio_median_of_reps": round(
            statistics.median(
                a / b for a, b in zip(rows["ours_8"], rows["mlx_lm_8seq"], strict=True)
            ),
            3,
        ),
        "per_rep_single_ratio": [
            round(a / b, 3) for a, b in zip(rows["ours_1"], rows["mlx_lm_1"], strict=True)
        ],
        "per_rep_eight_ratio": [
            round(a / b, 3) for a, b in zip(rows["ours_8"], rows["mlx_lm_8seq"], strict=True)
        ],
    }


# ---------------------------------------------------------------------------- reward model


def train_reward(
    base: Any,
    train: list[PairExample],
    n: int,
    max_tokens: int,
    out_dir: Path,
) -> tuple[Any, dict[str, Any]]:
    from palate.model import artifacts
    from palate.model.training import TrainConfig, train_reward_model

    if (out_dir / "model.safetensors").is_file():
        log(f"reusing the reward model in {out_dir}")
        loaded = artifacts.load_model(artifacts.load_dir(out_dir), base)
        info = json.loads((out_dir / "bench.json").read_text())
        return loaded.scorer(), info
    cfg = TrainConfig(max_tokens=max_tokens)
    t0 = time.perf_counter()
    res = train_reward_model(train[:n], cfg, base=base)
    art = artifacts.artifact_from_model(
        res.model,
        artifacts.build_config(
            base,
            cfg.lora(),
            cfg.max_tokens,
            res.calibration,
            res.data_summary,
            res.metrics,
            cfg.to_json(),
            **({"members": cfg.members} if hasattr(cfg, "members") else {}),
        ),
    )
    artifacts.save_dir(art, out_dir)
    loaded = artifacts.load_model(artifacts.load_dir(out_dir), base)
    scorer = loaded.scorer()
    # Its held-out accuracy is measured on the DPO stage's slice (scoring all 297 held-out
    # pairs would cost more than training it on this CPU).
    info = {
        "train_pairs": min(n, len(train)),
        "max_tokens": max_tokens,
        "members": getattr(cfg, "members", 1),
        "train_metrics": res.metrics,
        "train_s": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "bench.json").write_text(json.dumps(info, default=str))
    return scorer, info


# ---------------------------------------------------------------------------- best-of-N


def expected_max(scores: np.ndarray, n: int) -> float:
    """E[max of n drawn without replacement from the pool]: sorted ascending, the i-th
    (1-based) is the max of C(i-1, n-1) of the C(M, n) subsets."""
    s = np.sort(scores)
    m = len(s)
    w = np.array([math.comb(i - 1, n - 1) for i in range(1, m + 1)], dtype=np.float64)
    return float((w * s).sum() / math.comb(m, n))


def p_max_beats(scores: np.ndarray, n: int, ref: float) -> float:
    """P(max of n from the pool > ref), over all subsets."""
    m = len(scores)
    below = int((scores <= ref).sum())
    return 1.0 - (math.comb(below, n) / math.comb(m, n) if below >= n else 0.0)


def best_of_n(
    base: Any, scorer: Any, held: list[PairExample], prompts: int, pool: int, max_tokens: int
) -> dict[str, Any]:
    seen, chosen = set(), []
    for p in held:
        if isinstance(p.prompt, str) and p.prompt not in seen and len(p.prompt) < 1500:
            seen.add(p.prompt)
            chosen.append(p)
        if len(chosen) == prompts:
            break
    curves = {"z": [], "beats_chosen": [], "beats_rejected": []}
    per_prompt = []
    for i, p in enumerate(chosen):
        s = sample(
            base.model,
            base.tokenizer,
            p.prompt,
            pool,
            SampleConfig(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i),
        )
        res = scorer.score(p.prompt, [*s.texts, p.chosen, p.rejected])
        z = np.array(res.z[:pool])
        zc, zr = res.z[pool], res.z[pool + 1]
        per_prompt.append(
            {
                "pool_z_mean": float(z.mean()),
                "pool_z_max": float(z.max()),
                "chosen_z": zc,
                "rejected_z": zr,
                "tokens": s.generated_tokens,
                "decode_s": round(s.decode_s, 1),
            }
        )
        curves["z"].append([expected_max(z, n) for n in range(1, pool + 1)])
        curves["beats_chosen"].append([p_max_beats(z, n, zc) for n in range(1, pool + 1)])
        curves["beats_rejected"].append([p_max_beats(z, n, zr) for n in range(1, pool + 1)])
        log(
            f"best-of-N prompt {i + 1}/{len(chosen)}: pool z mean {z.mean():+.2f} max "
            f"{z.max():+.2f}; human chosen {zc:+.2f}, rejected {zr:+.2f}"
        )
    mean = {k: [round(float(x), 4) for x in np.mean(v, axis=0)] for k, v in curves.items()}
    return {
        "prompts": len(chosen),
        "pool": pool,
        "max_tokens": max_tokens,
        "N": list(range(1, pool + 1)),
        **mean,
        "per_prompt": per_prompt,
    }


# ---------------------------------------------------------------------------- DPO


def dpo(
    base: Any,
    scorer: Any,
    train: list[PairExample],
    held: list[PairExample],
    n_train: int,
    lrs: list[float],
    epochs: int,
    max_tokens: int,
    win_prompts: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    bc, br = pair_logprobs(base.model, base.tokenizer, held, max_tokens)
    a, b = scorer.score_pairs([(p.prompt, p.chosen, p.rejected) for p in held])
    rm = pairwise_report(a, b, [len(p.chosen) for p in held], [len(p.rejected) for p in held])
    out: dict[str, Any] = {
        "train_pairs": min(n_train, len(train)),
        "heldout_pairs": len(held),
        "epochs": epochs,
        "max_tokens": max_tokens,
        "reward_model_accuracy": rm.accuracy,
        "reward_model_ci": [rm.ci_low, rm.ci_high],
        "base_likelihood_accuracy": float((bc > br).mean()),
        "base_logprob_s": round(time.perf_counter() - t0, 1),
        "runs": [],
    }
    log(
        f"reward model on the DPO held-out slice: {rm.accuracy:.3f}; base likelihood "
        f"preference {out['base_likelihood_accuracy']:.3f}"
    )
    best: tuple[float, Any, Any] | None = None
    for lr in lrs:
        cfg = PolicyTrainConfig(lr=lr, epochs=epochs, max_tokens=max_tokens)
        t1 = time.perf_counter()
        res = train_policy(train[:n_train], cfg, base=base, progress=_progress)
        pc, pr = pair_logprobs(res.lm, base.tokenizer, held, max_tokens)
        margin = cfg.beta * ((pc - bc) - (pr - br))
        correct = int((margin > 0).sum())
        lo, hi = wilson_interval(correct, len(held))
        run = {
            "lr": lr,
            "accuracy": correct / len(held),
            "ci": [lo, hi],
            "mean_margin": float(margin.mean()),
            "train_metrics": res.metrics,
            "wall_s": round(time.perf_counter() - t1, 1),
        }
        out["runs"].append(run)
        log(
            f"DPO lr {lr:g}: held-out implicit accuracy {run['accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], margin {run['mean_margin']:+.4f} ({run['wall_s']}s)"
        )
        if best is None or run["accuracy"] > best[0]:
            best = (run["accuracy"], res, cfg)
    assert best is not None
    _, res, cfg = best
    pol = load_policy(policy_artifact(res.lm, base, cfg.lora(), train_config=cfg.to_json()), base)
    t2 = time.perf_counter()
    rep = evaluate_policy(
        pol,
        held,
        judge=lambda prompt, texts: scorer.score(prompt, texts).raw,
        beta=cfg.beta,
        max_tokens=max_tokens,
        win_prompts=win_prompts,
        sampling=SampleConfig(max_tokens=64, temperature=0.8, seed=0),
    )
    rep["eval_s"] = round(time.perf_counter() - t2, 1)
    rep["lr"] = cfg.lr
    rep["gate"] = decide_policy(rep).to_json()
    out["best_eval"] = rep
    log(
        f"best adapter (lr {cfg.lr:g}): win rate {rep['win_rate']}, KL {rep['kl']:.3f} nats "
        f"({rep['kl_per_token']:.4f}/token); gate {rep['gate']['action']}"
    )
    return out


def _progress(e: Any) -> None:
    if e.step == e.total or e.step % 10 == 0:
        log(f"  {e.phase} {e.step}/{e.total}" + (f" loss {e.loss:.4f}" if e.loss else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--max-tokens", type=int, default=64, help="throughput: new tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rm-train", type=int, default=400)
    ap.add_argument("--rm-max-tokens", type=int, default=256)
    ap.add_argument("--rm-dir", default="build/bench-generate-rm")
    ap.add_argument("--bon-prompts", type=int, default=6)
    ap.add_argument("--bon-tokens", type=int, default=64)
    ap.add_argument("--dpo-train", type=int, default=128)
    ap.add_argument("--dpo-heldout", type=int, default=64)
    ap.add_argument("--dpo-epochs", type=int, default=2)
    ap.add_argument("--dpo-max-tokens", type=int, default=256)
    ap.add_argument("--lrs", default="1e-5,1e-4")
    ap.add_argument("--win-prompts", type=int, default=16)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    stages = args.stages.split(",")
    report: dict[str, Any] = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    base = load_base_model()
    train, held = load_pairs(args.data)
    log(f"base loaded; {len(train)} train / {len(held)} held-out pairs; load {os.getloadavg()}")
    if "throughput" in stages:
        report["throughput"] = throughput(base, args.max_tokens, args.repeats)
        log(json.dumps(report["throughput"]["tokens_per_s_median"]))
    scorer = None
    if {"reward", "bon", "dpo"} & set(stages):
        scorer, report["reward_model"] = train_reward(
            base, train, args.rm_train, args.rm_max_tokens, Path(args.rm_dir)
        )
        log(f"reward model: {json.dumps(report['reward_model'], default=str)}")
    if "bon" in stages:
        report["best_of_n"] = best_of_n(base, scorer, held, args.bon_prompts, 16, args.bon_tokens)
    if "dpo" in stages:
        report["dpo"] = dpo(
            base,
            scorer,
            train,
            held[: args.dpo_heldout],
            args.dpo_train,
            [float(x) for x in args.lrs.split(",")],
            args.dpo_epochs,
            args.dpo_max_tokens,
            args.win_prompts,
        )
    report["load_average_end"] = os.getloadavg()
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2, default=str)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
