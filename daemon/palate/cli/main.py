"""``palate``: the command line. A thin layer over the library and the client.

Every library error becomes one clear line on stderr and a documented exit code
(docs/cli.md); ``--json`` gives scripts the same data as structured output.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from palate import __version__
from palate.cli import data, keys, models
from palate.cli.adapters import adapters as adapters_group
from palate.cli.adapters import browser as browser_group
from palate.cli.common import EXIT_CODES, emit, fail, handles_errors, json_option
from palate.cli.federate import federate as federate_group
from palate.cli.review import review as review_group
from palate.cli.service import schedule as schedule_command
from palate.cli.service import service as service_group
from palate.cli.ui import ui as ui_command
from palate.errors import PalateError
from palate.paths import resolve
from palate.service.checks_daemon import job_as_result
from palate.wire.client import Client

__all__ = ["EXIT_CODES", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="palate")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PALATE_HOME",
    help="Keep all state (config, database, socket, logs) here. Env: PALATE_HOME.",
)
def cli(home: Path | None) -> None:
    """Palate: learn what you prefer from your own feedback, privately, on this machine.

    Start the daemon with `palate daemon`, send feedback with `palate feedback`,
    and check on everything with `palate status` and `palate doctor`.
    """
    if home is not None:
        os.environ["PALATE_HOME"] = str(home.absolute())


# --- daemon -------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Override the configured log level.",
)
def daemon(log_level: str | None) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C.

    It never forks into the background: launchd/systemd (or your terminal) own the process.
    """
    from palate.runtime.daemon import run_daemon

    try:
        if keys.interactive():  # `make run` in a terminal: offer the recovery kit first
            keys.recovery_walkthrough(resolve())
        run_daemon(log_level=log_level)
    except PalateError as e:
        fail(e)


@cli.command()
@json_option
@handles_errors
def status(as_json: bool) -> None:
    """Show the daemon, your feedback, the key, the deployed model, training, schedule and
    adapters. `--json` prints the daemon's status result unchanged."""
    with Client() as c:
        data = c.status()
        listing = None if as_json else c.call("models")

    def human(d: dict[str, Any]) -> None:
        ev = d["events"]
        click.echo(
            f"daemon   palate {d['daemon']['version']} (pid {d['daemon']['pid']}), "
            f"up {_duration(d['daemon']['uptime_s'])}"
        )
        click.echo(f"socket   {d['daemon']['socket']}")
        if d.get("paused"):  # the collection pause (`palate pause`)
            from palate.cli.pause import paused_line

            click.echo(paused_line(d["paused"]))
        click.echo(f"events   {ev['total']} total")
        for kind, n in sorted(ev["by_kind"].items()):
            click.echo(f"           {kind:<8} {n}")
        if ev["by_source"]:
            click.echo(
                "sources  " + ", ".join(f"{s}: {n}" for s, n in sorted(ev["by_source"].items()))
            )
        click.echo(
            f"store    {d['db']['path']} ({_size(d['db']['size_bytes'])}, "
            f"schema {d['db']['schema_version']})"
        )
        click.echo(f"key      {d['key_backend']}")
        open_q = (d.get("review") or {}).get("open")
        if open_q:
            click.echo(f"review   {open_q} open question(s): `palate review list`")
        click.echo(f"recovery {keys.RECOVERY_TEXT.get(d['key'].get('recovery', ''), '?')}")
        for line in _model_training_schedule(d, listing or {}):
            click.echo(line)
        if not d.get("adapters"):
            click.echo("adapters none running (`palate adapters list` shows what is installed)")
        for a in d.get("adapters", []):
            err = f", last error: {a['last_error']}" if a.get("last_error") else ""
            click.echo(
                f"adapter  {a['name']}: {a['state']}, {a['events']} events, "
                f"{a['restarts']} restarts{err}"
            )
        if d["key"].get("warning"):
            click.secho(f"WARNING  {d['key']['warning']}", fg="yellow", err=True)

    emit(data, as_json, human)


# --- doctor -------------------------------------------------------------------------------


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check the installation, keychain, permissions, daemon, model and BLAS; suggest fixes."""
    from palate.service.doctor import run_checks

    checks = run_checks(resolve())
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        marks = {"ok": ("ok  ", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}
        for c in checks:
            mark, color = marks.get(c.status, ("?", "white"))
            click.echo(click.style(f"[{mark}] ", fg=color) + f"{c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                click.echo(f"       fix: {c.fix}")
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


def _model_training_schedule(d: dict[str, Any], listing: dict[str, Any]) -> list[str]:
    """The status lines the README promises: deployed model, training run, next run."""
    from palate.cli.models import model_summary
    from palate.cli.service import _run_line, _when
    from palate.cli.training import overall_eta, phase_label

    lines = [f"model    {model_summary(listing)}"]
    if listing.get("deployed") is None and listing.get("models"):
        v = listing["models"][0]["version"]
        lines.append(
            f"         why: `palate models show {v}`; deploy anyway: `palate deploy {v} --override`"
        )
    training = d.get("training") or {}
    sched = d.get("schedule") or {}
    cur = training.get("current")
    if cur:
        p = cur.get("progress") or {}
        what = [phase_label(p) or str(cur.get("phase", "starting"))]
        if isinstance(p.get("phase_percent"), (int, float)):
            what.append(f"{p['phase_percent']:.0f}% of the phase")
        what.append(overall_eta(p) or f"started {_when(cur.get('started'))}")
        lines.append(f"training run {cur['id']} in progress: {', '.join(what)}")
    elif sched.get("last_result") or training.get("last"):
        last = sched.get("last_result") or job_as_result(training["last"])
        lines.append(f"training last run {_run_line(last)}")
    else:
        lines.append("training no run yet")
    if not sched:
        return lines
    if not sched.get("enabled"):
        lines.append("schedule off ([schedule] enabled = false); `palate train` runs one now")
    elif sched.get("due") and sched.get("blocked"):
        lines.append(f"schedule due now, waiting: {'; '.join(sched['blocked'])}")
    else:
        first = "first run" if sched.get("first_run") else "next run"
        at = sched.get("config", {}).get("time", "")
        waits = [
            c["detail"]
            for c in sched.get("conditions", [])
            if not c.get("ok") and c.get("name") == "new_events"
        ]
        lines.append(
            f"schedule {first} {_when(sched.get('next_run'))}, nightly at {at}"
            + (f"; waiting for feedback: {waits[0]}" if waits else "")
        )
    return lines


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _register_model_commands() -> None:
    """Attach the model commands (train/score/eval) when the model layer is present."""
    try:
        cli_model = importlib.import_module("palate.cli.training")
    except ImportError:
        return
    for name in ("train_command", "score_command", "eval_command"):
        cmd = getattr(cli_model, name, None)
        if isinstance(cmd, click.Command):
            cli.add_command(cmd)


_register_model_commands()
for command in (
    data.feedback,
    data.export,
    data.forget,
    models.models,
    models.report,
    models.deploy,
    models.rollback,
    models.rerank,
    keys.key,
):
    cli.add_command(command)
cli.add_command(adapters_group)
cli.add_command(browser_group)
cli.add_command(service_group)
cli.add_command(review_group)
# The collection pause (palate.cli.pause): `palate pause [--for DURATION]`, `palate resume`.
for _pause_cmd in ("pause", "resume"):
    cli.add_command(getattr(importlib.import_module("palate.cli.pause"), _pause_cmd))
cli.add_command(schedule_command)
cli.add_command(ui_command)
# Generation (docs/generation.md): imported by name so the group stays one edit here.
for _module, _name in (("palate.cli.generate", "generate"), ("palate.cli.policy", "policy")):
    cli.add_command(getattr(importlib.import_module(_module), _name))
cli.add_command(federate_group)


def main() -> None:
    cli(prog_name="palate")


if __name__ == "__main__":  # pragma: no cover
    main()
