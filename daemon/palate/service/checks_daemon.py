"""Doctor checks of the running daemon: is it up, and how did its last training run go."""

from __future__ import annotations

import time
from typing import Any

from palate.errors import PalateError
from palate.paths import Paths
from palate.service.check import Check

#: A last success older than this, while the schedule is on, deserves a look.
STALE_SUCCESS_S = 3 * 86400


def _daemon(paths: Paths) -> Check:
    from palate.wire.client import Client

    try:
        with Client(socket_path=paths.socket, timeout=5) as c:
            hello = c.hello("palate-doctor")
        return Check("daemon", "ok", f"running, pid {hello['pid']}, version {hello['version']}")
    except PalateError as e:
        return Check("daemon", "warn", e.message, "start it with `palate daemon`")


def training_check(paths: Paths, status: dict[str, Any] | None = None) -> Check:
    """The last training run and its outcome, from the daemon (persisted in the store)."""
    if status is None:
        from palate.wire.client import Client

        try:
            with Client(socket_path=paths.socket, timeout=10) as c:
                status = c.status()
        except PalateError as e:
            return Check("training", "warn", f"cannot tell: {e.message}", "start the daemon")
    sched = status.get("schedule") or {}
    current = (status.get("training") or {}).get("current")
    if current:
        return Check("training", "ok", _running(current))
    last = sched.get("last_result") or _from_jobs(status)
    success = sched.get("last_success")
    nxt = sched.get("next_run")
    when_next = f"; next scheduled run {_ago(nxt)}" if isinstance(nxt, (int, float)) else ""
    if not last:
        return Check(
            "training",
            "ok",
            f"no training run yet{when_next}",
            "send feedback, then wait for the night or run `palate train --now`",
        )
    desc = _describe(last)
    if last.get("outcome") != "done":
        prev = f"; last success {_ago(success['ts'])}" if success else "; never succeeded"
        return Check(
            "training",
            "warn",
            f"last run {desc}{prev}",
            "see `palate service logs`; retry with `palate train --now`",
        )
    if sched.get("enabled") and time.time() - float(last.get("ts") or 0) > STALE_SUCCESS_S:
        blocked = "; ".join(sched.get("blocked") or []) or "no run was due"
        return Check(
            "training",
            "warn",
            f"last run {desc}, more than 3 days ago ({blocked})",
            "`palate schedule` shows what blocks the nightly run",
        )
    return Check("training", "ok", f"last run {desc}{when_next}")


def _running(job: dict[str, Any]) -> str:
    """A run in progress, as ``status`` reports it: phase N of M, percent, overall ETA."""
    p = job.get("progress") or {}
    text = f"run {job.get('id')} in progress (started {_ago(float(job.get('started') or 0))})"
    phase = p.get("phase_name") or job.get("phase") or "starting"
    if p.get("phase_index") and p.get("phases"):
        text += f": phase {p['phase_index']} of {p['phases']} ({phase})"
    else:
        text += f": {phase}"
    if isinstance(p.get("phase_percent"), (int, float)):
        text += f", {p['phase_percent']:.0f}%"
    eta = p.get("overall_eta_s")
    if isinstance(eta, (int, float)):
        text += f", whole run about {max(1, round(eta / 60))} min left"
    return text


def _from_jobs(status: dict[str, Any]) -> dict[str, Any] | None:
    job = (status.get("training") or {}).get("last")
    return job_as_result(job) if job else None


def job_as_result(job: dict[str, Any]) -> dict[str, Any]:
    """A finished job from ``status.training`` in the shape of ``schedule.last_result``."""
    res = job.get("result") or {}
    return {
        "job": job.get("id"),
        "ts": job.get("finished"),
        "outcome": job.get("outcome"),
        "error": job.get("error"),
        "version": res.get("version"),
        "decision": res.get("decision"),
        "deployed": res.get("deployed"),
        **({"policy": res["policy"]} if res.get("policy") is not None else {}),
    }


def _ago(ts: float) -> str:
    d = time.time() - ts
    span = f"{abs(d) / 3600:.1f} h" if abs(d) >= 3600 else f"{abs(d) / 60:.0f} min"
    return f"in {span}" if d < 0 else f"{span} ago"


def _describe(r: dict[str, Any]) -> str:
    text = f"{r.get('outcome')} {_ago(float(r.get('ts') or time.time()))}"
    if r.get("version") is not None:
        text += f" (version {r['version']}: {r.get('decision')}"
        text += ", deployed)" if r.get("deployed") else ")"
    if r.get("error"):
        text += f": {str(r['error'])[:200]}"
    return text
