"""How good is a policy adapter, measured against its base on held-out pairs.

- **Implicit-reward accuracy** (``accuracy``, ``n``): DPO's implicit reward is
  r(x, y) = β (log π(y|x) − log π_ref(y|x)); a held-out pair is right when
  r(chosen) > r(rejected) (ties wrong, as everywhere in Palate). The base, as a policy, has
  r ≡ 0: every pair is a tie, so its implicit accuracy is 0.5 with ties split; that is the
  bar ``base_accuracy`` names. ``mean_margin`` is the mean of r(chosen) − r(rejected).
  The plain likelihood preference (log π(chosen) > log π(rejected)) of policy and base is
  reported beside it.
- **Win rate** (``win_rate``): for held-out prompts, a policy sample and a base sample drawn
  with the same seed, judged by the reward model; ties count half; a 95% Wilson interval.
- **KL to the base** (``kl``): the exact per-token KL(π ‖ π_base) summed along the policy's
  own samples, averaged over samples (nats per response; ``kl_per_token`` beside it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from palate.evaluation.metrics import wilson_interval  # noqa: E402
from palate.events import PairExample  # noqa: E402
from palate.generation.policy import Policy, Rows, encode_rows, response_logprobs  # noqa: E402
from palate.generation.sampling import SampleConfig, prompt_ids, sample  # noqa: E402

__all__ = ["BASE_IMPLICIT_ACCURACY", "Judge", "evaluate_policy", "pair_logprobs"]

#: The base's implicit reward is identically zero: every pair ties, which splits to 0.5.
BASE_IMPLICIT_ACCURACY = 0.5
#: (prompt, candidates) -> raw reward of each candidate.
Judge = Callable[[Any, list[str]], Sequence[float]]


def pair_logprobs(
    lm: Any, tokenizer: Any, pairs: Sequence[PairExample], max_tokens: int, batch: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs (chosen, rejected) of each pair under ``lm``."""
    c: list[float] = []
    r: list[float] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        rows = encode_rows(
            tokenizer, [(p.prompt, [p.chosen, p.rejected]) for p in chunk], max_tokens
        )
        logp = np.array(response_logprobs(lm, rows)[0], dtype=np.float64)
        c.extend(logp[0::2])
        r.extend(logp[1::2])
    return np.asarray(c), np.asarray(r)


def _rows_from_ids(prompt: list[int], gens: Sequence[list[int]]) -> Rows:
    seqs = [prompt + g for g in gens]
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return Rows(
        tokens,
        np.full(len(seqs), len(prompt), np.int32),
        np.asarray([len(s) for s in seqs], np.int32),
    )


def kl_along(
    policy: Policy, base_lm: Any, prompt: list[int], tokens: Sequence[list[int]]
) -> np.ndarray:
    """Per-sample KL(π ‖ π_base) in nats, summed over the positions that produced each
    sample's tokens (the end-of-turn position is left out: which end token was drawn is not
    kept)."""
    gens = [t for t in tokens if t]
    if not gens:
        return np.zeros(0)
    rows = _rows_from_ids(prompt, gens)
    _, n, lp = response_logprobs(policy.lm, rows, full=True)  # type: ignore[misc]
    _, _, lb = response_logprobs(base_lm, rows, full=True)  # type: ignore[misc]
    kl = (mx.exp(lp) * (lp - lb)).sum(axis=-1)  # (S, R)
    mask = mx.arange(kl.shape[1])[None, :] < n[:, None]
    return np.array((kl * mask).sum(axis=1), dtype=np.float64)


def evaluate_policy(
    policy: Policy,
    pairs: Sequence[PairExample],
    *,
    judge: Judge | None,
    beta: float = 0.1,
    max_tokens: int = 384,
    win_prompts: int = 16,
    samples_per_prompt: int = 2,
    sampling: SampleConfig | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    between_steps: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Every number of ``palate policy eval --json`` (see the module docstring);
    ``between_steps`` is passed to the sampler (the daemon serves scores there)."""
    if not pairs:
        raise ValueError("no held-out pairs to evaluate on")
    base_lm = policy.base.model
    tok = policy.tokenizer
    report = progress or (lambda phase, i, n: None)
    report("logprobs", 0, 2)
    pc, pr = pair_logprobs(policy.lm, tok, pairs, max_tokens)
    report("logprobs", 1, 2)
    bc, br = pair_logprobs(base_lm, tok, pairs, max_tokens)
    report("logprobs", 2, 2)
    margin = beta * ((pc - bc) - (pr - br))
    n = len(pairs)
    correct = int((margin > 0).sum())
    lo, hi = wilson_interval(correct, n)
    out: dict[str, Any] = {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "ties": int((margin == 0).sum()),
        "ci_low": lo,
        "ci_high": hi,
        "base_accuracy": BASE_IMPLICIT_ACCURACY,
        "mean_margin": float(margin.mean()),
        "likelihood_accuracy": float((pc > pr).mean()),
        "base_likelihood_accuracy": float((bc > br).mean()),
        "beta": beta,
    }
    out.update(
        _samples(
            policy,
            base_lm,
            pairs,
            judge,
            win_prompts,
            samples_per_prompt,
            sampling or SampleConfig(max_tokens=96, temperature=0.8, seed=0),
            report,
            between_steps,
        )
    )
    return out


def _samples(
    policy: Policy,
    base_lm: Any,
    pairs: Sequence[PairExample],
    judge: Judge | None,
    n_prompts: int,
    k: int,
    sampling: SampleConfig,
    report: Callable[[str, int, int], None],
    between_steps: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Win rate (when there is a judge) and KL, from policy and base samples."""
    tok = policy.tokenizer
    prompts: list[Any] = []
    seen: set[str] = set()
    for p in pairs:
        key = repr(p.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(p.prompt)
        if len(prompts) == n_prompts:
            break
    wins, ties = 0.0, 0
    kls: list[float] = []
    lengths: list[int] = []
    judged = 0
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tok, prompt)
        cfg = SampleConfig(
            sampling.max_tokens,
            sampling.temperature,
            sampling.top_p,
            None if sampling.seed is None else sampling.seed + i,
        )
        ps = sample(policy.lm, tok, ids, k, cfg, between_steps=between_steps)
        kls.extend(kl_along(policy, base_lm, ids, ps.tokens))
        lengths.extend(len(t) for t in ps.tokens)
        if judge is not None:
            bs = sample(base_lm, tok, ids, k, cfg, between_steps=between_steps)
            scores = list(judge(prompt, ps.texts + bs.texts))
            for a, b in zip(scores[:k], scores[k:], strict=True):
                judged += 1
                if a > b:
                    wins += 1
                elif a == b:
                    wins += 0.5
                    ties += 1
        report("samples", i + 1, len(prompts))
    out: dict[str, Any] = {
        "kl": float(np.mean(kls)) if kls else 0.0,
        "kl_per_token": float(np.sum(kls) / max(sum(lengths), 1)),
        "kl_n": len(kls),
    }
    if judge is None:
        out.update({"win_rate": None, "win_n": 0, "win_ci_low": None, "win_ci_high": None})
        return out
    lo, hi = wilson_interval(round(wins), judged) if judged else (0.0, 1.0)
    out.update(
        {
            "win_rate": wins / judged if judged else None,
            "win_n": judged,
            "win_ties": ties,
            "win_ci_low": lo,
            "win_ci_high": hi,
        }
    )
    return out
