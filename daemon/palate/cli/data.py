"""``palate feedback``, ``export`` and ``forget``: getting data in, out, and deleted for good."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from palate.cli.common import EXIT_CODES, check_prompt, emit, handles_errors, json_option
from palate.errors import PalateError
from palate.wire.client import Client

# --- feedback -----------------------------------------------------------------------------


@click.command()
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
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
    from palate.events import from_simple, validate_event

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
    check_prompt(prompt, "--prompt")
    if chosen is not None or rejected is not None:
        if chosen is None or rejected is None:
            raise click.UsageError(
                f"a pair needs both --chosen and --rejected (missing "
                f"{'--chosen' if chosen is None else '--rejected'})"
            )
        if response is not None or good is not None:
            raise click.UsageError("give a pair (--chosen/--rejected) or a rating, not both")
        obj: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    elif response is not None and good is not None:
        obj = {"prompt": prompt, "response": response, "label": 1 if good else -1}
    else:
        raise click.UsageError(
            "a pair needs --chosen and --rejected; a rating needs --response and --good or --bad"
        )
    try:
        event = validate_event(from_simple(obj, source))
    except PalateError as e:
        # The options were the event: what is wrong with it is a usage mistake (exit 2).
        raise click.UsageError(_as_options(e)) from e
    with Client() as c:
        res = c.ingest(event)
    emit(
        res,
        as_json,
        lambda d: click.echo(
            f"{'already stored' if d['duplicate'] else 'stored'} {event['kind']} {d['id']}"
        ),
    )


#: Event fields as the options that set them, for usage errors about a single event.
_OPTION_OF = {
    "prompt": "--prompt",
    "chosen": "--chosen",
    "rejected": "--rejected",
    "response": "--response",
    "label": "--good/--bad",
    "source": "--source",
}


def _as_options(err: PalateError) -> str:
    errors = err.details.get("errors") or []
    if not errors:
        return err.message
    parts = []
    for x in errors:
        reason = str(x["reason"])
        for field, option in _OPTION_OF.items():
            reason = reason.replace(f"from {field}", f"from {option}")
        parts.append(f"{_OPTION_OF.get(x['field'], x['field'])} {reason}")
    return "; ".join(parts)


def _import_with_progress(c: Client, file: Path, source: str, quiet: bool) -> Any:
    from palate.adapters.file_import import import_file

    if quiet or not sys.stderr.isatty():
        return import_file(c, file, source=source)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"importing {file.name}", total=None)
        return import_file(c, file, source=source, progress=lambda n: bar.advance(task, n))


# --- data rights --------------------------------------------------------------------------


@click.command()
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
        try:
            n = c.export(out.absolute(), overwrite=overwrite)
        except PalateError as e:
            if e.code != "conflict":
                raise
            # The daemon speaks of its wire parameter; the user needs the option's name.
            raise PalateError(
                "conflict", f"{out.absolute()} already exists; pass --overwrite to replace it"
            ) from e
    _warn_if_shared(out.absolute().parent)
    emit(
        {"path": str(out.absolute()), "count": n},
        as_json,
        lambda d: click.echo(f"exported {d['count']} events to {d['path']}"),
    )


def _warn_if_shared(directory: Path) -> None:
    """The export is 0600 and written through a private temp file, so other users cannot read
    it; in a directory they can write to they can still delete or rename it. Say so."""
    import os
    import stat

    try:
        st = os.stat(directory)
    except OSError:
        return
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid != os.getuid():
        click.echo(
            f"note: other users can write to {directory}; they cannot read the export (it is "
            "0600), but they can delete or rename it. A private directory is safer.",
            err=True,
        )


@click.command()
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
