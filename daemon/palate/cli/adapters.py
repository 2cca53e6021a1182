"""``palate adapters ...`` and ``palate browser ...``: thin click commands over the library.

Registered by palate.cli.main (``cli.add_command(adapters)``, ``cli.add_command(browser)``).
This module does not import palate.cli.main at import time, so either can be imported first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from palate.adapters import (
    AdapterContext,
    AdapterError,
    DryRun,
    check_options,
    entry_points,
    load_adapter,
)
from palate.adapters.redaction import Redactor
from palate.cli.common import emit as _print
from palate.cli.common import fail as _fail
from palate.cli.common import json_option as _json
from palate.errors import PalateError
from palate.paths import resolve


@click.group()
def adapters() -> None:
    """Feedback adapters: which exist, their state, and running or testing one.

    Adapters read feedback your tools already write (Continue, Tabby, voice
    transcripts, any JSONL) and send it to the daemon. Enable one in
    config.toml with `[adapters.<name>] enabled = true`; the daemon then runs it.
    """


def _config() -> Any:
    from palate.config import load_config

    return load_config(resolve())


@adapters.command("list")
@_json
def list_(as_json: bool) -> None:
    """List installed and configured adapters with their state.

    The state comes from the running daemon (state, pid, restarts, last event,
    last error); without a daemon only installation and configuration are shown.
    """
    try:
        cfg = _config()
    except PalateError as e:
        _fail(e, as_json)
    live: dict[str, dict[str, Any]] = {}
    daemon_running = False
    try:
        from palate.wire.client import Client

        with Client(timeout=5.0) as c:
            daemon_running = True
            live = {a["name"]: a for a in c.status().get("adapters", []) or []}
    except PalateError:
        pass
    eps = entry_points()
    rows = []
    for name in sorted(set(eps) | set(cfg.adapters.tables) | set(live)):
        opts = cfg.adapters.options(name)
        row: dict[str, Any] = {
            "name": name,
            "installed": name in eps or bool(opts.get("module")),
            "provider": (eps[name].value if name in eps else opts.get("module")) or "",
            "enabled": opts.get("enabled") is True,
        }
        row.update({k: v for k, v in live.get(name, {}).items() if k != "name"})
        if "state" not in row:
            row["state"] = "not running" if daemon_running or not row["enabled"] else "unknown"
        rows.append(row)

    def human(rs: list[dict[str, Any]]) -> None:
        if not rs:
            click.echo("no adapters installed")
        for r in rs:
            flag = "enabled " if r["enabled"] else "disabled"
            extra = ""
            if r.get("restarts"):
                extra += f", {r['restarts']} restarts"
            if r.get("last_error"):
                extra += f", last error: {r['last_error']}"
            click.echo(f"{r['name']:<12} {flag}  {r['state']}{extra}  ({r['provider']})")

    _print(rows, as_json, human)


@adapters.command("run")
@click.argument("name")
def run(name: str) -> None:
    """Run adapter NAME in the foreground (logs on stderr) until Ctrl-C.

    Useful to watch an adapter work or to debug one; the daemon need not
    supervise it, but must be running to receive the events.
    """
    from palate.adapters.runner import EXIT_LOAD_FAILED
    from palate.adapters.runner import run as run_adapter

    rc = run_adapter(name)
    if rc == EXIT_LOAD_FAILED:
        sys.exit(4)
    sys.exit(rc)


@adapters.command("test")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_json
def test(name: str, file: Path, as_json: bool) -> None:
    """Dry-run adapter NAME's parser on FILE: print the events it would send.

    Nothing is sent and no cursor is written. Redaction applies as configured,
    and bad records are reported on stderr, exactly as the running adapter would.
    """
    try:
        cfg = _config()
        opts = cfg.adapters.options(name)
        adapter = load_adapter(name, opts.get("module"))
        opts = check_options(adapter, opts)
    except PalateError as e:
        _fail(e, as_json)
    except AdapterError as e:
        _fail(PalateError("invalid_request", str(e)), as_json)
    dry_run = getattr(adapter, "dry_run", None)
    if dry_run is None:
        _fail(PalateError("invalid_request", f"adapter {name!r} has no file parser to test"))
    sink = DryRun()
    ctx = AdapterContext(
        name, options=opts, redactor=Redactor(cfg.adapters.deny_for(name)), sink=sink
    )
    dry_run(file.absolute(), ctx)
    result = {"events": sink.events, "bad_records": ctx.bad_records}

    def human(r: dict[str, Any]) -> None:
        for ev in r["events"]:
            click.echo(json.dumps(ev, ensure_ascii=False))
        click.echo(f"{len(r['events'])} events, {r['bad_records']} bad records", err=True)

    _print(result, as_json, human)


@click.group()
def browser() -> None:
    """Connect the Palate browser extension (native messaging host manifests)."""


_BROWSER_CHOICE = click.Choice(["chrome", "chromium", "brave", "edge", "firefox", "all"])


def _browsers(choice: tuple[str, ...]) -> list[str]:
    from palate.adapters.native_host import BROWSERS

    picked = list(choice) or ["all"]
    return list(BROWSERS) if "all" in picked else list(dict.fromkeys(picked))


@browser.command("install")
@click.option(
    "--extension-id", "extension_ids", multiple=True,
    help="Chrome-family extension id allowed to connect (repeatable; default: Palate's).",
)  # fmt: skip
@click.option(
    "--firefox-id", "firefox_ids", multiple=True,
    help="Firefox add-on id allowed to connect (repeatable; default: Palate's).",
)  # fmt: skip
@click.option(
    "--browser", "browsers", type=_BROWSER_CHOICE, multiple=True,
    help="Which browser(s) to register with (repeatable; default: all).",
)  # fmt: skip
@_json
def install(
    extension_ids: tuple[str, ...],
    firefox_ids: tuple[str, ...],
    browsers: tuple[str, ...],
    as_json: bool,
) -> None:
    """Register the native messaging host with your browsers (per user, no sudo).

    Writes a launcher and an allow list into the Palate home and one host
    manifest per browser into its per-user NativeMessagingHosts directory.
    """
    from palate.adapters.native_host import install as do_install

    paths = resolve()
    try:
        res = do_install(
            _browsers(browsers),
            home=paths.home,
            socket=paths.socket,
            extension_ids=list(extension_ids),
            firefox_ids=list(firefox_ids),
        )
    except PalateError as e:
        _fail(e, as_json)
    except OSError as e:
        _fail(PalateError("storage_error", f"cannot write a manifest: {e}"), as_json)

    def human(r: dict[str, Any]) -> None:
        click.echo(f"host {r['host']} -> {r['launcher']} (daemon socket {r['socket']})")
        for m in r["manifests"]:
            click.echo(f"wrote {m}")

    _print(res, as_json, human)


@browser.command("uninstall")
@click.option(
    "--browser", "browsers", type=_BROWSER_CHOICE, multiple=True,
    help="Which browser(s) to unregister (repeatable; default: all).",
)  # fmt: skip
@_json
def uninstall(browsers: tuple[str, ...], as_json: bool) -> None:
    """Remove the native messaging host manifests written by `palate browser install`."""
    from palate.adapters.native_host import uninstall as do_uninstall

    removed = do_uninstall(_browsers(browsers), home=resolve().home)

    def human(r: list[str]) -> None:
        for p in r:
            click.echo(f"removed {p}")
        if not r:
            click.echo("nothing to remove")

    _print(removed, as_json, human)
