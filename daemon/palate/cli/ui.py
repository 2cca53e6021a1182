"""``palate ui``: the local web UI (docs/ui.md)."""

from __future__ import annotations

import click

from palate.cli.common import handles_errors


@click.command("ui")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port on 127.0.0.1 (0: a free one). The UI never listens on other addresses.",
)
@click.option("--no-browser", is_flag=True, help="Print the URL but do not open a browser.")
@handles_errors
def ui(port: int, no_browser: bool) -> None:
    """See, curate and delete your data, answer review questions, watch the models, pause.

    Serves http://127.0.0.1:PORT with a secret token in the printed URL (needed once per
    launch; the browser then keeps a cookie). Needs the daemon running. Ctrl-C stops it.
    """
    from palate.ui.server import run_ui

    run_ui(port=port, open_browser=not no_browser, out=click.echo)
