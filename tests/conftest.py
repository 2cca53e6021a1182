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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from palate.errors import PalateError
from palate.model.blas import ensure_fast_blas
from palate.paths import resolve
from palate.wire.client import Client

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
    """A real ``palate daemon`` child process and helpers to talk to it.

    ``preexec_fn`` runs in the child before exec (the fault tests set rlimits there);
    :meth:`spawn` starts it without waiting for the socket (to kill it during start-up).
    """

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.home = home
        self.env = env
        self.preexec_fn = preexec_fn
        self.paths = resolve(home)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "daemon-stderr.log"

    def spawn(self) -> subprocess.Popen[bytes]:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed by kill9/terminate
        self.proc = subprocess.Popen(
            [*PALATE, "daemon"],
            env=self.env,
            stdout=self._log_fh,
            stderr=self._log_fh,
            preexec_fn=self.preexec_fn,
        )
        _STARTED.append(self)  # reaped if the test fails
        return self.proc

    def start(self, timeout: float = 20.0) -> DaemonProc:
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited {proc.returncode}: {self.log.read_text()}")
            try:
                with Client(socket_path=self.paths.socket, timeout=5) as c:
                    c.hello()
                return self
            except PalateError:
                time.sleep(0.02)
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


@contextlib.contextmanager
def module_daemon(prefix: str) -> Iterator[DaemonProc]:
    """A daemon in its own temp home shared by a module's tests (not reaped after each)."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d = DaemonProc(home, daemon_env(home)).start()
    _STARTED.remove(d)
    try:
        yield d
    finally:
        if d.alive():
            d.terminate()
        shutil.rmtree(home, ignore_errors=True)


def wait_for(what: Callable[[], Any], timeout: float, message: str, every: float = 0.02) -> Any:
    """Poll real process state until ``what()`` is truthy; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


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
