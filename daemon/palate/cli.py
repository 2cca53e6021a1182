"""``palate``: the command line. A thin layer over the library and the client.

Every library error becomes one clear line on stderr and a documented exit code
(docs/cli.md); ``--json`` gives scripts the same data as structured output.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .cli_adapters import adapters as adapters_group
from .cli_adapters import browser as browser_group
from .cli_common import EXIT_CODES, emit, fail, handles_errors, json_option
from .cli_service import schedule as schedule_command
from .cli_service import service as service_group
from .client import Client
from .errors import PalateError
from .paths import resolve

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
    from .daemon import run_daemon

    try:
        run_daemon(log_level=log_level)
    except PalateError as e:
        fail(e)


@cli.command()
@json_option
@handles_errors
def status(as_json: bool) -> None:
    """Show event counts, key backend, database size and daemon uptime."""
    with Client() as c:
        data = c.status()

    def human(d: dict[str, Any]) -> None:
        ev = d["events"]
        click.echo(
            f"daemon   palate {d['daemon']['version']} (pid {d['daemon']['pid']}), "
            f"up {_duration(d['daemon']['uptime_s'])}"
        )
        click.echo(f"socket   {d['daemon']['socket']}")
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
        for a in d.get("adapters", []):
            err = f", last error: {a['last_error']}" if a.get("last_error") else ""
            click.echo(
                f"adapter  {a['name']}: {a['state']}, {a['events']} events, "
                f"{a['restarts']} restarts{err}"
            )
        if d["key"].get("warning"):
            click.secho(f"WARNING  {d['key']['warning']}", fg="yellow", err=True)

    emit(data, as_json, human)


# --- feedback -----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSONL: {prompt, chosen, rejected}, {prompt, response, label} or v1 events.",
)
@click.option(
    "--source",
    default="cli",
    show_default=True,
    help="Source name recorded on events that do not name one.",
)
@click.option("--prompt", help="Prompt for a single pair or rating.")
@click.option("--chosen", help="The better response (a pair).")
@click.option("--rejected", help="The worse response (a pair).")
@click.option("--response", help="A single rated response.")
@click.option("--good/--bad", "good", default=None, help="Rate --response up or down.")
@click.option("--strict", is_flag=True, help="Exit 4 if any line was rejected.")
@json_option
@handles_errors
def feedback(
    file: Path | None,
    source: str,
    prompt: str | None,
    chosen: str | None,
    rejected: str | None,
    response: str | None,
    good: bool | None,
    strict: bool,
    as_json: bool,
) -> None:
    """Send feedback: one pair or rating from the options, or a whole JSONL file.

    \b
    palate feedback --prompt "2+2?" --chosen "4" --rejected "5"
    palate feedback --prompt "Hi" --response "Hello!" --good
    palate feedback --file pairs.jsonl --source my-import

    Lines without an "id" get one derived from their content and source, so
    importing the same file twice stores it once.
    """
    from .events import from_simple, validate_event

    if file is not None:
        if any(x is not None for x in (prompt, chosen, rejected, response, good)):
            raise click.UsageError("use either --file or the single-event options, not both")
        with Client() as c:
            summary = _import_with_progress(c, file, source, as_json)
        data = summary.to_dict()

        def human(d: dict[str, Any]) -> None:
            click.echo(
                f"accepted {d['accepted']} (already stored: {d['duplicates']}), "
                f"rejected {d['rejected']}, from {d['lines']} lines in {d['seconds']} s"
            )
            for r in d["rejections"][:20]:
                click.echo(f"  line {r['line']}: {r['reason']}", err=True)
            if d["rejected"] > 20:
                click.echo(f"  ... and {d['rejected'] - 20} more (use --json to see all)", err=True)

        emit(data, as_json, human)
        if strict and summary.rejected:
            sys.exit(EXIT_CODES["invalid_event"])
        return
    if prompt is None:
        raise click.UsageError(
            "give --file, or --prompt with --chosen/--rejected or --response and --good/--bad"
        )
    if chosen is not None or rejected is not None:
        obj: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    elif response is not None and good is not None:
        obj = {"prompt": prompt, "response": response, "label": 1 if good else -1}
    else:
        raise click.UsageError(
            "a pair needs --chosen and --rejected; a rating needs --response and --good or --bad"
        )
    event = validate_event(from_simple(obj, source))
    with Client() as c:
        res = c.ingest(event)
    emit(
        res,
        as_json,
        lambda d: click.echo(
            f"{'already stored' if d['duplicate'] else 'stored'} {event['kind']} {d['id']}"
        ),
    )


def _import_with_progress(c: Client, file: Path, source: str, quiet: bool) -> Any:
    from .feedback import import_file

    if quiet or not sys.stderr.isatty():
        return import_file(c, file, source=source)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"importing {file.name}", total=None)
        return import_file(c, file, source=source, progress=lambda n: bar.advance(task, n))


# --- data rights --------------------------------------------------------------------------


@cli.command()
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the JSONL export (written 0600, plaintext).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
@handles_errors
def export(out: Path, overwrite: bool, as_json: bool) -> None:
    """Write all your feedback as JSONL to a file you name."""
    with Client() as c:
        n = c.export(out.absolute(), overwrite=overwrite)
    emit(
        {"path": str(out.absolute()), "count": n},
        as_json,
        lambda d: click.echo(f"exported {d['count']} events to {d['path']}"),
    )


@cli.command()
@click.option("--id", "ids", multiple=True, help="Forget this event id (repeatable).")
@click.option("--source", help="Forget everything from this source.")
@click.option("--since", type=float, help="Forget events with ts >= this (Unix seconds).")
@click.option("--until", type=float, help="Forget events with ts < this (Unix seconds).")
@click.option("--all", "everything", is_flag=True, help="Forget every event.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@handles_errors
def forget(
    ids: tuple[str, ...],
    source: str | None,
    since: float | None,
    until: float | None,
    everything: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete feedback for real (securely deleted, then the database is vacuumed)."""
    selector: dict[str, Any] = {}
    if everything:
        selector["all"] = True
    if ids:
        selector["ids"] = list(ids)
    for k, v in (("source", source), ("since", since), ("until", until)):
        if v is not None:
            selector[k] = v
    if not selector:
        raise click.UsageError("say what to forget: --id, --source, --since/--until or --all")
    if not yes:
        what = "ALL your feedback" if everything else f"events matching {selector}"
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to forget without --yes when not interactive")
        click.confirm(f"Permanently delete {what}?", abort=True)
    with Client() as c:
        n = c.forget(**selector)
    emit({"deleted": n}, as_json, lambda d: click.echo(f"forgot {d['deleted']} events"))


# --- models -----------------------------------------------------------------------------


def _model_row(m: dict[str, Any]) -> dict[str, Any]:
    """The stable JSON shape of one version (docs/cli.md): meta's gate keys lifted up."""
    meta = m.get("meta", {})
    return {
        "version": m["version"],
        "state": m["state"],
        "created": m["created"],
        "base_model": m["base_model"],
        "metrics": meta.get("metrics", {}),
        "decision": meta.get("decision"),
        "reasons": meta.get("reasons", []),
        "size_bytes": m.get("size_bytes"),
    }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


@cli.group(invoke_without_command=True)
@json_option
@click.pass_context
@handles_errors
def models(ctx: click.Context, as_json: bool) -> None:
    """List model versions: state, accuracy, gate decision. `palate models show V` for one."""
    if ctx.invoked_subcommand is not None:
        return
    with Client() as c:
        data = c.call("models")
    rows = [_model_row(m) for m in data["models"]]

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo("no models yet: train one with `palate train`")
            return
        click.echo(f"{'version':>7}  {'state':<9}  {'created':<16}  {'accuracy':>8}  decision")
        for r in rows:
            acc = r["metrics"].get("accuracy")
            acc_s = f"{acc:.1%}" if isinstance(acc, (int, float)) else "-"
            click.echo(
                f"{r['version']:>7}  {r['state']:<9}  {_when(r['created']):<16}  "
                f"{acc_s:>8}  {r['decision'] or '-'}"
            )

    emit(rows, as_json, human)


@models.command("show")
@click.argument("version", type=int)
@json_option
@handles_errors
def models_show(version: int, as_json: bool) -> None:
    """Show one version: metrics, gate decision with every reason, training summary."""
    with Client() as c:
        info = c.call("models", {"version": version})["model"]
    row = {**_model_row(info), "meta": info["meta"]}

    def human(r: dict[str, Any]) -> None:
        click.echo(f"version   {r['version']} ({r['state']}), created {_when(r['created'])}")
        click.echo(f"base      {r['base_model']}")
        for k, v in sorted(r["metrics"].items()):
            if isinstance(v, (int, float, str)):
                click.echo(f"  {k:<24} {v:.4g}" if isinstance(v, float) else f"  {k:<24} {v}")
        click.echo(f"decision  {r['decision'] or '-'}")
        for reason in r["reasons"]:
            click.echo(f"  - {reason}")

    emit(row, as_json, human)


@cli.command()
@click.argument("version", type=int, required=False)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write report-vN.html into (created; the file is 0600).",
)
@json_option
@handles_errors
def report(version: int | None, out_dir: Path, as_json: bool) -> None:
    """Write a self-contained HTML report of model VERSION (default: the newest).

    Plots (loss curves, accuracy by slice with CIs next to the baselines and the deployed
    model, reliability diagram, score vs length) and the gate's decision with every reason.
    It holds numbers only: no text of your feedback.
    """
    from .report import render_report, write_report

    with Client() as c:
        listing = c.call("models")
        if not listing["models"]:
            raise PalateError("not_found", "no models yet: train one with `palate train`")
        v = version if version is not None else listing["models"][0]["version"]
        info = c.call("models", {"version": v})["model"]
    meta = info["meta"]
    if "metrics" not in meta:
        raise PalateError("not_found", f"version {v} has no evaluation to report")
    history = [
        {
            "version": m["version"],
            "created": m["created"],
            "state": m["state"],
            "metrics": m["meta"].get("metrics", {}),
            "decision": m["meta"].get("decision"),
        }
        for m in listing["models"]
    ]
    decision = {
        "action": meta.get("decision"),
        "reasons": meta.get("reasons", []),
        "checks": meta.get("checks", []),
    }
    html = render_report(
        meta["metrics"],
        decision,
        history,
        deployed_metrics=meta.get("deployed_metrics"),
        train_curves=meta.get("training", {}).get("history"),
        title=f"Palate model version {v}",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_report(out_dir / f"report-v{v}.html", html)
    emit({"path": str(path), "version": v}, as_json, lambda d: click.echo(f"wrote {d['path']}"))


@cli.command()
@click.argument("version", type=int)
@click.option(
    "--override",
    is_flag=True,
    help="Deploy even though the gate held or rejected it (recorded as an override).",
)
@click.option("--reason", help="Why, for the history.")
@json_option
@handles_errors
def deploy(version: int, override: bool, reason: str | None, as_json: bool) -> None:
    """Deploy model VERSION now (the daemon's scorer switches to it at once)."""
    params: dict[str, Any] = {"version": version, "override": override}
    if reason:
        params["reason"] = reason
    with Client() as c:
        res = c.call("deploy", params)
    emit(
        res,
        as_json,
        lambda d: click.echo(
            f"deployed version {d['deployed']} (previously {d['previous'] or 'none'})"
        ),
    )


@cli.command()
@click.option("--reason", help="Why, for the history.")
@json_option
@handles_errors
def rollback(reason: str | None, as_json: bool) -> None:
    """Go back to the version that was deployed before the current one."""
    with Client() as c:
        res = c.call("rollback", {"reason": reason} if reason else {})
    emit(
        res,
        as_json,
        lambda d: click.echo(f"rolled back to version {d['deployed']} (was {d['previous']})"),
    )


# --- scoring ------------------------------------------------------------------------------


def read_candidates(path: Path) -> list[str]:
    """Candidates from a file: JSONL (a JSON string, or an object with ``text``,
    ``response`` or ``candidate``, per line) or, for any other suffix, one per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PalateError("not_found", f"cannot read {path}: {e}") from e
    out: list[str] = []
    structured = path.suffix in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not structured:
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PalateError("invalid_request", f"{path}:{n}: not valid JSON ({e.msg})") from e
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("text", "response", "candidate") if k in obj), None)
        if not isinstance(obj, str):
            raise PalateError(
                "invalid_request",
                f"{path}:{n}: expected a JSON string or an "
                'object with "text", "response" or "candidate"',
            )
        out.append(obj)
    if not out:
        raise PalateError("invalid_request", f"{path} holds no candidates")
    return out


@cli.command()
@click.argument("prompt")
@click.option(
    "--candidates",
    "cand_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of candidates: JSONL (strings or {text: ...}) or plain lines.",
)
@click.option("--top-k", type=int, help="Show only the best K.")
@json_option
@handles_errors
def rerank(prompt: str, cand_file: Path, top_k: int | None, as_json: bool) -> None:
    """Order candidate responses to PROMPT by what you prefer (the deployed model decides)."""
    cands = read_candidates(cand_file)
    with Client() as c:
        res = c.rerank(prompt, cands, top_k=top_k)

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"model version {d['version']}; "
            f"{'confident' if d['confident'] else 'NOT confident'} "
            f"(p(best > runner-up) = {d['p_top_over_next']:.2f})"
        )
        for rank, r in enumerate(d["ranked"], 1):
            text = cands[r["index"]].replace("\n", " ")
            click.echo(
                f"{rank:>3}. [{r['index']}] p_best={r['p_best']:.2f} "
                f"score={r['score']:+.3f}  {text[:80]}"
            )

    emit(res, as_json, human)


# --- keys ---------------------------------------------------------------------------------


@cli.group()
def key() -> None:
    """Manage the key that encrypts your data (status, recovery, rotation)."""


@key.command("status")
@json_option
@handles_errors
def key_status(as_json: bool) -> None:
    """Show where the key lives and whether a recovery key exists (never the key itself)."""
    from .keys import KeyManager

    st = KeyManager.for_home(resolve()).status().to_dict()
    st.pop("key_id", None)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"backend   {d['backend']} ({d['backend_detail']})")
        click.echo(f"recovery  {'exported' if d['has_recovery'] else 'NOT exported yet'}")
        if d["warning"]:
            click.secho(f"WARNING   {d['warning']}", fg="yellow", err=True)

    emit(st, as_json, human)


@key.command("recovery-export")
@handles_errors
def key_recovery_export() -> None:
    """Print a new recovery key (the previous one stops working). Store it offline."""
    from .keys import KeyManager

    code = KeyManager.for_home(resolve()).export_recovery()
    click.echo(code)
    click.echo(
        "Keep this recovery key somewhere safe and offline: with it (and your data "
        "directory) your feedback can be decrypted.",
        err=True,
    )


@key.command("rotate")
@click.option(
    "--backend",
    type=click.Choice(["keyring", "file", "auto"]),
    help="Move the key-encryption key to this backend.",
)
@json_option
@handles_errors
def key_rotate(backend: str | None, as_json: bool) -> None:
    """Re-wrap the data key under a fresh key-encryption key."""
    from .keys import KeyManager

    st = KeyManager.for_home(resolve()).rotate(backend).to_dict()
    st.pop("key_id", None)
    emit(st, as_json, lambda d: click.echo(f"rotated; key backend: {d['backend']}"))


@key.command("recover")
@click.option("--code", help="The recovery key (prompted for, hidden, if omitted).")
@click.option(
    "--backend",
    type=click.Choice(["keyring", "file", "auto"]),
    help="Where to keep the new key-encryption key.",
)
@handles_errors
def key_recover(code: str | None, backend: str | None) -> None:
    """Regain access with your recovery key after the keychain entry was lost."""
    from .keys import KeyManager
    from .store import check_key

    paths = resolve()
    if code is None:
        code = click.prompt("Recovery key", hide_input=True)
    st = KeyManager.for_home(paths).recover(
        code, lambda dek: check_key(paths.db_file, dek), backend
    )
    click.echo(f"recovered; the key is now kept in: {st.backend}")


# --- doctor -------------------------------------------------------------------------------


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check the installation, keychain, permissions, daemon, model and BLAS; suggest fixes."""
    from .doctor import run_checks

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
        cli_model = importlib.import_module("palate.cli_model")
    except ImportError:
        return
    for name in ("train_command", "score_command", "eval_command"):
        cmd = getattr(cli_model, name, None)
        if isinstance(cmd, click.Command):
            cli.add_command(cmd)


_register_model_commands()
cli.add_command(adapters_group)
cli.add_command(browser_group)
cli.add_command(service_group)
cli.add_command(schedule_command)


def main() -> None:
    cli(prog_name="palate")


if __name__ == "__main__":  # pragma: no cover
    main()
