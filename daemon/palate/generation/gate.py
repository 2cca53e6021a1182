"""The policy gate: may this adapter serve generation? A pure function of its eval report.

Like the reward model's gate (palate.evaluation.gate): no I/O, no clock, the same inputs
always give the same verdict, every check is a sentence with its numbers, and the inputs are
stored with the decision so anyone can re-run it.

- ``deploy`` when every check passes: implicit-reward accuracy above the base's (0.5: the
  base's implicit reward is zero, every pair a tie), a win rate over base samples whose 95%
  interval lies above 50%, and a KL to the base within bounds.
- ``reject`` when one of them fails measurably.
- ``hold`` when there is too little to judge (too few held-out pairs, no judged samples).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PolicyDecision", "PolicyGate", "decide_policy", "gate_entry"]


def _h(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PolicyGate:
    min_pairs: int = _h(20, "below this many held-out pairs the gate holds")
    min_win_n: int = _h(8, "below this many judged policy-vs-base samples the gate holds")
    require_win_ci: bool = _h(True, "the win rate's 95% lower bound must exceed 50%")
    # The dev-slice adapters measured 4e-6 (lr 1e-5) and 2e-3 (lr 1e-4, 256 pairs) nats per
    # token (docs/benchmarks.md, "DPO"); 0.25 per token, 25 nats over a 100-token answer, is
    # far beyond them and catches an adapter that has collapsed onto a few phrases.
    max_kl_per_token: float = _h(0.25, "KL(policy || base) per sampled token must stay below")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PolicyDecision:
    action: str  # deploy | reject | hold
    reasons: list[str]
    checks: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide_policy(m: Mapping[str, Any], gate: PolicyGate | None = None) -> PolicyDecision:
    g = gate or PolicyGate()
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool | None, msg: str, on_fail: str = "reject") -> None:
        status = "skip" if ok is None else ("pass" if ok else "fail")
        checks.append({"name": name, "status": status, "on_fail": on_fail, "message": msg})

    n = int(m.get("n") or 0)
    check(
        "heldout_pairs",
        n >= g.min_pairs,
        f"{n} held-out pairs (the gate needs {g.min_pairs})",
        "hold",
    )
    acc, base = float(m.get("accuracy") or 0.0), float(m.get("base_accuracy", 0.5))
    check(
        "implicit_accuracy",
        acc > base,
        f"implicit-reward accuracy {acc:.1%} vs the base's {base:.1%}",
    )
    win_n = int(m.get("win_n") or 0)
    if m.get("win_rate") is None or win_n < g.min_win_n:
        check(
            "win_rate",
            False,
            f"{win_n} judged samples against the base (the gate needs {g.min_win_n} and a "
            "reward model to judge them)",
            "hold",
        )
    else:
        lo = float(m.get("win_ci_low") or 0.0)
        ok = lo > 0.5 if g.require_win_ci else float(m["win_rate"]) > 0.5
        check(
            "win_rate",
            ok,
            f"win rate over base samples {float(m['win_rate']):.1%} "
            f"(95% CI {lo:.1%}..{float(m.get('win_ci_high') or 1.0):.1%}, n={win_n})",
        )
    kl = float(m.get("kl_per_token") or 0.0)
    check(
        "kl",
        kl <= g.max_kl_per_token,
        f"KL to the base {kl:.3f} nats per token (bound {g.max_kl_per_token:g}; "
        f"{float(m.get('kl') or 0.0):.2f} per response)",
    )
    failed = [c for c in checks if c["status"] == "fail"]
    if any(c["on_fail"] == "reject" for c in failed):
        action = "reject"
    elif failed:
        action = "hold"
    else:
        action = "deploy"
    reasons = [c["message"] for c in failed] or ["every check passed"]
    return PolicyDecision(action, reasons, checks)


#: The registry state of a policy version by its gate decision (as the reward model's).
STATES = {"deploy": "candidate", "reject": "rejected", "hold": "held"}


def gate_entry(
    report: Mapping[str, Any], config: Mapping[str, Any], *, kind: str, source: str
) -> tuple[PolicyDecision, dict[str, Any], str]:
    """The gate's decision on an adapter's eval ``report`` and what the registry stores
    with it: (decision, meta, state). ``config`` is the adapter artifact's config; ``kind``
    the registry kind (the store's POLICY_KIND); ``source`` where the adapter came from.
    ``policy_register`` and the nightly policy run both register through this."""
    decision = decide_policy(report)
    meta = {
        "kind": kind,
        "metrics": dict(report),
        "decision": decision.action,
        "reasons": decision.reasons,
        "checks": decision.checks,
        "training": {
            "config": config.get("train_config", {}),
            "metrics": config.get("metrics", {}),
        },
        "source": source,
    }
    return decision, meta, STATES[decision.action]
