"""``palate key``: where the data key lives, the recovery kit, rotation and recovery.

Secrets never travel in argv (``ps`` and shell history would show them): ``recover`` and
``recovery-confirm`` read the kit from standard input (a hidden prompt on a terminal).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from palate.cli.common import emit, handles_errors, json_option
from palate.paths import Paths, resolve

#: A kit is 95 characters; anything past this on stdin is not one.
MAX_KIT_INPUT = 4096

# --- keys ---------------------------------------------------------------------------------


@click.group()
def key() -> None:
    """Manage the key that encrypts your data (status, recovery kit, rotation)."""


@key.command("status")
@json_option
@handles_errors
def key_status(as_json: bool) -> None:
    """Show where the key lives and the state of your recovery kit (never the key itself)."""
    from palate.store.keys import KeyManager

    st = KeyManager.for_home(resolve()).status().to_dict()
    st.pop("key_id", None)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"backend   {d['backend']} ({d['backend_detail']})")
        click.echo(f"recovery  {RECOVERY_TEXT[d['recovery']]}")
        if d["warning"]:
            click.secho(f"WARNING   {d['warning']}", fg="yellow", err=True)

    emit(st, as_json, human)


#: How ``key status`` and ``status`` put each ``key.recovery`` state.
RECOVERY_TEXT = {
    "none": "NONE: no recovery kit; losing the keychain or key.json loses your data "
    "(`palate key recovery-export`)",
    "unconfirmed": "kit exported, not confirmed (`palate key recovery-confirm` < your kit)",
    "confirmed": "kit exported and confirmed",
}

KIT_ADVICE = (
    "This is your recovery kit. With it and your database anyone can read your feedback, and "
    "without it a lost keychain entry or key.json loses every event. Keep it offline (a "
    "password manager, or printed), then confirm it: `palate key recovery-confirm` < kit-file."
)


@key.command("recovery-export")
@json_option
@handles_errors
def key_recovery_export(as_json: bool) -> None:
    """Print your recovery kit: with it (and the database) access comes back, even without
    the keychain or key.json. Store it offline, then `palate key recovery-confirm`."""
    from palate.store.keys import KeyManager

    kit = KeyManager.for_home(resolve()).export_kit()
    if as_json:
        click.echo(json.dumps({"kit": kit}))
    else:
        click.echo(kit)
    click.echo(KIT_ADVICE, err=True)


def read_secret(prompt: str) -> str:
    """The kit from standard input (hidden prompt on a terminal); never from argv.

    Accepts the bare kit or the ``{"kit": ...}`` object ``recovery-export --json`` prints.
    """
    if sys.stdin is not None and sys.stdin.isatty():
        text = str(click.prompt(prompt, hide_input=True))
    else:
        text = (sys.stdin.read(MAX_KIT_INPUT + 1) if sys.stdin is not None else "") or ""
        if len(text) > MAX_KIT_INPUT:
            raise click.UsageError("standard input is too long to be a recovery kit")
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("kit"), str):
            text = doc["kit"]
    if not text:
        raise click.UsageError("give the recovery kit on standard input")
    return text


@key.command("recovery-confirm")
@json_option
@handles_errors
def key_recovery_confirm(as_json: bool) -> None:
    """Check a saved kit (read from standard input) against your key; mark it confirmed."""
    from palate.store.keys import KeyManager

    st = KeyManager.for_home(resolve()).confirm_kit(read_secret("Recovery kit")).to_dict()
    st.pop("key_id", None)
    emit(st, as_json, lambda d: click.echo("recovery kit confirmed: it opens your data"))


@key.command("rotate")
@click.option(
    "--backend",
    type=click.Choice(["keyring", "file", "auto"]),
    help="Move the key-encryption key to this backend.",
)
@click.option(
    "--rekey",
    is_flag=True,
    help="Replace the data key itself and re-encrypt the database (the daemon must be "
    "stopped). Old key.json copies and the old recovery kit stop working.",
)
@json_option
@handles_errors
def key_rotate(backend: str | None, rekey: bool, as_json: bool) -> None:
    """Re-wrap the data key under a fresh key-encryption key (--rekey: a new data key)."""
    from palate.store.keys import KeyManager

    paths = resolve()
    km = KeyManager.for_home(paths)
    st = (_rekey(paths, km, backend) if rekey else km.rotate(backend)).to_dict()
    st.pop("key_id", None)

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"{'rekeyed: the database is encrypted under a new data key' if rekey else 'rotated'}"
            f"; key backend: {d['backend']}"
        )
        if rekey:
            click.secho(
                "your old recovery kit no longer works: run `palate key recovery-export` now",
                fg="yellow",
                err=True,
            )

    emit(st, as_json, human)


def _rekey(paths: Paths, km: Any, backend: str | None) -> Any:
    from palate.runtime.daemon import data_lock
    from palate.store.database import check_key, reencrypt

    lock = data_lock(paths)
    lock.acquire()  # conflict (exit 4) while the daemon runs: it holds the database open
    try:
        km.settle(lambda dek: check_key(paths.db_file, dek))
        if not paths.db_file.exists():
            from palate.errors import PalateError

            raise PalateError("not_found", f"no database at {paths.db_file} to re-encrypt")
        return km.rekey(
            lambda old, new: reencrypt(paths.db_file, old, new),
            lambda dek: check_key(paths.db_file, dek),
            backend,
        )
    finally:
        lock.release()


@key.command("recover")
@click.option("--code", hidden=True, help="Refused: a secret in argv shows in ps and history.")
@click.option(
    "--backend",
    type=click.Choice(["keyring", "file", "auto"]),
    help="Where to keep the new key-encryption key.",
)
@handles_errors
def key_recover(code: str | None, backend: str | None) -> None:
    """Regain access with your recovery kit, read from standard input: needs only the kit
    and the database (no keychain entry, no key.json).

    \b
    palate key recover < kit.txt
    palate key recovery-export --json > kit.json; palate key recover < kit.json
    """
    from palate.store.database import check_key
    from palate.store.keys import KeyManager

    if code is not None:
        raise click.UsageError(
            "--code is gone: a secret on the command line is visible to other processes "
            "(ps) and kept in shell history. Give the kit on standard input instead: "
            "`palate key recover < kit.txt`"
        )
    paths = resolve()
    paths.ensure()
    text = read_secret("Recovery kit")
    st = KeyManager.for_home(paths).recover(
        text, lambda dek: check_key(paths.db_file, dek), backend
    )
    click.echo(f"recovered; the key is now kept in: {st.backend}")


# --- interactive set-up -------------------------------------------------------------------


def interactive() -> bool:
    """A person at a terminal (both ends), who can be walked through set-up."""
    import os

    if os.environ.get("PALATE_NO_SETUP"):
        return False
    return bool(sys.stdin and sys.stdin.isatty() and sys.stdout and sys.stdout.isatty())


def recovery_walkthrough(paths: Paths) -> str:
    """Walk the user through creating and confirming a recovery kit; returns the state.

    Creates the data key first on a brand-new home (exactly what the daemon would do). The
    kit goes to this terminal only, never to a log. Skipping is allowed: status, doctor and
    the daemon log then keep saying that there is no kit.
    """
    from palate.errors import PalateError
    from palate.store.keys import KeyManager, zero

    km = KeyManager.for_home(paths)
    if not km.exists():
        if paths.db_file.exists():
            return "none"  # the daemon will explain (key.json missing)
        paths.ensure()
        zero(km.create())
    state = km.status().recovery
    if state == "confirmed":
        return state
    if state == "none":
        click.echo(
            "\nPalate encrypts your feedback with a key kept in "
            f"{'your keychain' if km.status().backend == 'keyring' else 'a file beside it'}. "
            "If that key is lost (a reset keychain, a new machine, a deleted key.json), the "
            "data is lost too -- unless you have a recovery kit."
        )
        if not click.confirm("Create your recovery kit now?", default=True):
            click.echo("Skipped. `palate key recovery-export` makes one at any time.\n")
            return state
        try:
            kit = km.export_kit()
        except PalateError as e:  # e.g. a locked keychain: the daemon will say so next
            click.echo(f"Could not make the kit now: {e.message}\n")
            return state
        click.echo("\n  " + kit + "\n")
        click.echo(
            "Save it offline now (password manager, or print it). Anyone with it and your "
            "database can read your feedback."
        )
    else:
        click.echo("\nYour recovery kit was exported but never confirmed: check the copy you kept.")
    for _ in range(3):
        typed = click.prompt(
            "Paste it back to confirm you saved it (Enter to skip)",
            default="",
            show_default=False,
            hide_input=True,
        )
        if not typed.strip():
            click.echo("Not confirmed. `palate key recovery-confirm` < kit-file does it later.\n")
            return km.status().recovery
        try:
            km.confirm_kit(typed)
        except PalateError as e:
            click.echo(f"That does not match: {e.message}")
            continue
        click.echo("Recovery kit confirmed.\n")
        return "confirmed"
    return km.status().recovery
