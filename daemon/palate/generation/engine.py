"""``generate``: N candidates from the policy, scored by the reward model, one picked.

The one function both the daemon (on its MLX thread) and ``palate generate --reward-model``
(in process) call, so both answer in the same shape (docs/protocol.md, ``generate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from palate.generation.policy import Policy
from palate.generation.sampling import SampleConfig, sample
from palate.generation.strategies import DEFAULT_KAPPA, DEFAULT_LAMBDA, choose

__all__ = ["GenerateRequest", "generate", "uncertainty_of"]

#: (prompt, candidates) -> palate.model.scoring.ScoreResult (raw, z, truncated[, members,
#: uncertainty]).
ScoreFn = Callable[[str, list[str]], Any]


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    n: int = 4
    strategy: str = "best"
    lam: float = DEFAULT_LAMBDA  # soft best-of-N temperature, in z units
    kappa: float = DEFAULT_KAPPA  # lower bound: score - kappa * uncertainty
    sampling: SampleConfig = field(default_factory=SampleConfig)


def uncertainty_of(res: Any) -> list[float] | None:
    """Per-candidate member spread when the scorer is an ensemble of more than one member."""
    unc = getattr(res, "uncertainty", None)
    members = getattr(res, "members", None)
    if not unc or (members and len(members[0]) <= 1):
        return None
    return [float(u) for u in unc]


def generate(
    policy: Policy,
    score: ScoreFn,
    req: GenerateRequest,
    *,
    between_steps: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Sample, score and choose; the wire answer without the reward model's ``version``."""
    s = sample(
        policy.lm, policy.tokenizer, req.prompt, req.n, req.sampling, between_steps=between_steps
    )
    t0 = time.perf_counter()
    res = score(req.prompt, s.texts)
    score_s = time.perf_counter() - t0
    unc = uncertainty_of(res)
    pick = choose(
        list(res.raw),
        list(res.z),
        req.strategy,
        lam=req.lam,
        kappa=req.kappa,
        uncertainty=unc,
        seed=req.sampling.seed,
    )
    out: dict[str, Any] = {
        "best": s.texts[pick.index],
        "best_index": pick.index,
        "candidates": s.texts,
        "scores": [float(x) for x in res.raw],
        "z": [float(x) for x in res.z],
        "truncated": list(res.truncated),
        "finish": s.finish,
        "strategy": req.strategy,
        "policy": policy.describe(),
        "usage": _usage(s, score_s),
    }
    if unc is not None:
        out["uncertainty"] = unc
    if pick.weights is not None:
        out["probabilities" if req.strategy == "soft" else "lower_bounds"] = pick.weights
    if pick.fallback:
        out["note"] = pick.fallback
    return out


def _usage(s: Any, score_s: float) -> dict[str, Any]:
    gen = s.generated_tokens
    return {
        "prompt_tokens": s.prompt_tokens,
        "prompt_tokens_cut": s.prompt_tokens_cut,
        "generated_tokens": gen,
        "prefill_s": round(s.prefill_s, 4),
        "decode_s": round(s.decode_s, 4),
        "score_s": round(score_s, 4),
        "tokens_per_s": round(gen / max(s.prefill_s + s.decode_s, 1e-9), 2),
    }
