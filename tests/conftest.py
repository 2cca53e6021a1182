"""Shared fixtures: real daemon processes, real sockets, a real Secret Service.

Nothing on the core path is mocked. ``palate_daemon`` starts ``palate daemon`` as
a child process in a temp PALATE_HOME; ``secret_service`` starts a private D-Bus
session with gnome-keyring so keychain tests never touch the developer's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from palate.blas import ensure_fast_blas
from palate.client import Client
from palate.errors import PalateError
from palate.paths import resolve

# Before any test module imports mlx.core: OpenBLAS must be loaded first, or every MLX test
# in this process runs on the slow reference BLAS (conftest is imported before test modules).
ensure_fast_blas()

# Only the repo's own adapters: an installed third-party plugin must not change results.
os.environ.setdefault("PALATE_THIRD_PARTY_ADAPTERS", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HH_DATA = SHARED / "data" / "hh_harmless_dev.jsonl"
PALATE = [sys.executable, "-m", "palate.cli"]


def missing(reason: str) -> None:
    """A test input that make/CI always provide is absent: fail under CI (where its absence is
    a defect of the setup), skip with the reason on a developer's partial checkout."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


@pytest.fixture
def home() -> Iterator[Path]:
    """A short temp dir (socket paths must stay under 103 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ph-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def daemon_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PALATE_HOME": str(home), "PALATE_KEY_BACKEND": "file", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


_STARTED: list[DaemonProc] = []


@pytest.fixture(autouse=True)
def _reap_daemons() -> Iterator[None]:
    """A failing test must not leave its daemon running: kill whatever is still alive."""
    yield
    while _STARTED:
        d = _STARTED.pop()
        if d.alive():
            d.kill9()


class DaemonProc:
    """A real ``palate daemon`` child process and helpers to talk to it."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.paths = resolve(home)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "daemon-stderr.log"

    def start(self, timeout: float = 20.0) -> DaemonProc:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*PALATE, "daemon"], env=self.env, stdout=self._log_fh, stderr=self._log_fh
        )
        _STARTED.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with Client(socket_path=self.paths.socket, timeout=5) as c:
                    c.hello()
                return self
            except PalateError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not start: {self.log.read_text()}")

    def client(self, **kw: Any) -> Client:
        return Client(socket_path=self.paths.socket, **kw)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._log_fh.close()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._log_fh.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(
        self, *args: str, input: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PALATE, *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
            check=check,
        )


@pytest.fixture
def palate_daemon(home: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(home, daemon_env(home)).start()
    yield d
    if d.alive():
        d.terminate()


# --- a real Secret Service on a private session bus -------------------------------------


def _require_keyring() -> bool:
    return os.environ.get("PALATE_REQUIRE_KEYRING") == "1"


@pytest.fixture(scope="session")
def secret_service() -> Iterator[dict[str, str]]:
    """Start dbus-daemon + gnome-keyring (unlocked non-interactively); yield the env to use."""
    missing = [b for b in ("dbus-daemon", "gnome-keyring-daemon") if shutil.which(b) is None]
    if missing:
        msg = f"Secret Service test needs {', '.join(missing)} (apt-get install gnome-keyring dbus)"
        if _require_keyring():
            pytest.fail(msg)
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    env = dict(os.environ)
    env.update(
        {
            "HOME": str(root),
            "XDG_DATA_HOME": str(root / "data"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "XDG_CONFIG_HOME": str(root / "cfg"),
        }
    )
    for k in ("data", "run", "cfg"):
        (root / k).mkdir(mode=0o700)
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert bus.stdout is not None
    address = bus.stdout.readline().strip()
    env["DBUS_SESSION_BUS_ADDRESS"] = address
    kr = subprocess.run(
        ["gnome-keyring-daemon", "--unlock", "--components=secrets"],
        input="palate-test-password",
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    for line in kr.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    env.pop("PYTHON_KEYRING_BACKEND", None)
    # Wait until the Secret Service answers a real round trip.
    probe = (
        "import keyring; keyring.set_password('palate-probe','p','x'); "
        "assert keyring.get_password('palate-probe','p') == 'x'; "
        "print(type(keyring.get_keyring()).__module__)"
    )
    ok = None
    for _ in range(50):
        ok = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30
        )
        if ok.returncode == 0 and "SecretService" in ok.stdout:
            break
        time.sleep(0.1)
    else:
        bus.terminate()
        msg = f"gnome-keyring did not come up: {ok.stderr[-500:] if ok else ''}"
        if _require_keyring():
            pytest.fail(msg)
        pytest.skip(msg)
    yield env
    bus.terminate()
    bus.wait(10)
    # gnome-keyring-daemon daemonizes itself; stop the one started with our environment.
    for pid in _keyring_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
    shutil.rmtree(root, ignore_errors=True)


def _keyring_pids(root: Path) -> list[str]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"gnome-keyring-daemon" in cmd and str(root).encode() in env:
            pids.append(p.name)
    return pids
