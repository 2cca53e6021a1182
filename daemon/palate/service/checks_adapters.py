"""Doctor checks of the ways feedback comes in: each enabled adapter and the browser bridge.

For every enabled adapter: does it load with its options, does the folder it reads exist
(and hold anything yet), and is its process running *and connected* to the daemon's socket
(the supervisor hears ``connected``/``unavailable`` from each child). For the browser: the
host manifests ``palate browser install`` wrote, the launcher they point at, and whether the
socket that launcher pins is the one the daemon serves.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from palate.config import load_config
from palate.errors import PalateError
from palate.paths import SOCKET_ENV, Paths
from palate.service.check import Check

#: How many folders a check names before it says "and N more".
_SHOW = 3


def _daemon_status(paths: Paths) -> dict[str, Any] | None:
    from palate.wire.client import Client

    try:
        with Client(socket_path=paths.socket, timeout=10) as c:
            return c.status()
    except PalateError:
        return None


def adapter_checks(paths: Paths, status: Mapping[str, Any] | None = None) -> list[Check]:
    """One check per enabled adapter: loads, has an input folder, runs connected."""
    try:
        config = load_config(paths)
    except PalateError as e:
        return [Check("adapters", "fail", e.message, f"fix {paths.config_file}")]
    names = config.adapters.enabled()
    if not names:
        return [
            Check(
                "adapters",
                "ok",
                "no adapter enabled: feedback comes only from clients and the browser",
                "enable one in config.toml ([adapters.<name>] enabled = true; docs/plugins.md)",
            )
        ]
    if status is None:
        status = _daemon_status(paths)
    live = {a.get("name"): a for a in (status or {}).get("adapters") or []}
    return [_one_adapter(paths, config, name, status, live.get(name)) for name in names]


def _one_adapter(
    paths: Paths,
    config: Any,
    name: str,
    status: Mapping[str, Any] | None,
    live: Mapping[str, Any] | None,
) -> Check:
    from palate.adapters import AdapterContext, AdapterError, check_options, load_adapter

    label = f"adapter {name}"
    table = f"[adapters.{name}] in {paths.config_file}"
    try:
        options = config.adapters.options(name)
        adapter = load_adapter(name, options.get("module"))
        options = check_options(adapter, options)
    except AdapterError as e:
        return Check(label, "fail", str(e), f"fix {table}, or install the adapter's package")

    notes: list[str] = []
    roots_fn = getattr(adapter, "roots", None)
    if callable(roots_fn):
        ctx = AdapterContext(name, options=options, home=paths.home)
        roots = [Path(r) for r in roots_fn(ctx)]
        present = [r for r in roots if r.is_dir()]
        if not present:
            shown = ", ".join(str(r) for r in roots[:_SHOW])
            return Check(
                label,
                "warn",
                f"its input folder does not exist: {shown}",
                f"use the tool once so it writes its log there, or point {table} at the "
                "folder it writes (docs/plugins.md lists each adapter's option)",
            )
        files = _matching_files(adapter, present)
        where = ", ".join(str(r) for r in present[:_SHOW])
        notes.append(f"reads {where} ({files} file(s) so far)")

    if status is None:
        return Check(
            label,
            "warn",
            "; ".join([*notes, "the daemon is not running, so neither is the adapter"]),
            "start the daemon (`palate daemon` or `palate service install`)",
        )
    if live is None:
        return Check(
            label,
            "warn",
            "; ".join([*notes, "enabled in config.toml but not supervised by this daemon"]),
            "restart the daemon to start it (`palate service restart`)",
        )
    state = live.get("state")
    err = live.get("last_error") or ""
    if state == "failed":
        return Check(label, "fail", f"could not start: {err}", f"fix {table}")
    socket = str((status.get("daemon") or {}).get("socket") or paths.socket)
    if live.get("connected") is False:
        return Check(
            label,
            "fail",
            f"runs but cannot reach the daemon's socket {socket}: {err}",
            "restart the daemon (`palate service restart`); an adapter must inherit the "
            f"daemon's {SOCKET_ENV}, never derive the socket from its own environment",
        )
    if live.get("connected") and live.get("socket") and live.get("socket") != socket:
        return Check(
            label,
            "fail",
            f"connected to {live.get('socket')}, but the daemon serves {socket}",
            "restart the daemon (`palate service restart`)",
        )
    events = int(live.get("events") or 0)
    conn = "connected" if live.get("connected") else "not connected yet"
    detail = "; ".join([*notes, f"{state}, {conn}, {events} event(s) sent"])
    if state in ("backoff", "crashed"):
        return Check(
            label,
            "warn",
            f"{detail}; restarting after: {err}",
            f"see {paths.log_dir / 'adapters' / (name + '.log')}",
        )
    return Check(label, "ok", detail)


def _matching_files(adapter: Any, roots: list[Path], limit: int = 10_000) -> int:
    patterns = [*getattr(adapter, "patterns", ()), *getattr(adapter, "documents", ())]
    n = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for f in names:
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                if not patterns or any(fnmatch.fnmatch(rel, p) for p in patterns):
                    n += 1
                    if n >= limit:
                        return n
    return n


def browser_check(
    paths: Paths, status: Mapping[str, Any] | None = None, user_home: Path | None = None
) -> Check:
    """The browser bridge: manifests, the launcher they start, and the socket it pins."""
    from palate.adapters.native_host import BROWSERS, HOST_NAME, manifest_dir, read_launcher

    launcher = paths.home / "browser" / "palate-native-host"
    manifests = {
        b: manifest_dir(b, home=user_home) / f"{HOST_NAME}.json"
        for b in BROWSERS
        if (manifest_dir(b, home=user_home) / f"{HOST_NAME}.json").exists()
    }
    if not manifests and not launcher.exists():
        return Check(
            "browser",
            "ok",
            "the browser extension is not connected",
            "run `palate browser install` to let the extension send feedback",
        )
    fix = "run `palate browser install` again"
    problems: list[str] = []
    for b, path in sorted(manifests.items()):
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"{b} manifest {path} is unreadable ({e})")
            continue
        target = Path(str(m.get("path", "")))
        if m.get("name") != HOST_NAME or not target.is_absolute():
            problems.append(f"{b} manifest {path} is not Palate's (name or path wrong)")
        elif not os.access(target, os.X_OK):
            problems.append(f"{b} manifest points at {target}, which is missing or not executable")
    if not manifests:
        problems.append("a launcher exists but no browser has a host manifest")
    if not launcher.exists():
        return Check("browser", "fail", "; ".join([*problems, f"no launcher at {launcher}"]), fix)
    if not (paths.home / "browser" / "allowed.json").exists():
        problems.append("no allow list (browser/allowed.json): every caller is refused")
    pinned = read_launcher(launcher)
    want = str((status or {}).get("daemon", {}).get("socket") or paths.socket)
    if SOCKET_ENV not in pinned:
        problems.append(
            f"the launcher pins no {SOCKET_ENV} (written by an older Palate): under the default "
            "layout it looks for the socket in the wrong place"
        )
    elif pinned[SOCKET_ENV] != want:
        problems.append(f"the launcher pins socket {pinned[SOCKET_ENV]}, the daemon uses {want}")
    if problems:
        return Check("browser", "fail", "; ".join(problems), fix)
    return Check(
        "browser",
        "ok",
        f"host manifests for {', '.join(sorted(manifests))}; launcher {launcher} -> {want}",
    )
