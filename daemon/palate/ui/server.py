"""Starting ``palate ui``: bind 127.0.0.1, print the URL with its token, serve until Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import sys
import threading
import webbrowser
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from palate.errors import PalateError
from palate.paths import resolve
from palate.ui.app import create_app
from palate.ui.security import Secrets
from palate.wire.client import Client

HOST = "127.0.0.1"


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1 (``port`` 0: a free one the kernel picks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PalateError(
                "conflict", f"port {port} on {HOST} is in use; pick another with --port"
            ) from e
        raise PalateError("unavailable", f"cannot listen on {HOST}:{port}: {e.strerror}") from e
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def run_ui(
    *,
    port: int = 0,
    open_browser: bool = True,
    home: Path | None = None,
    out: Callable[[str], None] = print,
) -> None:
    """Serve the UI for the daemon of ``home`` until interrupted."""
    socket_path = resolve(home).socket
    with Client(socket_path=socket_path, timeout=10) as c:  # the daemon must be there
        c.hello("palate-ui")
    sock = bind(port)
    secrets = Secrets(port=sock.getsockname()[1])
    app = create_app(socket_path, secrets)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # the first URL carries the token
        server_header=False,
        date_header=False,
        proxy_headers=False,
        lifespan="on",
        ws="none",
        http="h11",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    out(f"Palate UI: {secrets.url}")
    out("Open that link (it holds this launch's secret token); Ctrl-C stops the UI.")
    sys.stdout.flush()
    if open_browser:

        def opener() -> None:
            with contextlib.suppress(Exception):
                webbrowser.open(secrets.url)

        threading.Timer(0.3, opener).start()
    # uvicorn stops gracefully on SIGINT/SIGTERM and then raises the signal again for the
    # handler that was there before: make both a quiet exit 0, not "Aborted!" or a kill.
    previous = signal.signal(signal.SIGTERM, _quiet_exit)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _quiet_exit(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
