"""A later night against the first: what the nightly run costs after 10% new events.

Issue 15's goal: a nightly run after 10% new events costs <= 0.4x the first night's run
(training plus the gate's judging of the candidate and the deployed model), because what
depends only on the frozen base and unchanged events is kept from earlier nights (the
frozen-prefix cache in the encrypted store, model/prefix.py).

One run, in-process, through the nightly run's own code (``runtime.training_child._run``) on
a real encrypted store in a temp dir, the embedded model and HH dev pairs:

1. night 1: the first ``--pairs`` pairs of shared/data/hh_harmless_dev.jsonl as events;
   the run trains, the gate judges, the version is deployed (``--override``d if the gate
   held it: most later nights judge against a deployed model, so night 2 must too);
2. night 2: ``--new`` (0.1) more pairs arrive; the run trains and judges again, now against
   the deployed model, reading the kept frozen-block outputs;
3. with ``--anchor nocache``, night 2 again on a copy of the store as it was before night 2,
   with ``frozen_cache_mb`` = 0 (nothing kept or read, and the gate's frozen pass not
   shared between its two models): what a later night cost before these caches;
4. each ``--variant KEY=JSON[,KEY=JSON...]`` runs night 2 again on such a copy with those
   ``[train]`` settings (e.g. ``--variant warm_start=true``): wall time, held-out accuracy
   and the gate's decision side by side.

With ``--policy``, ``[policy] nightly = true`` (its defaults): every night also trains, judges
and gates a DPO policy adapter after the reward model's part (docs/generation.md), and the
night's line gives that part's seconds and decision. Night 1 usually skips it (no reward model
is deployed to judge samples yet); night 2 runs it against the deployed one: the whole night.

Prints each night's wall time split into load+training and judging, the cache's reuse
figures, and the ratios night2/night1 (goal <= 0.4) and night2/night2-without-cache.

    .venv/bin/python bench/nightly.py                      # 600 pairs, +10%
    .venv/bin/python bench/nightly.py --pairs 300 --anchor nocache --variant warm_start=true
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from palate.config import Config, PolicyConfig  # noqa: E402
from palate.evaluation.gate import GatePolicy  # noqa: E402
from palate.events import validate_event  # noqa: E402
from palate.runtime import training_child  # noqa: E402
from palate.store.database import IngestGroup, Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


def ingest(store: Store, rows: list[dict[str, Any]], ts: float) -> None:
    events = [
        validate_event(
            {
                "id": uuid.uuid4().hex,
                "kind": "pair",
                "source": "bench",
                "ts": ts + i,
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
            },
            now=ts + len(rows) + 1,
        )
        for i, r in enumerate(rows)
    ]
    for i in range(0, len(events), 200):
        store.ingest([IngestGroup(events[i : i + 200])])


class Phases:
    """The run's progress lines (what the daemon would read), condensed: when judging
    started, and a line every 30 s."""

    def __init__(self) -> None:
        self.judging_at: float | None = None
        self.last = 0.0
        self.t0 = time.monotonic()

    def __call__(self, kind: str, **payload: Any) -> None:
        now = time.monotonic()
        phase = payload.get("phase")
        if phase == "evaluate" and self.judging_at is None:
            self.judging_at = now
        if now - self.last > 30:
            self.last = now
            print(f"    [{now - self.t0:6.0f}s] {phase} {payload.get('step')}/"
                  f"{payload.get('total')}", flush=True)  # fmt: skip


def night(store: Store, cfg: Config, name: str) -> dict[str, Any]:
    phases = Phases()
    training_child.say = phases  # the run's progress lines come here, not to stdout
    t0 = time.monotonic()
    result = training_child._run(store, cfg, name, True, GatePolicy())
    wall = time.monotonic() - t0
    judged = phases.judging_at or time.monotonic()
    info, _ = store.get_model(result["version"])
    kept = ((info.get("meta") or {}).get("training") or {}).get("frozen_cache")
    return {
        "version": result["version"],
        "decision": result["decision"],
        "accuracy": result["accuracy"],
        "wall_s": round(wall, 1),
        "train_s": round(judged - t0, 1),
        "judge_s": round(t0 + wall - judged, 1),
        "frozen_cache": kept,
        "policy": result.get("policy"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--pairs", type=int, default=600, help="night 1's pairs")
    ap.add_argument("--new", type=float, default=0.1, help="night 2's new pairs, a fraction")
    ap.add_argument("--max-tokens", type=int, default=0, help="train.max_tokens (0: default)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON",
        help="another [train] setting, e.g. --set lora_layers=1 (repeatable)",
    )  # fmt: skip
    ap.add_argument("--base-model", default="", help="base model spec (default: the embedded one)")
    ap.add_argument("--anchor", choices=["none", "nocache"], default="none")
    ap.add_argument(
        "--variant", action="append", default=[], metavar="KEY=JSON[,KEY=JSON]",
        help="night 2 again on a copy with these [train] settings (repeatable)",
    )  # fmt: skip
    ap.add_argument(
        "--policy", action="store_true",
        help="[policy] nightly = true: measure the nightly policy run too",
    )  # fmt: skip
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    extra = max(1, round(args.pairs * args.new))
    if args.pairs + extra > len(rows):
        raise SystemExit(f"--pairs {args.pairs} + {extra} new is more than {len(rows)} rows")
    train: dict[str, Any] = {}
    if args.max_tokens:
        train["max_tokens"] = args.max_tokens
    for item in args.set:
        k, _, v = item.partition("=")
        train[k] = json.loads(v)
    cfg = Config(
        train=train,
        policy=PolicyConfig(nightly=args.policy),
        **({"base_model": args.base_model} if args.base_model else {}),
    )
    root = Path(tempfile.mkdtemp(prefix="palate-nightly-"))
    key = secrets.token_bytes(32)
    out: dict[str, Any] = {
        "pairs": args.pairs, "new": extra, "train": train, "policy_nightly": args.policy,
    }  # fmt: skip
    try:
        store = Store(root / "palate.db", key)
        now = time.time() - 10 * 86_400
        ingest(store, rows[: args.pairs], now)
        print(f"night 1: {args.pairs} pairs", flush=True)
        n1 = night(store, cfg, "night-1")
        print(f"  {n1}", flush=True)
        if store.deployed_version() != n1["version"]:
            store.deploy_model(
                n1["version"], how="override", reason="bench: night 2 judges against it"
            )
        ingest(store, rows[args.pairs : args.pairs + extra], now + 86_400)
        store.checkpoint()
        snapshot = root / "snapshot"
        snapshot.mkdir()
        for p in root.glob("palate.db*"):
            shutil.copy2(p, snapshot / p.name)
        print(f"night 2: +{extra} pairs ({100 * extra / args.pairs:.0f}%)", flush=True)
        n2 = night(store, cfg, "night-2")
        print(f"  {n2}", flush=True)
        store.close()
        out.update(night1=n1, night2=n2, ratio=round(n2["wall_s"] / n1["wall_s"], 3))
        variants = [("nocache", {"frozen_cache_mb": 0})] if args.anchor == "nocache" else []
        for v in args.variant:
            settings = {k: json.loads(x) for k, _, x in (kv.partition("=") for kv in v.split(","))}
            variants.append((v, settings))
        out["variants"] = {}
        for name, settings in variants:
            copy = root / f"variant-{len(out['variants'])}"
            shutil.copytree(snapshot, copy)
            vcfg = Config(train={**train, **settings}, base_model=cfg.base_model, policy=cfg.policy)
            vstore = Store(copy / "palate.db", key)
            print(f"night 2 again, {name}", flush=True)
            nv = night(vstore, vcfg, f"night-2-{name}")
            vstore.close()
            nv["ratio_to_night1"] = round(nv["wall_s"] / n1["wall_s"], 3)
            nv["ratio_to_night2"] = round(nv["wall_s"] / n2["wall_s"], 3)
            print(f"  {nv}", flush=True)
            out["variants"][name] = nv
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    print(json.dumps(out, indent=2))
    print(
        f"\nnight 1 {n1['wall_s']:.0f} s, night 2 (+{extra} pairs) {n2['wall_s']:.0f} s: "
        f"{out['ratio']}x (goal <= 0.4)"
    )
    for label, n in (("night 1", n1), ("night 2", n2)):
        pol = n.get("policy")
        if pol:
            print(f"{label} policy part: {json.dumps(pol)}")
    for name, nv in out["variants"].items():
        print(
            f"night 2 {name}: {nv['wall_s']:.0f} s = {nv['ratio_to_night1']}x night 1, "
            f"{nv['ratio_to_night2']}x night 2; accuracy {nv['accuracy']}, {nv['decision']}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
