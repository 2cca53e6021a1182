"""``palate key``: where the data key lives, the recovery key, rotation and recovery."""

from __future__ import annotations

from typing import Any

import click

from palate.cli.common import emit, handles_errors, json_option
from palate.paths import resolve

# --- keys ---------------------------------------------------------------------------------


@click.group()
def key() -> None:
    """Manage the key that encrypts your data (status, recovery, rotation)."""


@key.command("status")
@json_option
@handles_errors
def key_status(as_json: bool) -> None:
    """Show where the key lives and whether a recovery key exists (never the key itself)."""
    from palate.store.keys import KeyManager

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
    from palate.store.keys import KeyManager

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
    from palate.store.keys import KeyManager

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
    from palate.store.database import check_key
    from palate.store.keys import KeyManager

    paths = resolve()
    if code is None:
        code = click.prompt("Recovery key", hide_input=True)
    st = KeyManager.for_home(paths).recover(
        code, lambda dek: check_key(paths.db_file, dek), backend
    )
    click.echo(f"recovered; the key is now kept in: {st.backend}")
