"""One training run from the encrypted store, in its own process.

``python -m palate.runtime.training_child --job ID`` is what the daemon starts (jobs.py). The run:

1. unwraps the key and opens the store (a second connection; WAL lets the daemon keep
   ingesting meanwhile),
2. turns every stored event into examples and deals them into train and held-out by a
   stable hash of the prompt (split.py), so nothing trained on is ever evaluated on,
3. trains (training.py), reporting progress as JSON lines on stdout,
4. scores the held-out set and the shipped probes with the candidate AND with the deployed
   model, evaluates both (evaluation.py) and lets the gate decide (gate.py),
5. registers the version with its decision in one transaction, deploying it in the next if
   the gate said so,
6. with ``[policy] nightly = true`` (off by default), trains a DPO policy adapter on the same
   training-side examples, judges it on the held-out pairs with the deployed reward model,
   lets the policy gate decide and registers it the same way (:func:`nightly_policy`); a
   failure there is recorded in the result, never undoing step 5,

and prints one ``result`` line.

Killing this process at any point leaves the registry as it was, or with the reward model
registered and no policy: nothing is written before step 5, and each registration is one
transaction. Stdout carries only JSON lines; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

from palate.config import Config, load_config  # noqa: E402
from palate.errors import PalateError  # noqa: E402
from palate.evaluation.gate import Decision, GatePolicy, decide  # noqa: E402
from palate.evaluation.heldout import (  # noqa: E402
    Metrics,
    PairRecord,
    RatingRecord,
    evaluate,
    load_probes,
)
from palate.evaluation.selective import ensemble_metrics  # noqa: E402
from palate.evaluation.split import example_key, heldout_status, split_items  # noqa: E402
from palate.events import (  # noqa: E402
    Example,
    PairExample,
    RatingExample,
    derive_pairs,
    to_examples,
)
from palate.model import artifacts  # noqa: E402
from palate.model.base_model import BaseModel, load_base_model  # noqa: E402
from palate.model.prefix import FrozenPrefix  # noqa: E402
from palate.model.reward_model import lora_for_base  # noqa: E402
from palate.model.scoring import Scorer, mean_rewards  # noqa: E402
from palate.model.training import (  # noqa: E402
    ProgressEvent,
    TrainConfig,
    TrainResult,
    pack_hidden,
    train_reward_model,
)
from palate.paths import resolve  # noqa: E402
from palate.runtime.progress import RunPlan, RunProgress  # noqa: E402
from palate.store.database import POLICY_KIND, Store  # noqa: E402
from palate.store.keys import KeyManager, protect_process, zero  # noqa: E402

#: Pairs scored per call: bounds memory, not results (scores are batch-invariant).
SCORE_CHUNK = 64


def say(kind: str, **payload: Any) -> None:
    """One JSON line to the daemon. Nothing else may be written to stdout."""
    sys.stdout.write(json.dumps({"type": kind, **payload}, default=str) + "\n")
    sys.stdout.flush()


#: This run's position and overall ETA (phase N of M); every progress line goes through it.
PROGRESS = RunProgress(lambda line: say("progress", **line))


def on_progress(e: ProgressEvent) -> None:
    d = asdict(e)
    PROGRESS.report(d.pop("phase"), d.pop("step"), d.pop("total"), **d)


def load_examples(store: Store, seqs: dict[str, int] | None = None) -> list[Example]:
    """Every stored event as examples, plus the pairs implied by comparable ratings
    (events.derive_pairs: same prompt, good vs bad), which share their ratings' split key.
    ``seqs`` collects each event id's store sequence number (what a warm start calls new)."""
    out: list[Example] = []
    for event in store.iter_events():
        out.extend(to_examples(event))
        if seqs is not None:
            seqs[str(event.get("id", ""))] = int(event["seq"])
    out.extend(derive_pairs(out))
    return out


def replay_subset(
    train: Sequence[Example], seqs: dict[str, int], since: int, ratio: float, seed: int
) -> tuple[list[Example], dict[str, int]]:
    """A warm-started night's training set: every example of an event that arrived after
    the deployed model's data (``seq > since``) plus ``ratio`` times as many earlier ones,
    drawn at random (rehearsal, so the new events do not pull the model off what it knew).
    ``ratio`` <= 0, or too few earlier examples, keeps everything."""
    new = [e for e in train if seqs.get(e.event_id, since + 1) > since]
    old = [e for e in train if seqs.get(e.event_id, since + 1) <= since]
    want = math.ceil(ratio * max(len(new), 1))
    if ratio <= 0 or want >= len(old):
        return list(train), {"new": len(new), "replayed": len(old), "of_earlier": len(old)}
    rng = random.Random(seed)
    picked = rng.sample(old, want)
    return new + picked, {"new": len(new), "replayed": len(picked), "of_earlier": len(old)}


def score_heldout(
    scorer: Scorer,
    pairs: Sequence[PairExample],
    ratings: Sequence[RatingExample],
    on_chunk: Callable[[int], None] | None = None,
    members: list[tuple[Any, Any]] | None = None,
) -> tuple[list[PairRecord], list[RatingRecord]]:
    """The held-out set as evaluation records, scored by one model (``on_chunk(n)`` after
    every ``n`` pairs scored, for progress); ``members`` collects the ensemble members'
    scores of the pairs (chosen, rejected) per chunk."""
    prs: list[PairRecord] = []
    for i in range(0, len(pairs), SCORE_CHUNK):
        chunk = pairs[i : i + SCORE_CHUNK]
        am, bm = scorer.score_pairs_members([(p.prompt, p.chosen, p.rejected) for p in chunk])
        a, b = mean_rewards(am), mean_rewards(bm)
        if members is not None:
            members.append((am, bm))
        if on_chunk is not None:
            on_chunk(len(chunk))
        for k, p in enumerate(chunk):
            prs.append(
                PairRecord(
                    float(a[k]),
                    float(b[k]),
                    len(p.chosen),
                    len(p.rejected),
                    source=p.source,
                    domain=p.domain,
                    pair_id=f"{p.event_id}:{i + k}",
                    cluster=example_key(p),  # the bootstraps resample prompts, not pairs
                )
            )
    rrs: list[RatingRecord] = []
    for i in range(0, len(ratings), SCORE_CHUNK):
        rated = ratings[i : i + SCORE_CHUNK]
        scored = scorer.score_many([(r.prompt, [r.response]) for r in rated])
        for k, (r, res) in enumerate(zip(rated, scored, strict=True)):
            rrs.append(
                RatingRecord(
                    float(res.raw[0]),
                    r.label,
                    len(r.response),
                    source=r.source,
                    domain=r.domain,
                    rating_id=f"{r.event_id}:{i + k}",
                    cluster=example_key(r),
                )
            )
    return prs, rrs


def score_probes(scorer: Scorer, members: list[tuple[Any, Any]] | None = None) -> list[PairRecord]:
    probes = load_probes()
    am, bm = scorer.score_pairs_members([(p.prompt, p.chosen, p.rejected) for p in probes])
    if members is not None:
        members.append((am, bm))
    a, b = mean_rewards(am), mean_rewards(bm)
    return [p.record(float(a[i]), float(b[i])) for i, p in enumerate(probes)]


def judge(
    scorer: Scorer,
    temperature: float,
    pairs: Sequence[PairExample],
    ratings: Sequence[RatingExample],
    deployed: tuple[list[PairRecord], list[RatingRecord]] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[Metrics, tuple[list[PairRecord], list[RatingRecord]]]:
    """Score the held-out pairs, ratings and probes with one model and evaluate them;
    ``deployed`` (the deployed model's records from the same call) adds the paired
    comparison. Returns the metrics and this model's records."""
    held: list[tuple[Any, Any]] = []
    prs, rrs = score_heldout(scorer, pairs, ratings, on_chunk, held)
    probe_members: list[tuple[Any, Any]] = []
    probes = score_probes(scorer, probe_members)
    metrics = evaluate(
        prs,
        rrs,
        temperature=temperature,
        probes=probes,
        deployed_pairs=deployed[0] if deployed is not None else None,
        deployed_ratings=deployed[1] if deployed is not None else None,
        rating_offset=scorer.calibration.offset,
    )
    # The ensemble's own view (docs/evaluation.md): accuracy on its surest pairs, and where
    # on the probes its members disagree.
    metrics["ensemble"] = ensemble_metrics(
        held, probe_members, [p.domain for p in probes], temperature
    )
    return metrics, (prs, rrs)


def deployed_scorer(
    store: Store, base: BaseModel, prefix: FrozenPrefix | None = None
) -> tuple[int, Scorer, float] | None:
    """The deployed model, rebuilt to be re-scored on tonight's held-out set; on tonight's
    base it reads the frozen blocks' outputs from ``prefix`` (where its split is the same)."""
    version = store.deployed_version()
    if version is None:
        return None
    _, blob = store.get_model(version)
    art = artifacts.from_bytes(blob)
    same_base = art.config["base_model"]["content_hash"] == base.content_hash
    loaded = artifacts.load_model(art, base if same_base else None)
    scorer = loaded.scorer(prefix=prefix if same_base else None)
    return version, scorer, loaded.calibration.temperature


def _knobs(cls: type, table: str, overrides: dict[str, Any], also: Sequence[str] = ()) -> Any:
    """Build a config dataclass from a config.toml table, naming any unknown key (``also``:
    the table's other keys, named among the known ones)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise PalateError(
            "invalid_request",
            f"config.toml [{table}]: unknown setting(s) "
            f"{', '.join(unknown)}; known: {', '.join(sorted(known | set(also)))}",
        )
    return cls(**overrides)


def train_config(cfg: Config) -> TrainConfig:
    tc: TrainConfig = _knobs(TrainConfig, "train", {"base_model": cfg.base_model, **cfg.train})
    return tc


def federated_start(store: Store, tc: TrainConfig) -> tuple[Any, str | None]:
    """The shared adapter of a federation this user joined (``palate federate join``), as
    the starting weights of this run when it was trained for the same base and LoRA shape;
    else (None, None). The gate judges the result like any other candidate."""
    import io

    import numpy as np

    from palate.model.training import federation_spec

    found = store.federated_adapter()
    if found is None:
        return None, None
    meta, blob = found
    if meta.get("spec") != federation_spec(tc.base_model, tc.lora()):
        return None, None
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    return state, f"federated:{meta.get('federation')}@{meta.get('round')}"


def deployed_start(
    store: Store, base: BaseModel, tc: TrainConfig
) -> tuple[dict[str, Any] | None, str | None, int]:
    """The deployed model's LoRA and heads as tonight's starting weights (``warm_start``),
    when it was trained on this base with this LoRA shape, ``max_tokens`` and ensemble size;
    else (None, None). Tonight's data is mostly what it learnt from, so early stopping can
    end the run after a few validations; the best-validation checkpoint and the gate still
    decide what is kept."""
    version = store.deployed_version()
    if not tc.warm_start or version is None:
        return None, None, 0
    info, blob = store.get_model(version)
    art = artifacts.from_bytes(blob)
    c = art.config
    same = (
        c.get("base_model", {}).get("content_hash") == base.content_hash
        and c.get("lora") == lora_for_base(tc.lora(), base).to_json()
        and int(c.get("max_tokens", -1)) == tc.max_tokens
        and int(c.get("ensemble", {}).get("members", 1)) == tc.members
    )
    if not same:
        return None, None, 0
    since = int(((info.get("meta") or {}).get("training") or {}).get("data_seq") or 0)
    return dict(art.tensors), f"deployed:v{version}", since


class FrozenLookup:
    """The store's frozen-prefix cache as the lookup ``train_reward_model(frozen=...)`` takes,
    remembering which keys it found (the rest are new tonight and get kept)."""

    def __init__(self, store: Store, base_hash: str) -> None:
        self.store, self.base_hash = store, base_hash
        self.hits: list[str] = []

    def __call__(self, key: str) -> bytes | None:
        blob = self.store.frozen_cache_get(self.base_hash, key)
        if blob is not None:
            self.hits.append(key)
        return blob


#: New cache rows written per transaction (each a few hundred KB for HH-sized examples), so
#: keeping them never holds a second copy of the whole cache in memory.
FROZEN_CHUNK = 64


def keep_frozen(
    store: Store,
    lookup: FrozenLookup,
    result: TrainResult,
    tc: TrainConfig,
    epoch: int,
    gate: FrozenPrefix | None = None,
) -> dict[str, Any] | None:
    """Keep tonight's new frozen-prefix activations for later nights (bounded by
    ``tc.frozen_cache_mb``): the training examples' and the gate's (held-out examples and
    probes); None when there is nothing to keep. Not after a forget that happened during
    this run (``epoch``: :meth:`Store.frozen_cache_epoch` before the run read its events):
    what this run computed may hold the forgotten text."""
    keys = result.frozen_keys
    hidden = result.prefix[1] if result.prefix is not None else None
    if keys is None or hidden is None or store.frozen_cache_epoch() != epoch:
        return None
    max_bytes = max(0, tc.frozen_cache_mb) * 1024 * 1024
    known = set(lookup.hits)
    new = [(k, h) for k, h in zip(keys, hidden, strict=True) if k not in known]
    if gate is not None:
        new.extend((k, h) for k, h in gate.fresh() if k not in known)
    stats = store.frozen_cache_put(lookup.base_hash, {}, sorted(known), max_bytes)
    added = 0
    for i in range(0, len(new), FROZEN_CHUNK):
        chunk = {k: pack_hidden(h) for k, h in new[i : i + FROZEN_CHUNK]}
        stats = store.frozen_cache_put(lookup.base_hash, chunk, [], max_bytes)
        added += len(chunk)
    return {**stats, "reused": len(known), "added": added}


def parent_alive() -> bool:
    """False when the daemon that started this run has died (the run was re-parented).

    On Linux the kernel also kills the run with its daemon (PR_SET_PDEATHSIG, jobs.py);
    this check covers the window before that took effect and macOS, which has no such
    signal, so an orphan never registers or deploys a model its daemon did not see.
    """
    from palate.runtime.jobs import PARENT_ENV

    expected = os.environ.get(PARENT_ENV)
    return expected is None or os.getppid() == int(expected)


# ioprio_set(2): syscall numbers, and the classes (value << 13) this run moves between.
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}  # (set, get)
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 2, 3
# setiopolicy_np(3) on macOS: the disk policy of this thread.
_IOPOL_TYPE_DISK, _IOPOL_SCOPE_THREAD, _IOPOL_IMPORTANT, _IOPOL_DEFAULT = 0, 1, 1, 0


def ioprio_class() -> int | None:
    """This thread's I/O scheduling class on Linux (2 best-effort, 3 idle), else None."""
    nrs = _IOPRIO_SYSCALLS.get(os.uname().machine)
    if not sys.platform.startswith("linux") or nrs is None:
        return None
    import ctypes

    value = int(ctypes.CDLL(None, use_errno=True).syscall(nrs[1], IOPRIO_WHO_PROCESS, 0))
    return None if value < 0 else value >> 13


@contextlib.contextmanager
def foreground_io() -> Iterator[None]:
    """Normal (best-effort) I/O priority for the length of the block, then back.

    The run does its reading and training in the idle I/O class (jobs.py), but a write
    transaction holds the database's write lock: committed at idle priority behind a busy
    disk it kept the daemon's own commits waiting past busy_timeout (``busy`` for every
    client). So the few short write transactions at the end run at normal priority.
    """
    import ctypes

    restore: Callable[[], Any] | None = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        nrs = _IOPRIO_SYSCALLS.get(os.uname().machine)
        if sys.platform.startswith("linux") and nrs is not None:
            before = int(libc.syscall(nrs[1], IOPRIO_WHO_PROCESS, 0))
            normal = (IOPRIO_CLASS_BE << 13) | 4
            if before >= 0 and libc.syscall(nrs[0], IOPRIO_WHO_PROCESS, 0, normal) == 0:
                restore = lambda: libc.syscall(nrs[0], IOPRIO_WHO_PROCESS, 0, before)  # noqa: E731
        elif sys.platform == "darwin":
            before = int(libc.getiopolicy_np(_IOPOL_TYPE_DISK, _IOPOL_SCOPE_THREAD))
            if libc.setiopolicy_np(_IOPOL_TYPE_DISK, _IOPOL_SCOPE_THREAD, _IOPOL_IMPORTANT) == 0:
                restore = lambda: libc.setiopolicy_np(  # noqa: E731
                    _IOPOL_TYPE_DISK, _IOPOL_SCOPE_THREAD, max(before, _IOPOL_DEFAULT)
                )
    except (OSError, AttributeError):
        restore = None
    try:
        yield
    finally:
        if restore is not None:
            with contextlib.suppress(OSError):
                restore()


def register(
    store: Store,
    *,
    base_model: str,
    meta: dict[str, Any],
    artifact: bytes,
    state: str,
    deploy_reason: str | None,
    forget_count: int | None,
) -> tuple[int, bool]:
    """Register (and, with ``deploy_reason``, deploy) the new version: two short write
    transactions, everything prepared beforehand, at normal I/O priority. Refused
    (``conflict``) if events were forgotten since the run read them. A policy adapter
    (``meta["kind"]`` is the store's POLICY_KIND) is deployed as generation's policy, never
    as the reward model."""
    with foreground_io():
        version = store.add_model(
            base_model=base_model,
            meta=meta,
            artifact=artifact,
            state=state,
            forget_count=forget_count,
        )
        if deploy_reason is None:
            return version, False
        if meta.get("kind") == POLICY_KIND:
            store.deploy_policy(version, how="gate", reason=deploy_reason)
        else:
            store.deploy_model(version, how="gate", reason=deploy_reason)
    return version, True


@dataclass
class Night:
    """What the nightly policy run takes over from the reward model's part of the run: the
    same data read (and split) once, and the base already loaded."""

    base: BaseModel
    base_spec: str  # what load_base_model was given for ``base``
    train: list[Example]  # the training side of the split (never a held-out row)
    held_pairs: list[PairExample]
    seqs: dict[str, int]  # event id -> store sequence number
    forgets: int  # Store.forget_count() before the events were read
    data_seq: int


def _seq(e: Example, seqs: dict[str, int]) -> int:
    """An example's store sequence number; a derived pair's is its newer rating's."""
    eid = e.event_id
    if eid.startswith("derived:"):
        return max((seqs.get(i, 0) for i in eid[len("derived:") :].split(">")), default=0)
    return seqs.get(eid, 0)


def newest(examples: Sequence[Example], seqs: dict[str, int], n: int) -> list[Example]:
    """The ``n`` newest of ``examples`` (by store sequence), in their original order."""
    if len(examples) <= n:
        return list(examples)
    order = sorted(range(len(examples)), key=lambda i: _seq(examples[i], seqs), reverse=True)
    return [examples[i] for i in sorted(order[:n])]


def policy_train_config(cfg: Config) -> Any:
    """The ``[policy]`` table's training knobs as a PolicyTrainConfig; the base defaults to
    the reward model's (``base_model``), so both share one loaded base."""
    from palate.config import POLICY_TYPES
    from palate.generation.dpo import PolicyTrainConfig

    knobs = {"base_model": cfg.base_model, **cfg.policy.train}
    return _knobs(PolicyTrainConfig, "policy", knobs, also=tuple(POLICY_TYPES))


def on_policy_progress(e: ProgressEvent) -> None:
    d = asdict(e)
    PROGRESS.report(f"policy-{d.pop('phase')}", d.pop("step"), d.pop("total"), **d)


def nightly_policy(
    store: Store, cfg: Config, job: str, deploy: bool, night: Night
) -> dict[str, Any]:
    """The optional nightly policy run (``[policy] nightly = true``; docs/generation.md).

    Trains a policy adapter (train_policy) on the newest ``[policy] max_examples`` examples
    of the reward model's training side, evaluates it (evaluate_adapter, as
    ``policy_register`` does) on the newest as many held-out pairs with the deployed reward
    model as the win rate's judge, asks the policy gate and registers it as a ``policy``
    version, deployed for generation when the gate passes. Returns what the run's result
    records under ``policy``: the version and decision, or ``skipped`` with the reason when
    there are fewer held-out pairs than the policy gate needs, no training-side pairs, or
    no deployed reward model to judge the samples. Raises on a failure (the caller records
    it; the reward model's registration, already committed, stands).
    """
    from palate.generation.dpo import train_policy
    from palate.generation.gate import PolicyGate, gate_entry
    from palate.generation.service import evaluate_adapter

    t0 = time.time()
    need = PolicyGate().min_pairs
    if len(night.held_pairs) < need:
        return {"skipped": f"{len(night.held_pairs)} held-out pairs; the policy gate needs {need}"}
    if not any(isinstance(e, PairExample) for e in night.train):
        return {"skipped": "no training-side pairs (ratings only)"}
    pc = policy_train_config(cfg)  # before the judge: a typo in [policy] is reported as such
    judge = deployed_scorer(store, night.base)
    if judge is None:
        return {"skipped": "no deployed reward model to judge the adapter's samples"}
    judge_version, judge_scorer, _ = judge
    base = night.base if pc.base_model == night.base_spec else load_base_model(pc.base_model)
    limit = cfg.policy.max_examples
    train = newest(night.train, night.seqs, limit)
    held = [p for p in newest(night.held_pairs, night.seqs, limit) if isinstance(p, PairExample)]
    PROGRESS.report("policy-reference", 0, 0, message="training the policy adapter")
    result = train_policy(train, pc, base=base, progress=on_policy_progress)
    art = result.artifact(base, pc)
    del result  # the artifact holds the weights; evaluation rebuilds the adapter from them

    def on_eval(phase: str, step: int, total: int) -> None:
        PROGRESS.report(f"policy-{phase}", step, total, message="judging the policy adapter")

    report = evaluate_adapter(
        art,
        base,
        judge_scorer,
        held,
        name=f"nightly {job}",
        win_prompts=cfg.policy.win_prompts,
        progress=on_eval,
    )
    decision, meta, state = gate_entry(
        report, art.config, kind=POLICY_KIND, source=f"nightly:{job}"
    )
    meta["training"].update(
        {
            "data": art.config.get("training_data", {}),
            "examples": len(train),
            "of_train": len(night.train),
            "heldout_pairs": len(held),
            "data_seq": night.data_seq,
            "seconds": round(time.time() - t0, 1),
        }
    )
    meta.update({"judge": judge_version, "job": job})
    if not parent_alive():
        raise PalateError(
            "unavailable", "the daemon that started this run is gone; no policy was registered"
        )
    version, deployed = register(
        store,
        base_model=art.config["base_model"]["id"],
        meta=meta,
        artifact=artifacts.to_bytes(art),
        state=state,
        deploy_reason="nightly policy gate: " + "; ".join(decision.reasons)[:480]
        if decision.action == "deploy" and deploy
        else None,
        forget_count=night.forgets,
    )
    return {
        "version": version,
        "decision": decision.action,
        "reasons": decision.reasons,
        "deployed": deployed,
        "accuracy": report.get("accuracy"),
        "win_rate": report.get("win_rate"),
        "judge": judge_version,
        "seconds": round(time.time() - t0, 1),
    }


def run(job: str, *, deploy: bool = True, policy: GatePolicy | None = None) -> dict[str, Any]:
    paths = resolve()
    paths.use_private_tmp()  # normally inherited from the daemon; never the shared /tmp
    protect_process()  # this process holds the data key too: no core dumps, no ptrace
    cfg = load_config(paths)
    dek = KeyManager.for_home(paths).unwrap()
    try:
        store = Store(paths.db_file, dek)
    finally:
        zero(dek)
    try:
        policy = policy or _knobs(GatePolicy, "gate", cfg.gate)
        return _run(store, cfg, job, deploy, policy)
    finally:
        store.close()


def _run(store: Store, cfg: Config, job: str, deploy: bool, policy: GatePolicy) -> dict[str, Any]:
    out, night = _reward_night(store, cfg, job, deploy, policy)
    if cfg.policy.nightly:
        try:
            out["policy"] = nightly_policy(store, cfg, job, deploy, night)
        except Exception as e:  # the reward model's result stands whatever happens here
            traceback.print_exc(file=sys.stderr)
            message = e.message if isinstance(e, PalateError) else f"{type(e).__name__}: {e}"
            out["policy"] = {"error": message[:500]}
        PROGRESS.report("policy", 1, 1, message="policy run finished", outcome=out["policy"])
    return out


def _reward_night(
    store: Store, cfg: Config, job: str, deploy: bool, policy: GatePolicy
) -> tuple[dict[str, Any], Night]:
    """The reward model's part of the run (steps 1-5): its result, and what the nightly
    policy run reuses."""
    t0 = time.time()
    PROGRESS.report("load", 0, 0, message="reading feedback")
    frozen_epoch = store.frozen_cache_epoch()  # before reading: see keep_frozen
    forgets = store.forget_count()  # before reading: a forget from now on voids this run
    seqs: dict[str, int] = {}
    examples = load_examples(store, seqs)
    data_seq = store.max_seq()  # at least the newest event read (forget flags by it)
    split = split_items(examples, key=example_key)
    held_pairs = [e for e in split.heldout if isinstance(e, PairExample)]
    held_ratings = [e for e in split.heldout if isinstance(e, RatingExample)]
    if not split.train:
        raise PalateError(
            "invalid_request",
            "no feedback to train on yet; send some with `palate feedback` or enable an adapter",
        )
    tc = train_config(cfg)
    base = load_base_model(tc.base_model)
    compared = 2 if store.deployed_version() is not None else 1
    init_state, init_from = federated_start(store, tc)
    train_set: list[Example] = list(split.train)
    replay: dict[str, int] | None = None
    if init_state is None:
        init_state, init_from, since = deployed_start(store, base, tc)
        if init_state is not None and since > 0:
            # A warm start already knows the earlier data: tonight trains on what is new plus
            # a rehearsal sample, and needs no minimum step count (that is for cold starts).
            train_set, replay = replay_subset(split.train, seqs, since, tc.warm_replay, tc.seed)
            tc = replace(tc, min_steps=0)
    PROGRESS.set_plan(
        RunPlan(
            train_examples=len(train_set),
            heldout_examples=len(held_pairs) + len(held_ratings),
            models_compared=compared,
            epochs=tc.epochs,
            val_fraction=tc.val_fraction,
            prefix_cache=tc.prefix_cache and base.num_layers - tc.lora_layers > 0,
        )
    )
    lookup = FrozenLookup(store, base.content_hash)
    use_kept = tc.frozen_cache_mb > 0 and tc.prefix_cache
    result = train_reward_model(
        train_set,
        tc,
        on_progress,
        base=base,
        init_state=init_state,
        frozen=lookup if use_kept else None,
    )
    # One frozen pass over the held-out set and the probes for both models (model/prefix.py),
    # read from the store where an earlier night kept it.
    gate_prefix = (
        FrozenPrefix(
            base.content_hash,
            result.model.split,
            tc.cache_dtype,
            lookup if use_kept else None,
            max(0, tc.frozen_cache_mb) * 1024 * 1024,
        )
        if tc.prefix_cache and result.model.split > 0
        else None
    )

    judged = 0
    to_judge = len(held_pairs) * compared

    def on_chunk(n: int) -> None:
        nonlocal judged
        judged += n
        PROGRESS.report("evaluate", judged, to_judge, message="judging")

    PROGRESS.report("evaluate", 0, to_judge, message="judging")
    dep_metrics: Metrics | None = None
    dep_records: tuple[list[PairRecord], list[RatingRecord]] | None = None
    dep_version = None
    dep = deployed_scorer(store, base, gate_prefix)
    if dep is not None:
        dep_version, d_scorer, d_temp = dep
        dep_metrics, dep_records = judge(
            d_scorer, d_temp, held_pairs, held_ratings, on_chunk=on_chunk
        )
    scorer = Scorer(
        result.model, base.tokenizer, tc.max_tokens, result.calibration, prefix=gate_prefix
    )
    metrics, _ = judge(
        scorer,
        result.calibration.temperature,
        held_pairs,
        held_ratings,
        deployed=dep_records,
        on_chunk=on_chunk,
    )
    metrics["calibration_source"] = result.metrics.get("calibration_source")
    frozen_kept = (
        keep_frozen(store, lookup, result, tc, frozen_epoch, gate_prefix) if use_kept else None
    )
    if frozen_kept is not None and gate_prefix is not None:
        frozen_kept["gate"] = gate_prefix.stats()
    metrics["heldout"] = asdict(heldout_status(len(held_pairs)))
    decision: Decision = decide(metrics, dep_metrics, policy)

    summary = {
        **result.data_summary,
        "heldout_pairs": len(held_pairs),
        "heldout_ratings": len(held_ratings),
        "train_examples": len(train_set),
        **({"warm_replay": replay} if replay is not None else {}),
    }
    art = artifacts.artifact_from_model(
        result.model,
        artifacts.build_config(
            base,
            result.model.lora,  # the depth resolved on this base
            tc.max_tokens,
            result.calibration,
            summary,
            {"accuracy": metrics.get("accuracy")},
            tc.to_json(),
        ),
    )
    meta = {
        "metrics": metrics,
        "decision": decision.action,
        "reasons": decision.reasons,
        "checks": [c.to_json() for c in decision.checks],
        "deployed_metrics": dep_metrics,
        "compared_with": dep_version,
        "training": {
            "summary": summary,
            "history": result.history,
            "truncation": result.truncation.to_json(),
            "config": tc.to_json(),
            "init": init_from or "seed",
            "metrics": result.metrics,
            "seconds": round(time.time() - t0, 1),
            "data_seq": data_seq,
            "frozen_cache": frozen_kept,
        },
        "job": job,
    }
    state = {"deploy": "candidate", "reject": "rejected", "hold": "held"}[decision.action]
    if not parent_alive():
        raise PalateError(
            "unavailable", "the daemon that started this run is gone; nothing was registered"
        )
    version, deployed = register(
        store,
        base_model=tc.base_model,
        meta=meta,
        artifact=artifacts.to_bytes(art),
        state=state,
        deploy_reason="; ".join(decision.reasons)[:500]
        if decision.action == "deploy" and deploy
        else None,
        forget_count=forgets,
    )
    out = {
        "version": version,
        "decision": decision.action,
        "reasons": decision.reasons,
        "deployed": deployed,
        "accuracy": metrics.get("accuracy"),
        "seconds": round(time.time() - t0, 1),
    }
    night = Night(
        base=base,
        base_spec=tc.base_model,
        train=list(split.train),
        held_pairs=held_pairs,
        seqs=seqs,
        forgets=forgets,
        data_seq=data_seq,
    )
    return out, night


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="palate.runtime.training_child", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--job", required=True, help="job id given by the daemon")
    ap.add_argument("--no-deploy", action="store_true", help="register, never deploy")
    args = ap.parse_args(argv)
    try:
        result = run(args.job, deploy=not args.no_deploy)
    except PalateError as e:
        say("error", **e.to_wire())
        print(f"palate train: {e.message}", file=sys.stderr)
        return 2
    say("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
