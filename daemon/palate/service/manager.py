"""``palate service install|uninstall|status|logs|restart``: run the daemon at login.

macOS gets a LaunchAgent (``launchctl`` in the ``gui/$UID`` domain, ``user/$UID`` when
there is no GUI session, e.g. over SSH); Linux gets a ``systemd --user`` unit. Both are
rendered from the templates in ``launchd/`` with every path absolute, because launchd
runs ``ProgramArguments`` with execvp and no shell (no ``~``, no PATH from rc files) and
systemd requires an absolute ``ExecStart``.

Every external command goes through one injectable ``Runner``, so tests record the exact
``launchctl``/``systemctl`` calls against a temporary HOME (the real launchd cannot run on
Linux, and the test machine has no systemd user session). Facts this leans on
(/work/shared/reference/daemon-platform.md §1): ``bootout`` is asynchronous and an
immediate ``bootstrap`` fails with ``5: Input/output error``, so we poll until the label
is gone; a job switched off in System Settings › Login Items shows as disabled in
``launchctl print-disabled`` and is reported as such, distinctly.
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from palate.errors import PalateError
from palate.paths import Paths, resolve

LABEL = "com.palate.daemon"
UNIT = "palate.service"
REPO = Path(__file__).resolve().parents[3]
TEMPLATES = REPO / "launchd"
DOCS = REPO / "docs" / "operations.md"
#: How long to wait for launchd to forget a booted-out job before bootstrapping again.
BOOTOUT_WAIT_S = 10.0
POLL_S = 0.25


# --- running commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self) -> str:
        text = (self.stderr or self.stdout).strip()
        return text.splitlines()[-1] if text else f"exit status {self.returncode}"


class Runner(Protocol):
    """Runs one command. ``capture=False`` streams to the terminal (``logs -f``)."""

    def __call__(
        self, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30.0
    ) -> CommandResult: ...


def subprocess_runner(
    argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30.0
) -> CommandResult:
    """The real runner: never raises for a missing, failing or hanging command."""
    args = tuple(argv)
    try:
        proc = subprocess.run(
            list(args), capture_output=capture, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        return CommandResult(args, 127, "", f"{args[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CommandResult(args, 124, "", f"{args[0]} did not answer within {timeout} s")
    except KeyboardInterrupt:  # Ctrl-C ends `logs -f`: that is the normal way out
        return CommandResult(args, 130)
    return CommandResult(args, proc.returncode, proc.stdout or "", proc.stderr or "")


@dataclass(frozen=True)
class ServiceContext:
    """Everything a service manager reads from the outside world, injectable for tests."""

    platform: str
    user_home: Path
    uid: int
    python: Path
    palate_home: Path | None
    paths: Paths
    env: Mapping[str, str]
    runner: Runner = subprocess_runner
    which: Callable[[str], str | None] = shutil.which
    sleep: Callable[[float], None] = time.sleep
    templates: Path = TEMPLATES

    @classmethod
    def detect(cls, **overrides: Any) -> ServiceContext:
        env = overrides.pop("env", os.environ)
        home = env.get("PALATE_HOME")
        values: dict[str, Any] = {
            "platform": sys.platform,
            "user_home": Path(env.get("HOME") or Path.home()),
            "uid": os.getuid(),
            # Not resolved: a venv's python is a symlink, and resolving it leaves the venv.
            "python": Path(sys.executable).absolute(),
            "palate_home": Path(home).expanduser().absolute() if home else None,
            "paths": resolve(),
            "env": dict(env),
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class ServiceStatus:
    manager: str
    installed: bool
    file: str
    loaded: bool = False
    running: bool = False
    pid: int | None = None
    state: str = "not installed"
    enabled: bool | None = None
    disabled_by_user: bool = False
    domain: str | None = None
    last_exit: str | None = None
    detail: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What an install/uninstall/restart did: files, commands (with results) and notes."""

    manager: str
    file: str
    written: bool = False
    removed: bool = False
    content: str | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_file(path: Path, content: str, mode: int = 0o644) -> bool:
    """Atomically write ``content`` (readable by the service manager); True if it changed."""
    if path.exists() and path.read_text(encoding="utf-8") == content:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def tail_file(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file (logs are rotated at 5 MB, so read it all)."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        return "".join(fh.readlines()[-lines:]) if lines > 0 else ""


# --- the managers ---------------------------------------------------------------------------


class ServiceManager(ABC):
    name: str

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.commands: list[dict[str, Any]] = []

    def run(self, *argv: str, capture: bool = True, timeout: float | None = 30.0) -> CommandResult:
        r = self.ctx.runner(argv, capture=capture, timeout=timeout)
        self.commands.append({"argv": list(argv), "returncode": r.returncode})
        return r

    def require(self, tool: str) -> None:
        if self.ctx.which(tool) is None:
            raise PalateError(
                "unavailable",
                f"`{tool}` was not found, so Palate cannot install a {self.name} service here; "
                "run `palate daemon` from your session's autostart instead",
            )

    def template(self, name: str) -> Path:
        path = self.ctx.templates / name
        if not path.is_file():
            raise PalateError(
                "not_found",
                f"service template {path} is missing; reinstall Palate from its source "
                "checkout (`make run`), which ships launchd/",
            )
        return path

    @property
    @abstractmethod
    def file(self) -> Path: ...

    @abstractmethod
    def render(self) -> str: ...

    @abstractmethod
    def plan(self) -> list[list[str]]:
        """The commands ``install`` runs in the usual case (for ``--dry-run``)."""

    @abstractmethod
    def install(self) -> Report: ...

    @abstractmethod
    def uninstall(self) -> Report: ...

    @abstractmethod
    def status(self) -> ServiceStatus: ...

    @abstractmethod
    def restart(self) -> Report: ...

    @abstractmethod
    def logs(self, lines: int = 50, follow: bool = False) -> str | None:
        """The last ``lines`` log lines, or None after streaming them (``follow``)."""

    def dry_run(self) -> Report:
        return Report(
            self.name,
            str(self.file),
            content=self.render(),
            commands=[{"argv": a, "returncode": None} for a in self.plan()],
            notes=["dry run: nothing was written or run"],
        )

    def report(self, **kw: Any) -> Report:
        return Report(self.name, str(self.file), commands=self.commands, **kw)

    def daemon_log(self) -> Path:
        return self.ctx.paths.log_dir / "daemon.log"

    def file_logs(self, candidates: Sequence[Path], lines: int, follow: bool) -> str | None:
        """Fallback: Palate's own rotating log (or the service's stderr file)."""
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise PalateError(
                "not_found",
                "no log yet: " + ", ".join(str(p) for p in candidates) + " do not exist",
            )
        if follow:
            self.run("tail", "-n", str(lines), "-F", str(path), capture=False, timeout=None)
            return None
        return tail_file(path, lines)


def _fill(obj: Any, values: Mapping[str, str]) -> Any:
    """Substitute ``${name}`` in every string of a loaded plist, structurally."""
    if isinstance(obj, str):
        return string.Template(obj).substitute(values)
    if isinstance(obj, list):
        return [_fill(x, values) for x in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, values) for k, v in obj.items()}
    return obj


class LaunchAgent(ServiceManager):
    """A per-user LaunchAgent in ``~/Library/LaunchAgents``."""

    name = "launchd"

    @property
    def file(self) -> Path:
        return self.ctx.user_home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def log_dir(self) -> Path:
        return self.ctx.user_home / "Library" / "Logs" / "palate"

    def plist(self) -> dict[str, Any]:
        template = plistlib.loads(self.template(f"{LABEL}.plist").read_bytes())
        data: dict[str, Any] = _fill(
            template,
            {
                "python": str(self.ctx.python),
                "venv_bin": str(self.ctx.python.parent),
                "home": str(self.ctx.user_home),
                "log_dir": str(self.log_dir),
            },
        )
        env = data.setdefault("EnvironmentVariables", {})
        if self.ctx.palate_home is not None:
            env["PALATE_HOME"] = str(self.ctx.palate_home)
        for key in ("PALATE_KEY_BACKEND", "PYTHON_KEYRING_BACKEND"):
            if self.ctx.env.get(key):
                env[key] = self.ctx.env[key]
        return data

    def render(self) -> str:
        return plistlib.dumps(self.plist()).decode("utf-8")

    # -- launchctl helpers -------------------------------------------------------------
    def gui_domain(self) -> str:
        return f"gui/{self.ctx.uid}"

    def domain(self) -> str:
        """``gui/$UID`` in a GUI login, else ``user/$UID`` (SSH, no console session)."""
        if self.run("launchctl", "print", self.gui_domain()).ok:
            return self.gui_domain()
        return f"user/{self.ctx.uid}"

    def loaded(self, domain: str) -> CommandResult:
        return self.run("launchctl", "print", f"{domain}/{LABEL}")

    def disabled(self, domain: str) -> bool | None:
        """True if switched off (Login Items or ``launchctl disable``); not listed means
        enabled (no override); None when launchctl could not say."""
        r = self.run("launchctl", "print-disabled", domain)
        return bool(parse_print_disabled(r.stdout, LABEL)) if r.ok else None

    def wait_gone(self, domain: str) -> bool:
        """``bootout`` returns before launchd has let go of the label: poll for it."""
        for _ in range(int(BOOTOUT_WAIT_S / POLL_S)):
            if not self.loaded(domain).ok:
                return True
            self.ctx.sleep(POLL_S)
        return False

    def bootout(self, domain: str) -> None:
        r = self.run("launchctl", "bootout", f"{domain}/{LABEL}")
        if not self.wait_gone(domain):
            raise PalateError(
                "internal",
                f"launchd still holds {domain}/{LABEL} {BOOTOUT_WAIT_S:.0f} s after bootout "
                f"({r.message()}); try again, or log out and in",
            )

    def bootstrap(self, domain: str) -> CommandResult:
        r = self.run("launchctl", "bootstrap", domain, str(self.file))
        if r.returncode == 5 or "Input/output error" in r.stderr:
            # still being torn down after a bootout (launchd is asynchronous): once more
            self.wait_gone(domain)
            r = self.run("launchctl", "bootstrap", domain, str(self.file))
        return r

    def plan(self) -> list[list[str]]:
        d = self.gui_domain()
        return [
            ["launchctl", "print", d],
            ["launchctl", "bootout", f"{d}/{LABEL}"],
            ["launchctl", "enable", f"{d}/{LABEL}"],
            ["launchctl", "bootstrap", d, str(self.file)],
        ]

    # -- commands ----------------------------------------------------------------------
    def install(self) -> Report:
        self.require("launchctl")
        written = write_file(self.file, self.render())
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        domain = self.domain()
        notes = []
        if domain != self.gui_domain():
            notes.append(
                f"no GUI login session: installed in {domain} (it runs while you are logged "
                "in over SSH; the keychain may be locked there, see `palate doctor`)"
            )
        if self.loaded(domain).ok:
            self.bootout(domain)
        if self.disabled(domain):
            self.run("launchctl", "enable", f"{domain}/{LABEL}")
            notes.append("it had been switched off (Login Items); it is enabled again")
        r = self.bootstrap(domain)
        if not r.ok and domain == self.gui_domain() and r.returncode == 125:
            domain = f"user/{self.ctx.uid}"  # "Domain does not support specified action"
            r = self.bootstrap(domain)
        if not r.ok:
            self._bootstrap_failed(domain, r)
        notes.append(f"loaded as {domain}/{LABEL}; logs in {self.log_dir}")
        return self.report(written=written, notes=notes)

    def _bootstrap_failed(self, domain: str, r: CommandResult) -> None:
        if r.returncode == 119 or "disabled" in r.stderr.lower() or self.disabled(domain):
            raise PalateError(
                "unavailable",
                f"macOS refused to start {LABEL}: it is disabled by the user in Login Items. "
                "Turn 'palate' (python) back on in System Settings › General › Login Items, "
                "then run `palate service install` again",
                {"disabled_by_user": True},
            )
        raise PalateError(
            "internal",
            f"launchctl bootstrap {domain} {self.file} failed: {r.message()}; the plist is "
            f"in place, see {self.log_dir} and `palate service status`",
        )

    def uninstall(self) -> Report:
        self.require("launchctl")
        for domain in dict.fromkeys((self.domain(), f"user/{self.ctx.uid}")):
            if self.loaded(domain).ok:
                self.bootout(domain)
        removed = False
        if self.file.exists():
            self.file.unlink()
            removed = True
        return self.report(removed=removed, notes=[f"logs kept in {self.log_dir}"])

    def status(self) -> ServiceStatus:
        st = ServiceStatus(self.name, self.file.exists(), str(self.file))
        if self.ctx.which("launchctl") is None:
            st.state, st.detail = "unknown", "launchctl not found (not macOS?)"
            return st
        domain = self.domain()
        st.domain = domain
        dis = self.disabled(domain)
        st.enabled = None if dis is None else not dis
        r = self.loaded(domain)
        st.loaded = r.ok
        if r.ok:
            info = parse_launchctl_print(r.stdout)
            st.pid = int(info["pid"]) if info.get("pid", "").isdigit() else None
            st.running = info.get("state") == "running"
            st.state = info.get("state", "loaded")
            st.last_exit = info.get("last exit code")
        if dis:
            st.disabled_by_user = True
            st.state = "disabled"
            st.detail = "disabled by the user in Login Items (or `launchctl disable`)"
            st.fix = (
                "turn 'palate' back on in System Settings › General › Login Items, "
                "or run `palate service install`"
            )
        elif not st.installed:
            st.state, st.fix = "not installed", "run `palate service install`"
        elif not st.loaded:
            st.state, st.detail = "not loaded", f"{self.file} exists but launchd has not loaded it"
            st.fix = "run `palate service install` (or log out and in again)"
        elif not st.running:
            st.detail = f"loaded but not running (last exit: {st.last_exit or '?'})"
            st.fix = "see `palate service logs`; restart with `palate service restart`"
        else:
            st.detail = f"running in {domain}, pid {st.pid}"
        return st

    def restart(self) -> Report:
        self.require("launchctl")
        domain = self.domain()
        if not self.loaded(domain).ok:
            if not self.file.exists():
                raise PalateError("not_found", "not installed; run `palate service install`")
            r = self.bootstrap(domain)
            if not r.ok:
                self._bootstrap_failed(domain, r)
        else:
            r = self.run("launchctl", "kickstart", "-k", f"{domain}/{LABEL}")
            if not r.ok:
                raise PalateError("internal", f"launchctl kickstart failed: {r.message()}")
        return self.report(notes=[f"restarted {domain}/{LABEL}"])

    def logs(self, lines: int = 50, follow: bool = False) -> str | None:
        # Palate's own rotating log has everything; launchd's stderr file only what
        # happened before logging started (a failed start) and is not rotated.
        return self.file_logs([self.daemon_log(), self.log_dir / "palate.err.log"], lines, follow)


def parse_print_disabled(output: str, label: str) -> bool | None:
    """``launchctl print-disabled``: ``"label" => disabled`` (older macOS: ``=> true``)."""
    m = re.search(rf'"{re.escape(label)}"\s*=>\s*(\w+)', output)
    if not m:
        return None
    return m.group(1).lower() in ("disabled", "true")


def parse_launchctl_print(output: str) -> dict[str, str]:
    """The top-level ``key = value`` lines of ``launchctl print`` (format is not stable,
    so only ``state``, ``pid`` and ``last exit code`` are relied on, each optional)."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        m = re.match(r"^\t(\w[\w ]*?) = (.*)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


# --- systemd --user -------------------------------------------------------------------------


def systemd_escape(value: str) -> str:
    """Escape for a unit file value: ``%`` specifiers always, and in ExecStart ``$``."""
    return value.replace("%", "%%")


def systemd_quote(arg: str) -> str:
    """One ExecStart argument: quoted when needed, specifiers and ``$`` escaped."""
    arg = systemd_escape(arg).replace("$", "$$")
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SystemdUser(ServiceManager):
    """A ``systemd --user`` unit in ``$XDG_CONFIG_HOME/systemd/user``."""

    name = "systemd"

    @property
    def file(self) -> Path:
        xdg = self.ctx.env.get("XDG_CONFIG_HOME")
        base = Path(xdg) if xdg else self.ctx.user_home / ".config"
        return base / "systemd" / "user" / UNIT

    def render(self) -> str:
        argv = [str(self.ctx.python), "-m", "palate.cli", "daemon"]
        env_lines = []
        if self.ctx.palate_home is not None:
            env_lines.append(f"PALATE_HOME={self.ctx.palate_home}")
        for key in ("PALATE_KEY_BACKEND", "PYTHON_KEYRING_BACKEND"):
            if self.ctx.env.get(key):
                env_lines.append(f"{key}={self.ctx.env[key]}")
        text = self.template(UNIT).read_text(encoding="utf-8")
        return string.Template(text).substitute(
            exec_start=" ".join(systemd_quote(a) for a in argv),
            home=systemd_escape(str(self.ctx.user_home)),
            docs=systemd_escape(str(DOCS)),
            environment="\n".join(f"Environment={systemd_quote(e)}" for e in env_lines),
        )

    def systemctl(self, *args: str) -> CommandResult:
        return self.run("systemctl", "--user", *args)

    def _unreachable(self, r: CommandResult, done: str) -> PalateError:
        return PalateError(
            "unavailable",
            f"{done}, but `systemctl --user` failed: {r.message()}. There is no systemd user "
            "session here (containers, some SSH logins); run `palate daemon` yourself, or "
            "log in to a session with systemd and run `palate service install` again",
        )

    def plan(self) -> list[list[str]]:
        return [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", UNIT],
        ]

    def install(self) -> Report:
        self.require("systemctl")
        written = write_file(self.file, self.render())
        r = self.systemctl("daemon-reload")
        if not r.ok:
            raise self._unreachable(r, f"wrote {self.file}")
        was_active = self.systemctl("is-active", "--quiet", UNIT).ok
        r = self.systemctl("enable", "--now", UNIT)
        if not r.ok:
            raise self._unreachable(r, f"wrote {self.file}")
        if was_active and written:
            r = self.systemctl("restart", UNIT)  # pick up the changed unit
            if not r.ok:
                raise PalateError("internal", f"systemctl --user restart failed: {r.message()}")
        return self.report(
            written=written,
            notes=[
                f"enabled and started {UNIT}; logs: `palate service logs`",
                "it stops when you log out; to keep it running: `loginctl enable-linger $USER`",
            ],
        )

    def uninstall(self) -> Report:
        self.require("systemctl")
        notes = []
        r = self.systemctl("disable", "--now", UNIT)
        if not r.ok and self.file.exists():
            notes.append(f"systemctl --user disable failed ({r.message()}); removed the file")
        removed = False
        if self.file.exists():
            self.file.unlink()
            removed = True
        self.systemctl("daemon-reload")
        self.systemctl("reset-failed", UNIT)
        return self.report(removed=removed, notes=notes)

    def status(self) -> ServiceStatus:
        st = ServiceStatus(self.name, self.file.exists(), str(self.file), domain="user")
        if self.ctx.which("systemctl") is None:
            st.state, st.detail = "unknown", "systemctl not found: no systemd on this machine"
            st.fix = "run `palate daemon` from your session's autostart"
            return st
        props = "LoadState,ActiveState,SubState,MainPID,UnitFileState,Result,ExecMainStatus"
        r = self.systemctl("show", UNIT, f"--property={props}")
        if not r.ok:
            st.state, st.detail = "unknown", f"systemd --user not reachable: {r.message()}"
            st.fix = "log in to a systemd session, or run `palate daemon` yourself"
            return st
        info = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        st.loaded = info.get("LoadState") == "loaded"
        st.running = info.get("ActiveState") == "active"
        pid = info.get("MainPID", "0")
        st.pid = int(pid) if pid.isdigit() and pid != "0" else None
        st.enabled = info.get("UnitFileState") in ("enabled", "enabled-runtime", "linked")
        st.last_exit = info.get("ExecMainStatus")
        st.state = f"{info.get('ActiveState', '?')} ({info.get('SubState', '?')})"
        if not st.installed:
            st.state, st.fix = "not installed", "run `palate service install`"
        elif info.get("ActiveState") == "failed":
            st.detail = f"failed ({info.get('Result', '?')}, exit status {st.last_exit})"
            st.fix = "see `palate service logs`; then `palate service restart`"
        elif not st.running:
            st.detail = "installed but not running"
            st.fix = "`palate service restart`"
        else:
            st.detail = f"running, pid {st.pid}"
        if st.installed and st.enabled is False:
            st.detail += "; not enabled at login"
            st.fix = st.fix or "`palate service install`"
        return st

    def restart(self) -> Report:
        self.require("systemctl")
        if not self.file.exists():
            raise PalateError("not_found", "not installed; run `palate service install`")
        r = self.systemctl("restart", UNIT)
        if not r.ok:
            raise self._unreachable(r, "the unit is installed")
        return self.report(notes=[f"restarted {UNIT}"])

    def logs(self, lines: int = 50, follow: bool = False) -> str | None:
        if self.ctx.which("journalctl") is not None:
            argv = ["journalctl", "--user", "-u", UNIT, "-n", str(lines), "--no-pager"]
            if follow:
                r = self.run(*argv, "-f", capture=False, timeout=None)
                if r.ok or r.returncode == 130:
                    return None
            else:
                r = self.run(*argv, "--quiet")
                text = r.stdout.strip()
                if r.ok and text and not text.startswith("-- No entries --"):
                    return r.stdout
        return self.file_logs([self.daemon_log()], lines, follow)


def manager_for(ctx: ServiceContext) -> ServiceManager:
    """The service manager of this platform."""
    if ctx.platform == "darwin":
        return LaunchAgent(ctx)
    if ctx.platform.startswith("linux"):
        return SystemdUser(ctx)
    raise PalateError(
        "unavailable",
        f"Palate has no service integration for {ctx.platform}; run `palate daemon` yourself",
    )
