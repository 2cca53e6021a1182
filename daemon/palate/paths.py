"""Where Palate keeps its state, and how those places are made safe.

``PALATE_HOME=DIR`` puts everything (config, database, key file, socket, logs)
under DIR, which is what tests and outside checks rely on. Without it the
platform's conventional per-user locations are used, and on Linux the socket
lives in ``$XDG_RUNTIME_DIR/palate/`` (set by systemd --user and every desktop
session). Every directory Palate creates is 0700 and checked with ``lstat`` (not
a symlink, owned by us, no group or other bits) because the socket's safety
rests on its directory.

``PALATE_SOCKET=PATH`` names the socket outright. Processes the daemon starts
(adapters, training runs) and the launcher ``palate browser install`` writes get
the daemon's resolution pinned through :meth:`Paths.child_env` (``PALATE_HOME``
*and* ``PALATE_SOCKET``), so a child never re-derives the socket from an
environment that differs from the daemon's (a pinned ``PALATE_HOME`` alone
would move it from the runtime dir to ``<home>/run``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from palate.errors import PalateError

#: Usable bytes in ``sun_path``: 104 on macOS (103 + NUL), 108 on Linux. We use the
#: smaller everywhere so a path that works here also works on a Mac.
MAX_SOCKET_PATH = 103


@dataclass(frozen=True)
class Paths:
    """All locations derived from one home directory."""

    home: Path
    config_file: Path
    data_dir: Path
    db_file: Path
    key_file: Path
    log_dir: Path
    run_dir: Path
    socket: Path
    lock_file: Path
    #: The daemon's and training runs' TMPDIR. Private because MLX caches compiled CPU
    #: kernels as shared libraries under $TMPDIR and loads existing ones: in a shared
    #: /tmp another user could plant one first.
    tmp_dir: Path

    def ensure(self) -> None:
        """Create the private directories (0700), refusing unsafe existing ones."""
        for d in (
            self.home,
            self.data_dir,
            self.log_dir,
            self.run_dir,
            self.socket.parent,
            self.tmp_dir,
        ):
            ensure_private_dir(d)

    def child_env(self) -> dict[str, str]:
        """The variables that make ``resolve()`` in another process give these same paths.

        Adapters, training runs and the browser's native-messaging launcher all start from
        this, never from a bare ``PALATE_HOME`` (docs/plugins.md, "Where the socket is").
        """
        return {HOME_ENV: str(self.home), SOCKET_ENV: str(self.socket)}

    def use_private_tmp(self) -> None:
        """Point this process (and the children it starts) at :attr:`tmp_dir`."""
        import tempfile

        ensure_private_dir(self.tmp_dir)
        # Children (adapters, training runs) must still find the socket where clients do:
        # the socket's short fallback path is derived from the user's temp dir, not ours.
        os.environ.setdefault(_USER_TMP_ENV, tempfile.gettempdir())
        os.environ["TMPDIR"] = str(self.tmp_dir)
        tempfile.tempdir = None  # re-read TMPDIR on next use


#: The temp dir the daemon was started with, kept for its children (see use_private_tmp).
_USER_TMP_ENV = "PALATE_USER_TMPDIR"
#: Where all state lives (see the module docstring).
HOME_ENV = "PALATE_HOME"
#: The socket path, when it must not be derived (children of the daemon, the browser launcher).
SOCKET_ENV = "PALATE_SOCKET"


def default_home() -> Path:
    """The home: ``PALATE_HOME`` if set, else the platform's per-user location."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return _platform_home()


def _platform_home() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Palate"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "palate"


def resolve(home: Path | None = None) -> Paths:
    """Compute every path from ``home`` (or the default) without touching disk."""
    home = (home or default_home()).absolute()
    data = home / "data"
    run = _runtime_dir(home)
    return Paths(
        home=home,
        config_file=home / "config.toml",
        data_dir=data,
        db_file=data / "palate.db",
        key_file=data / "key.json",
        log_dir=home / "logs",
        run_dir=run,
        socket=_pinned_socket() or socket_path(run),
        lock_file=run / "daemon.lock",
        tmp_dir=home / "tmp",
    )


def _pinned_socket() -> Path | None:
    raw = os.environ.get(SOCKET_ENV)
    return Path(raw).expanduser().absolute() if raw else None


def _runtime_dir(home: Path) -> Path:
    # Under an explicit home (PALATE_HOME, or a home passed in that is not the platform's
    # default) everything stays inside it: tests run several daemons side by side. The
    # default home prefers the runtime dir, a tmpfs cleaned at logout on Linux, so a
    # stale socket cannot outlive a session.
    if HOME_ENV not in os.environ and home == _platform_home().absolute():
        xdg_run = os.environ.get("XDG_RUNTIME_DIR")
        if xdg_run and Path(xdg_run).is_dir():
            return Path(xdg_run) / "palate"
    return home / "run"


def socket_path(run_dir: Path) -> Path:
    """The socket path, or a short hashed fallback when ``run_dir`` is too long.

    Long paths are common on macOS (``~/Library/Application Support/...`` under a
    long user name, or deep test temp dirs). Truncation is never an option: it
    once made ``unlink`` and ``bind`` act on different files in other projects.
    """
    p = run_dir / "palate.sock"
    if len(os.fsencode(str(p))) <= MAX_SOCKET_PATH:
        return p
    digest = hashlib.sha256(os.fsencode(str(run_dir))).hexdigest()[:16]
    user_tmp = os.environ.get(_USER_TMP_ENV) or tempfile.gettempdir()
    short_root = Path(user_tmp) / f"palate-{os.getuid()}"
    if len(os.fsencode(str(short_root))) > MAX_SOCKET_PATH - 24:
        short_root = Path("/tmp") / f"palate-{os.getuid()}"
    return short_root / f"{digest}.sock"


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` a directory only we can enter, or fail loudly.

    An existing directory must not be a symlink, must be owned by us and must not
    be accessible to group or others; we tighten the mode of a directory we own
    but never chmod one we do not.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PalateError(
            "storage_error", f"cannot create directory {path}: {e.strerror}", {"path": str(path)}
        ) from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PalateError(
            "unauthorized",
            f"{path} is not a real directory (symlink or file); refusing to use it",
            {"path": str(path)},
        )
    if st.st_uid != os.getuid():
        raise PalateError(
            "unauthorized",
            f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing it",
            {"path": str(path)},
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
