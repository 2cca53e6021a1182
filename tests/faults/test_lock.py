"""One database, one daemon, whatever the environment says (issue 14 item 8).

The lock used to live in the run directory, which for the default home is
``$XDG_RUNTIME_DIR/palate``: two daemons started with different ``XDG_RUNTIME_DIR`` (a login
session and a cron job, an SSH session and the desktop) each took "their" lock, bound "their"
socket, and both wrote to the same database. The lock now sits next to the data.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import PALATE
from palate.errors import PalateError
from palate.wire.client import Client

from .helpers import NO_SCHEDULE


def _env(root: Path, runtime: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PALATE_HOME", "PALATE_SOCKET", "XDG_RUNTIME_DIR")
    }
    env.update(
        {
            "HOME": str(root / "user"),
            "XDG_DATA_HOME": str(root / "share"),
            "XDG_RUNTIME_DIR": str(runtime),
            "PALATE_KEY_BACKEND": "file",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def test_two_runtime_dirs_one_database_one_daemon(home: Path) -> None:
    runs = [home / "run1", home / "run2"]
    for r in runs:
        r.mkdir(mode=0o700)
    (home / "user").mkdir(mode=0o700)
    config = home / "share" / "palate" / "config.toml"
    config.parent.mkdir(parents=True, mode=0o700)
    config.write_text(NO_SCHEDULE)
    first = subprocess.Popen(
        [*PALATE, "daemon"],
        env=_env(home, runs[0]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sock = runs[0] / "palate" / "palate.sock"
        deadline = time.monotonic() + 30
        while True:
            assert first.poll() is None, "the first daemon exited"
            try:
                with Client(socket_path=sock, timeout=5) as c:
                    c.hello()
                break
            except PalateError:
                assert time.monotonic() < deadline, "the first daemon did not start"
                time.sleep(0.05)
        second = subprocess.run(
            [*PALATE, "daemon"], env=_env(home, runs[1]), capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 4, (second.returncode, second.stderr)
        assert f"pid {first.pid}" in second.stderr and "already runs for the data" in second.stderr
        assert not (runs[1] / "palate" / "palate.sock").exists()
        assert (home / "share" / "palate" / "data" / "daemon.lock").exists()
        with Client(socket_path=sock, timeout=5) as c:
            assert c.status()["daemon"]["pid"] == first.pid
    finally:
        first.terminate()
        first.wait(30)
