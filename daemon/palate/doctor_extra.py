"""More ``palate doctor`` checks: the login service, disk space, the last training run and
a locked macOS keychain. Each returns a ``doctor.Check`` with a fix for every failure and
never raises for an expected condition (``run_checks`` still guards against bugs).

Appended to ``doctor.CHECKS`` by palate.doctor.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .doctor import Check
from .errors import PalateError
from .paths import Paths
from .service import Runner, ServiceContext, manager_for, subprocess_runner

#: Below this much free space SQLite commits and checkpoints start failing (storage_full).
DISK_FAIL_BYTES = 512 * 1024**2
#: Below this a training run (the base model's activations cache, new versions) may not fit.
DISK_WARN_BYTES = 2 * 1024**3
#: A last success older than this, while the schedule is on, deserves a look.
STALE_SUCCESS_S = 3 * 86400


def service_check(paths: Paths, ctx: ServiceContext | None = None) -> Check:
    """Installed, enabled and running under launchd / systemd --user?"""
    try:
        st = manager_for(ctx or ServiceContext.detect(paths=paths)).status()
    except PalateError as e:
        return Check("service", "warn", e.message, "run `palate daemon` yourself")
    if st.disabled_by_user:
        return Check("service", "fail", st.detail, st.fix)
    if st.running:
        return Check("service", "ok", f"{st.manager}: {st.detail}")
    if not st.installed:
        return Check(
            "service",
            "warn",
            f"not installed ({st.file} absent): the daemon will not start at login",
            "run `palate service install`",
        )
    return Check("service", "warn", f"{st.manager}: {st.state}; {st.detail}".rstrip("; "), st.fix)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(paths: Paths) -> Check:
    """Free space where the database lives (a full disk fails commits, so ingestion)."""
    where = _existing(paths.data_dir)
    free = shutil.disk_usage(where).free
    text = f"{free / 1024**3:.1f} GiB free on the volume of {where}"
    if free < DISK_FAIL_BYTES:
        return Check(
            "disk",
            "fail",
            text + "; new feedback cannot be stored",
            "free disk space; `palate models` lists old versions you can drop",
        )
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", text + "; training may not fit", "free some disk space")
    return Check("disk", "ok", text)


def training_check(paths: Paths, status: dict[str, Any] | None = None) -> Check:
    """The last training run and its outcome, from the daemon (persisted in the store)."""
    if status is None:
        from .client import Client

        try:
            with Client(socket_path=paths.socket, timeout=10) as c:
                status = c.status()
        except PalateError as e:
            return Check("training", "warn", f"cannot tell: {e.message}", "start the daemon")
    sched = status.get("schedule") or {}
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


def _from_jobs(status: dict[str, Any]) -> dict[str, Any] | None:
    job = (status.get("training") or {}).get("last")
    if not job:
        return None
    res = job.get("result") or {}
    return {
        "job": job.get("id"),
        "ts": job.get("finished"),
        "outcome": job.get("outcome"),
        "error": job.get("error"),
        "version": res.get("version"),
        "decision": res.get("decision"),
        "deployed": res.get("deployed"),
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


# --- macOS keychain ---------------------------------------------------------------------

#: Security framework status codes that show up in `security` output and keyring errors.
ERR_INTERACTION_NOT_ALLOWED = -25308  # locked, and no UI to ask (SSH, launchd user/ domain)
ERR_AUTH_FAILED = -25293
ERR_NO_SUCH_KEYCHAIN = -25294


def classify_keychain(text: str, returncode: int = 1) -> Check:
    """Map ``security show-keychain-info`` (or a keyring error) to a check."""
    low = text.lower()
    codes = {int(c) for c in re.findall(r"-25\d\d\d", text)}
    if returncode == 0:
        return Check("keychain", "ok", f"default keychain is unlocked ({text.strip()[:120]})")
    if ERR_INTERACTION_NOT_ALLOWED in codes or "user interaction is not allowed" in low:
        return Check(
            "keychain",
            "fail",
            "the login keychain is locked, and nothing can ask you for its password here "
            "(an SSH session, or the agent runs outside your GUI login); the daemon cannot "
            "unwrap its key",
            "unlock it: `security unlock-keychain ~/Library/Keychains/login.keychain-db`, "
            "or log in at the Mac; then `palate service restart`",
        )
    if ERR_NO_SUCH_KEYCHAIN in codes or "could not be found" in low:
        return Check(
            "keychain",
            "fail",
            "no login keychain found",
            "open Keychain Access and create/reset the login keychain, or use the file "
            "backend: `palate key rotate --backend file`",
        )
    if ERR_AUTH_FAILED in codes:
        return Check(
            "keychain",
            "fail",
            "the login keychain password does not match your login password",
            "Keychain Access › Settings › Reset Default Keychains (or update its password)",
        )
    return Check("keychain", "warn", f"keychain state unclear: {text.strip()[:200]}")


def keychain_lock_check(
    paths: Paths, runner: Runner = subprocess_runner, platform: str = sys.platform
) -> Check:
    """On macOS: is the login keychain (which holds the key ``palate``) unlocked?"""
    if platform != "darwin":
        return Check("keychain", "ok", "not macOS: no login keychain to unlock")
    r = runner(["security", "show-keychain-info"], capture=True, timeout=10)
    return classify_keychain(r.stdout + r.stderr, r.returncode)


#: In doctor's order; each takes the Paths like the checks in ``doctor.CHECKS``.
EXTRA_CHECKS: list[Callable[[Paths], Check]] = [
    service_check,
    disk_check,
    training_check,
    keychain_lock_check,
]
