"""A new user's machine in a temp dir: the default layout, as systemd --user starts the daemon.

No ``PALATE_HOME``: state goes to ``$XDG_DATA_HOME/palate`` and the socket to
``$XDG_RUNTIME_DIR/palate/palate.sock``, the layout almost every other test avoids by pinning
``PALATE_HOME``. ``HOME`` and the XDG directories all live under one temp dir, so nothing of the
developer's own desktop is read or written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from palate.paths import Paths, resolve

#: Variables that would move Palate's state or socket; a default-layout env has none of them.
PINNING = ("PALATE_HOME", "PALATE_SOCKET", "PALATE_USER_TMPDIR")


def default_layout_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a desktop session rooted at ``root`` (created here)."""
    env = {k: v for k, v in os.environ.items() if k not in PINNING and not k.startswith("XDG_")}
    user = root / "user"
    run = root / "run"  # systemd --user: /run/user/$UID, 0700, a tmpfs
    for d in (user, run):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(
        {
            "HOME": str(user),
            "XDG_RUNTIME_DIR": str(run),
            "XDG_DATA_HOME": str(user / ".local" / "share"),
            "XDG_CONFIG_HOME": str(user / ".config"),
            "XDG_STATE_HOME": str(user / ".local" / "state"),
            "XDG_CACHE_HOME": str(user / ".cache"),
            "PALATE_KEY_BACKEND": "file",
            "PALATE_THIRD_PARTY_ADAPTERS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Run a block of this process under ``env`` (restored afterwards)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def paths_in(env: dict[str, str]) -> Paths:
    """What ``palate.paths.resolve()`` gives a process started with ``env``."""
    with environ(env):
        return resolve()
