"""``palate service ...`` and ``palate schedule``: thin click commands over service.py and
the daemon's ``status``.

Registered by palate.cli.main (``cli.add_command(service)``, ``cli.add_command(schedule)``).
Like cli_adapters, this module does not import palate.cli.main at import time, so either can be
imported first.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from palate.cli.common import emit as _print
from palate.cli.common import fail as _fail
from palate.cli.common import json_option as _json
from palate.errors import PalateError
from palate.service.manager import (
    Report,
    ServiceContext,
    ServiceManager,
    ServiceStatus,
    manager_for,
)


def make_manager() -> ServiceManager:
    """This platform's service manager over the real commands (tests replace this)."""
    return manager_for(ServiceContext.detect())


def _show_report(r: dict[str, Any]) -> None:
    if r.get("content") is not None:
        click.echo(f"# {r['file']}")
        click.echo(r["content"].rstrip("\n"))
        click.echo("# commands")
    elif r.get("written"):
        click.echo(f"wrote {r['file']}")
    elif r.get("removed"):
        click.echo(f"removed {r['file']}")
    for c in r["commands"]:
        rc = c["returncode"]
        click.echo(("  $ " if rc is None else f"  [{rc}] $ ") + " ".join(c["argv"]))
    for note in r["notes"]:
        click.echo(note)


@click.group()
def service() -> None:
    """Run the daemon at login: a LaunchAgent on macOS, a systemd --user unit on Linux.

    `palate service install` writes the file and starts the daemon; it then starts at every
    login and restarts after a crash, but stays stopped after a clean stop.
    """


@service.command()
@click.option("--dry-run", is_flag=True, help="Show the file and commands; change nothing.")
@_json
def install(dry_run: bool, as_json: bool) -> None:
    """Install (or update) the login service and start the daemon."""
    try:
        if not dry_run and not as_json:
            from palate.cli.keys import interactive, recovery_walkthrough
            from palate.paths import resolve

            if interactive():  # before the daemon starts: it then uses the key made here
                recovery_walkthrough(resolve())
        m = make_manager()
        report: Report = m.dry_run() if dry_run else m.install()
    except PalateError as e:
        _fail(e, as_json)
    _print(report.to_dict(), as_json, _show_report)


@service.command()
@_json
def uninstall(as_json: bool) -> None:
    """Stop the daemon and remove the login service (your data is kept)."""
    try:
        report = make_manager().uninstall()
    except PalateError as e:
        _fail(e, as_json)

    def human(r: dict[str, Any]) -> None:
        _show_report(r)
        if not r["removed"]:
            click.echo("the service was not installed")

    _print(report.to_dict(), as_json, human)


@service.command()
@_json
def status(as_json: bool) -> None:
    """Is the service installed, enabled and running? Exit 3 when it is not running."""
    try:
        st: ServiceStatus = make_manager().status()
    except PalateError as e:
        _fail(e, as_json)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"manager  {d['manager']}" + (f" ({d['domain']})" if d["domain"] else ""))
        click.echo(f"file     {d['file']}" + ("" if d["installed"] else " (absent)"))
        click.echo(f"state    {d['state']}" + (f", pid {d['pid']}" if d["pid"] else ""))
        if d["detail"]:
            click.echo(f"         {d['detail']}")
        if d["fix"]:
            click.echo(f"fix      {d['fix']}")

    _print(st.to_dict(), as_json, human)
    if not st.running:
        sys.exit(3)


@service.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
def logs(lines: int, follow: bool) -> None:
    """Show the daemon's log (journalctl on Linux, else Palate's own daemon.log)."""
    try:
        text = make_manager().logs(lines, follow)
    except PalateError as e:
        _fail(e)
    if text is not None:
        click.echo(text.rstrip("\n"))


@service.command()
@_json
def restart(as_json: bool) -> None:
    """Restart the daemon through the service manager."""
    try:
        report = make_manager().restart()
    except PalateError as e:
        _fail(e, as_json)
    _print(report.to_dict(), as_json, _show_report)


# --- palate schedule ------------------------------------------------------------------------


def _offline_schedule() -> dict[str, Any]:
    """Without a daemon: the configured schedule and what this machine's probes say now."""
    from dataclasses import asdict

    from palate.config import load_config
    from palate.paths import resolve
    from palate.runtime.power import Probes
    from palate.runtime.scheduler import idle_condition, iso, next_slot_after, power_condition

    cfg = load_config(resolve()).schedule
    probes = Probes()
    conditions = []
    if cfg.require_ac:
        conditions.append(power_condition(probes.power()))
    if cfg.require_idle_s > 0:
        conditions.append(idle_condition(probes.idle(), cfg))
    nxt = next_slot_after(time.time(), cfg.time) if cfg.enabled else None
    return {
        "daemon": False,
        "enabled": cfg.enabled,
        "config": asdict(cfg),
        "next_run": nxt,
        "next_run_local": iso(nxt),
        "conditions": [asdict(c) for c in conditions],
        "blocked": [],
        "last_attempt": None,
        "last_success": None,
        "last_result": None,
    }


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    delta = ts - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    if abs(delta) < 60:
        return f"{stamp} (now)"
    mins = int(abs(delta) // 60)
    span = f"{mins // 60}h{mins % 60:02d}m" if mins >= 60 else f"{mins}m"
    return f"{stamp} ({'in ' + span if delta > 0 else span + ' ago'})"


def _run_line(r: dict[str, Any] | None) -> str:
    if not r:
        return "never"
    what = r.get("outcome") or "?"
    if r.get("version") is not None:
        verdict = {
            "reject": "rejected by the gate",
            "hold": "held by the gate",
            "deploy": "approved by the gate",
        }
        decision = r.get("decision") or ""
        what += f", version {r['version']} {verdict.get(decision, decision)}".rstrip()
        what += " (deployed)" if r.get("deployed") else ""
    if r.get("error"):
        what += f": {r['error']}"
    if r.get("policy"):
        what += f"; {policy_outcome(r['policy'])}"
    return f"{_when(r.get('ts'))} run {r.get('job')}: {what}"


def policy_outcome(p: dict[str, Any]) -> str:
    """The nightly policy run's outcome (``[policy] nightly = true``) in a few words."""
    if p.get("error"):
        return f"policy run failed: {str(p['error'])[:200]}"
    if p.get("skipped"):
        return f"policy run skipped: {p['skipped']}"
    verdict = {"reject": "rejected by", "hold": "held by", "deploy": "approved by"}
    text = f"policy version {p.get('version')} {verdict.get(p.get('decision') or '', '?')} its gate"
    return text + (" (deployed)" if p.get("deployed") else "")


def _show_schedule(d: dict[str, Any]) -> None:
    cfg = d["config"]
    state = "enabled" if d["enabled"] else "disabled ([schedule] enabled = false)"
    click.echo(f"schedule      nightly at {cfg['time']} local time, {state}")
    if not d.get("daemon", True):
        click.echo("              (the daemon is not running: start it to run the schedule)")
    if d["enabled"]:
        if d.get("due") and d["blocked"]:
            click.echo(f"next run      due now, waiting: {'; '.join(d['blocked'])}")
        elif d.get("first_run") and d.get("daemon", True):
            click.echo(f"first run     {_when(d['next_run'])} (then nightly; a new home does not")
            click.echo("              catch up on nights before its daemon first started)")
        else:
            click.echo(f"next run      {_when(d['next_run'])}")
    attempt = d.get("last_attempt") or {}
    click.echo(
        f"last attempt  {_when(attempt.get('ts'))}"
        + (f" ({attempt.get('trigger')}, run {attempt.get('job')})" if attempt else "")
    )
    click.echo(f"last result   {_run_line(d.get('last_result'))}")
    click.echo(f"last success  {_run_line(d.get('last_success'))}")
    click.echo("conditions")
    for c in d["conditions"]:
        mark = "ok  " if c["ok"] and c.get("known", True) else ("?   " if c["ok"] else "WAIT")
        click.echo(f"  [{mark}] {c['name']:<11} {c['detail']}")


@click.command()
@_json
def schedule(as_json: bool) -> None:
    """When training runs next, how the last runs went, and what blocks a run right now.

    Change the schedule in config.toml's [schedule] table (docs/operations.md).
    """
    from palate.wire.client import Client

    try:
        try:
            with Client() as c:
                data = c.status().get("schedule")
            if data is None:
                raise PalateError(
                    "unavailable", "this daemon does not report a schedule; upgrade and restart"
                )
        except PalateError as e:
            if e.code != "unavailable" or "not running" not in e.message:
                raise
            data = _offline_schedule()
    except PalateError as e:
        _fail(e, as_json)
    _print(data, as_json, _show_schedule)
