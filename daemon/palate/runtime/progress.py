"""Where a training run stands as a whole: phase N of M, and an ETA for the whole run.

The trainer reports each phase on its own (the cache pass knows its tokens, the training loop
its steps), so an ETA taken from the current phase alone says "20 min" while train, validate
and evaluate still follow. :class:`RunProgress` wraps every progress line of a run
(training_child.py) with:

- ``phase_index`` / ``phases``: which of :data:`PHASES` this is ("phase 3 of 5");
- ``phase_percent``: how far the current phase is;
- ``overall_eta_s``: the current phase's remaining time plus an estimate of every phase still
  to come, and ``percent``: elapsed / (elapsed + overall_eta_s) of the whole run.

The later phases are estimated from rates measured earlier in the same run, so the figure
needs no history and adapts to the machine. The cache pass runs the frozen blocks over every
token once; training runs the top blocks over the training tokens, forward and backward, once
per epoch; evaluation runs the whole model over the held-out texts, once per model compared.
Relative speeds per token (docs/benchmarks.md, SmolLM2-135M on 2 cores: cache 270 tok/s,
training 399 tok/s, held-out scoring ~234 tok/s) give :data:`TRAIN_VS_CACHE` and
:data:`SCORE_VS_CACHE`. Until the first rate is measured (load, encode) the overall ETA is
unknown (``None``), never a guess; each phase's own measurement replaces the estimate as soon
as that phase runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: The phases of a run from the store, in order. ``validate`` (interleaved with training) and
#: the trainer's ``done`` count as ``train``.
PHASES = ("load", "encode", "cache", "train", "evaluate")
_ALIAS = {"validate": "train", "done": "train"}
#: Training tokens per second relative to cache-pass tokens per second (399 / 270 measured).
TRAIN_VS_CACHE = 1.45
#: Held-out scoring (every block) tokens per second relative to the cache pass (234 / 270).
SCORE_VS_CACHE = 0.85


@dataclass
class RunPlan:
    """What the run will process, known once the feedback is read and split."""

    train_examples: int
    heldout_examples: int
    models_compared: int  # 1, or 2 when a deployed model is re-scored on the same pairs
    epochs: int
    val_fraction: float
    prefix_cache: bool


class RunProgress:
    """Adds run-level position and ETA to each progress line before it is sent."""

    def __init__(
        self, send: Callable[[dict[str, Any]], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.send = send
        self.clock = clock
        self.t0 = clock()
        self.plan: RunPlan | None = None
        self.phase = ""
        self.phase_t0 = self.t0
        self.cache_tokens: int | None = None
        self.cache_rate: float | None = None  # tokens/s through the frozen blocks
        self.train_rate: float | None = None  # tokens/s through the trained blocks
        self._last_eta: tuple[str, float, float] | None = None  # (phase, eta, when)

    def set_plan(self, plan: RunPlan) -> None:
        self.plan = plan

    def phases(self) -> list[str]:
        if self.plan is not None and not self.plan.prefix_cache:
            return [p for p in PHASES if p != "cache"]
        return list(PHASES)

    def report(self, phase: str, step: int, total: int, **extra: Any) -> dict[str, Any]:
        """Build (and send) one progress line; returns it."""
        name = _ALIAS.get(phase, phase)
        now = self.clock()
        if name != self.phase:
            self.phase, self.phase_t0 = name, now
        self._measure(name, step, total, extra)
        phases = self.phases()
        eta = extra.get("eta_s")
        if eta is None:
            eta = self._phase_eta(name, step, total, now)
        if eta is None and self._last_eta and self._last_eta[0] == name:
            # A validation pass inside training reports no ETA of its own: count down the
            # last one rather than blank the figure every epoch.
            eta = max(0.0, self._last_eta[1] - (now - self._last_eta[2]))
        elif eta is not None:
            self._last_eta = (name, float(eta), now)
        overall = self._overall_eta(name, eta)
        elapsed = now - self.t0
        line = {
            **extra,
            "phase": phase,
            "step": step,
            "total": total,
            "phase_index": phases.index(name) + 1 if name in phases else None,
            "phases": len(phases),
            "phase_name": name,
            "phase_percent": round(100.0 * step / total, 1) if total else None,
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(elapsed, 1),
            "overall_eta_s": None if overall is None else round(overall, 1),
            "percent": None
            if overall is None
            else round(100.0 * elapsed / max(elapsed + overall, 1e-9), 1),
        }
        self.send(line)
        return line

    # -- estimates -------------------------------------------------------------------------
    def _measure(self, name: str, step: int, total: int, extra: dict[str, Any]) -> None:
        rate = extra.get("tokens_per_s")
        if name == "cache":
            self.cache_tokens = total or self.cache_tokens
            if isinstance(rate, (int, float)) and rate > 0:
                self.cache_rate = float(rate)
        elif name == "train" and isinstance(rate, (int, float)) and rate > 0:
            self.train_rate = float(rate)

    def _phase_eta(self, name: str, step: int, total: int, now: float) -> float | None:
        """Remaining time of a phase that reports steps but no ETA (evaluate)."""
        if name == "evaluate" and total and step > 0:
            spent = now - self.phase_t0
            return spent / step * (total - step)
        if name == "evaluate" and total and step == 0:
            return self._eval_estimate()
        return None

    def _score_rate(self) -> float | None:
        if self.cache_rate:
            return self.cache_rate * SCORE_VS_CACHE
        if self.train_rate:
            return self.train_rate / TRAIN_VS_CACHE * SCORE_VS_CACHE
        return None

    def _train_estimate(self) -> float | None:
        p = self.plan
        if p is None or not self.cache_rate or not self.cache_tokens:
            return None
        tokens = self.cache_tokens * (1.0 - p.val_fraction) * p.epochs
        return tokens / (self.cache_rate * TRAIN_VS_CACHE)

    def _eval_estimate(self) -> float | None:
        p, rate = self.plan, self._score_rate()
        if p is None or rate is None or not self.cache_tokens or not p.train_examples:
            return None
        per_example = self.cache_tokens / p.train_examples
        return per_example * p.heldout_examples * p.models_compared / rate

    def _overall_eta(self, name: str, phase_eta: float | None) -> float | None:
        if name in ("load", "encode"):
            return None
        if phase_eta is None:
            return None
        later: list[float | None] = []
        if name == "cache":
            later = [self._train_estimate(), self._eval_estimate()]
        elif name == "train":
            later = [self._eval_estimate()]
        if any(x is None for x in later):
            return None
        return phase_eta + sum(x for x in later if x is not None)
