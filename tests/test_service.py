"""`palate service ...` against a temporary HOME, with every launchctl/systemctl call recorded.

The real launchd cannot run on Linux and this machine has no systemd user session, so the
managers run against small simulations of launchctl and systemctl that record each call:
the tests check the files written and the exact commands issued. Where `systemd-analyze`
exists, the rendered unit is also verified by systemd itself.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from palate.cli import service as cli_service
from palate.errors import PalateError
from palate.paths import resolve
from palate.service.checks_data import classify_keychain, keychain_lock_check
from palate.service.checks_install import service_check
from palate.service.manager import (
    LABEL,
    CommandResult,
    LaunchAgent,
    ServiceContext,
    SystemdUser,
    manager_for,
    parse_launchctl_print,
    parse_print_disabled,
    subprocess_runner,
    systemd_quote,
)

UID = 501
PYTHON = Path("/Users/ana/src/palate/.venv/bin/python")

LAUNCHCTL_PRINT = """gui/501/com.palate.daemon = {
\tactive count = 1
\tpath = /Users/ana/Library/LaunchAgents/com.palate.daemon.plist
\tstate = running

\tprogram = /Users/ana/src/palate/.venv/bin/python
\tpid = 4242
\tlast exit code = (never exited)
\tspawn type = background (4)
}
"""


class FakeLaunchctl:
    """launchctl as launchd would answer, including its asynchronous bootout."""

    def __init__(self, gui: bool = True, bootout_lag: int = 2) -> None:
        self.gui = gui
        self.loaded: set[str] = set()
        self.disabled: set[str] = set()
        self.bootout_lag = bootout_lag
        self._lag: dict[str, int] = {}
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30.0
    ) -> CommandResult:
        a = list(argv)
        self.calls.append(a)
        t = tuple(a)
        if a[:2] == ["launchctl", "print"]:
            target = a[2]
            if target == f"gui/{UID}":
                return CommandResult(t, 0 if self.gui else 125)
            if target in self._lag:
                self._lag[target] -= 1
                if self._lag[target] <= 0:
                    del self._lag[target]
                    self.loaded.discard(target)
                return CommandResult(t, 0, LAUNCHCTL_PRINT)
            if target in self.loaded:
                return CommandResult(t, 0, LAUNCHCTL_PRINT)
            return CommandResult(t, 113, "", f"Could not find service in domain for {target}")
        if a[:2] == ["launchctl", "print-disabled"]:
            lines = [f'\t"{x.split("/")[-1]}" => disabled' for x in self.disabled]
            return CommandResult(t, 0, "disabled services = {\n" + "\n".join(lines) + "\n}\n")
        if a[:2] == ["launchctl", "bootout"]:
            self._lag[a[2]] = self.bootout_lag  # still listed for a few polls
            return CommandResult(t, 0)
        if a[:2] == ["launchctl", "bootstrap"]:
            target = f"{a[2]}/{LABEL}"
            if target in self._lag:
                return CommandResult(t, 5, "", "Bootstrap failed: 5: Input/output error")
            if target in self.disabled:
                return CommandResult(t, 119, "", "Bootstrap failed: 119: Service is disabled")
            self.loaded.add(target)
            return CommandResult(t, 0)
        if a[:2] == ["launchctl", "enable"]:
            self.disabled.discard(a[2])
            return CommandResult(t, 0)
        if a[:2] == ["launchctl", "kickstart"]:
            return CommandResult(t, 0)
        raise AssertionError(f"unexpected command {a}")


class FakeSystemctl:
    """systemctl --user / journalctl as a user manager would answer (or not, bus=False)."""

    def __init__(self, bus: bool = True, journal: str = "") -> None:
        self.bus = bus
        self.journal = journal
        self.active = False
        self.enabled = False
        self.calls: list[list[str]] = []

    def __call__(
        self, argv: Sequence[str], *, capture: bool = True, timeout: float | None = 30.0
    ) -> CommandResult:
        a = list(argv)
        self.calls.append(a)
        t = tuple(a)
        if a[0] == "journalctl":
            return CommandResult(t, 0, self.journal or "-- No entries --\n")
        if a[0] == "tail":
            return CommandResult(t, 0)
        assert a[:2] == ["systemctl", "--user"], a
        if not self.bus:
            return CommandResult(t, 1, "", "Failed to connect to bus: No medium found")
        verb = a[2]
        if verb == "is-active":
            return CommandResult(t, 0 if self.active else 3)
        if verb == "enable":
            self.enabled = self.active = True
        elif verb == "disable":
            self.enabled = self.active = False
        elif verb == "show":
            return CommandResult(
                t,
                0,
                "LoadState=loaded\n"
                f"ActiveState={'active' if self.active else 'inactive'}\n"
                f"SubState={'running' if self.active else 'dead'}\n"
                f"MainPID={'777' if self.active else '0'}\n"
                f"UnitFileState={'enabled' if self.enabled else 'disabled'}\n"
                "Result=success\nExecMainStatus=0\n",
            )
        return CommandResult(t, 0)


def ctx(tmp_path: Path, platform: str, runner: Any, **kw: Any) -> ServiceContext:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    palate_home = tmp_path / "palate home"
    values: dict[str, Any] = {
        "platform": platform,
        "user_home": home,
        "uid": UID,
        "python": PYTHON,
        "palate_home": palate_home,
        "paths": resolve(palate_home),
        "env": {"HOME": str(home)},
        "runner": runner,
        "which": lambda tool: f"/usr/bin/{tool}",
        "sleep": lambda s: None,
    }
    values.update(kw)
    return ServiceContext(**values)


# --- the LaunchAgent -------------------------------------------------------------------


def _absolute_strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj] if "/" in obj else []
    if isinstance(obj, list):
        return [s for x in obj for s in _absolute_strings(x)]
    if isinstance(obj, dict):
        return [s for x in obj.values() for s in _absolute_strings(x)]
    return []


def test_plist_renders_and_parses_with_the_right_keys(tmp_path: Path) -> None:
    agent = LaunchAgent(ctx(tmp_path, "darwin", FakeLaunchctl()))
    data = plistlib.loads(agent.render().encode())
    home = tmp_path / "home"
    assert data["Label"] == LABEL
    assert data["ProgramArguments"] == [str(PYTHON), "-m", "palate.cli", "daemon"]
    assert data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["ProcessType"] == "Background"
    # Throttled I/O would stall the daemon's acknowledging fsync: the child only (issue 14).
    assert "LowPriorityBackgroundIO" not in data
    assert isinstance(data["Nice"], int) and data["Nice"] > 0
    assert data["ThrottleInterval"] >= 10
    assert data["Umask"] == 0o077
    assert data["StandardOutPath"] == f"{home}/Library/Logs/palate/palate.out.log"
    assert data["StandardErrorPath"] == f"{home}/Library/Logs/palate/palate.err.log"
    env = data["EnvironmentVariables"]
    assert env["PALATE_HOME"] == str(tmp_path / "palate home")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith(f"{PYTHON.parent}:")
    for s in _absolute_strings(data):  # every path is absolute, no ~ and no placeholder
        for part in s.split(":"):
            assert part.startswith("/"), s
        assert "~" not in s and "$" not in s


def test_plist_without_palate_home_has_no_such_variable(tmp_path: Path) -> None:
    agent = LaunchAgent(ctx(tmp_path, "darwin", FakeLaunchctl(), palate_home=None))
    assert "PALATE_HOME" not in plistlib.loads(agent.render().encode())["EnvironmentVariables"]


def test_install_writes_the_agent_and_bootstraps_it_in_the_gui_domain(tmp_path: Path) -> None:
    fake = FakeLaunchctl()
    report = LaunchAgent(ctx(tmp_path, "darwin", fake)).install()
    plist = tmp_path / "home/Library/LaunchAgents/com.palate.daemon.plist"
    assert report.written and plist.is_file()
    assert stat.S_IMODE(plist.stat().st_mode) == 0o644
    assert (tmp_path / "home/Library/Logs/palate").is_dir()
    assert fake.calls == [
        ["launchctl", "print", "gui/501"],
        ["launchctl", "print", "gui/501/com.palate.daemon"],
        ["launchctl", "print-disabled", "gui/501"],
        ["launchctl", "bootstrap", "gui/501", str(plist)],
    ]
    assert "gui/501/com.palate.daemon" in fake.loaded


def test_reinstall_boots_out_and_polls_until_gone_before_bootstrapping(tmp_path: Path) -> None:
    fake = FakeLaunchctl(bootout_lag=3)
    agent = LaunchAgent(ctx(tmp_path, "darwin", fake))
    agent.install()
    fake.calls.clear()
    LaunchAgent(ctx(tmp_path, "darwin", fake)).install()
    verbs = [c[1] for c in fake.calls]
    i_out, i_in = verbs.index("bootout"), verbs.index("bootstrap")
    polls = fake.calls[i_out + 1 : i_in]
    assert len(polls) >= 3 and all(c[:2] == ["launchctl", "print"] for c in polls[:3])
    assert verbs.count("bootstrap") == 1  # no "5: Input/output error" retry was needed


def test_no_gui_session_falls_back_to_the_user_domain(tmp_path: Path) -> None:
    fake = FakeLaunchctl(gui=False)
    report = LaunchAgent(ctx(tmp_path, "darwin", fake)).install()
    assert ["launchctl", "bootstrap", "user/501", report.file] in fake.calls
    assert any("no GUI login session" in n for n in report.notes)


def test_disabled_in_login_items_is_reported_distinctly(tmp_path: Path) -> None:
    fake = FakeLaunchctl()
    agent = LaunchAgent(ctx(tmp_path, "darwin", fake))
    agent.install()
    fake.disabled.add(f"gui/501/{LABEL}")
    st = LaunchAgent(ctx(tmp_path, "darwin", fake)).status()
    assert st.disabled_by_user and st.state == "disabled"
    assert "Login Items" in st.detail and "Login Items" in st.fix
    check = service_check(resolve(tmp_path), ctx(tmp_path, "darwin", fake))
    assert check.status == "fail" and "Login Items" in check.detail
    # install re-enables it (the user asked for it explicitly) and says so
    report = LaunchAgent(ctx(tmp_path, "darwin", fake)).install()
    assert ["launchctl", "enable", f"gui/501/{LABEL}"] in fake.calls
    assert any("Login Items" in n for n in report.notes)


def test_bootstrap_refused_as_disabled_names_login_items(tmp_path: Path) -> None:
    class StillDisabled(FakeLaunchctl):
        def __call__(self, argv: Sequence[str], **kw: Any) -> CommandResult:
            if list(argv[:2]) == ["launchctl", "enable"]:  # BTM keeps it off
                self.calls.append(list(argv))
                return CommandResult(tuple(argv), 0)
            return super().__call__(argv, **kw)

    fake = StillDisabled()
    fake.disabled.add(f"gui/501/{LABEL}")
    with pytest.raises(PalateError, match="disabled by the user in Login Items") as e:
        LaunchAgent(ctx(tmp_path, "darwin", fake)).install()
    assert e.value.details["disabled_by_user"] is True


def test_status_uninstall_restart_logs_on_macos(tmp_path: Path) -> None:
    fake = FakeLaunchctl()
    c = ctx(tmp_path, "darwin", fake)
    LaunchAgent(c).install()
    st = LaunchAgent(c).status()
    assert (st.running, st.pid, st.state, st.enabled) == (True, 4242, "running", True)
    LaunchAgent(c).restart()
    assert fake.calls[-1] == ["launchctl", "kickstart", "-k", f"gui/501/{LABEL}"]
    c.paths.log_dir.mkdir(parents=True)
    (c.paths.log_dir / "daemon.log").write_text("".join(f"line {i}\n" for i in range(100)))
    assert LaunchAgent(c).logs(3) == "line 97\nline 98\nline 99\n"
    report = LaunchAgent(c).uninstall()
    assert report.removed and not Path(report.file).exists()
    assert ["launchctl", "bootout", f"gui/501/{LABEL}"] in fake.calls
    assert not fake.loaded
    assert LaunchAgent(c).status().state == "not installed"


def test_launchctl_parsers() -> None:
    assert parse_launchctl_print(LAUNCHCTL_PRINT)["pid"] == "4242"
    assert parse_launchctl_print(LAUNCHCTL_PRINT)["state"] == "running"
    new = 'disabled services = {\n\t"com.palate.daemon" => disabled\n\t"com.x" => enabled\n}'
    old = 'disabled services = {\n\t"com.palate.daemon" => true\n}'
    assert parse_print_disabled(new, LABEL) is True
    assert parse_print_disabled(new, "com.x") is False
    assert parse_print_disabled(old, LABEL) is True
    assert parse_print_disabled("disabled services = {\n}", LABEL) is None


# --- systemd --user ---------------------------------------------------------------------


def test_unit_renders_with_absolute_quoted_exec_start(tmp_path: Path) -> None:
    unit = SystemdUser(ctx(tmp_path, "linux", FakeSystemctl())).render()
    lines = unit.splitlines()
    assert f"ExecStart={PYTHON} -m palate.cli daemon" in lines
    assert "Restart=on-failure" in lines and "WantedBy=default.target" in lines
    assert "KillMode=mixed" in lines and any(x.startswith("Nice=") for x in lines)
    assert f'Environment="PALATE_HOME={tmp_path}/palate home"' in lines
    assert "${" not in unit
    assert systemd_quote("/a b/50%$x") == '"/a b/50%%$$x"'


def _verify(unit_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--user", str(unit_dir / "palate.service")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    # A real interpreter path: verify checks that ExecStart's binary exists.
    c = ctx(tmp_path, "linux", FakeSystemctl(), python=Path(sys.executable).absolute())
    m = SystemdUser(c)
    m.file.parent.mkdir(parents=True)
    m.file.write_text(m.render())
    env = dict(os.environ, HOME=str(c.user_home), XDG_CONFIG_HOME=str(c.user_home / ".config"))
    env.setdefault("XDG_RUNTIME_DIR", str(tmp_path))
    r = _verify(m.file.parent, env)
    if r.returncode != 0 and "Failed to" in r.stderr and "palate.service" not in r.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    assert "palate.service" not in r.stderr, r.stderr  # no warnings about our unit either
    # and the check has teeth: a broken unit fails it
    m.file.write_text(m.render().replace("Restart=on-failure", "Restart=sometimes"))
    bad = _verify(m.file.parent, env)
    assert "palate.service" in bad.stderr or bad.returncode != 0


def test_systemd_install_status_restart_uninstall(tmp_path: Path) -> None:
    fake = FakeSystemctl()
    c = ctx(tmp_path, "linux", fake, env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    report = SystemdUser(c).install()
    unit = tmp_path / "cfg/systemd/user/palate.service"
    assert report.written and unit.is_file() and report.file == str(unit)
    assert fake.calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "is-active", "--quiet", "palate.service"],
        ["systemctl", "--user", "enable", "--now", "palate.service"],
    ]
    st = SystemdUser(c).status()
    assert (st.running, st.pid, st.enabled) == (True, 777, True)
    fake.calls.clear()
    SystemdUser(c).install()  # unchanged unit, already running: nothing to restart
    assert ["systemctl", "--user", "restart", "palate.service"] not in fake.calls
    SystemdUser(c).restart()
    assert fake.calls[-1] == ["systemctl", "--user", "restart", "palate.service"]
    fake.calls.clear()
    report = SystemdUser(c).uninstall()
    assert report.removed and not unit.exists()
    assert fake.calls[0] == ["systemctl", "--user", "disable", "--now", "palate.service"]
    assert ["systemctl", "--user", "daemon-reload"] in fake.calls


def test_no_systemd_user_session_is_a_clear_error(tmp_path: Path) -> None:
    fake = FakeSystemctl(bus=False)
    c = ctx(tmp_path, "linux", fake)
    with pytest.raises(PalateError, match="no systemd user session") as e:
        SystemdUser(c).install()
    assert e.value.code == "unavailable"
    assert SystemdUser(c).file.is_file()  # written, so a later login can enable it
    assert "not reachable" in SystemdUser(c).status().detail
    no_tool = ctx(tmp_path, "linux", fake, which=lambda tool: None)
    with pytest.raises(PalateError, match="`systemctl` was not found"):
        SystemdUser(no_tool).install()


def test_logs_use_the_journal_then_fall_back_to_daemon_log(tmp_path: Path) -> None:
    fake = FakeSystemctl(journal="Nov 26 palate[1]: ready\n")
    c = ctx(tmp_path, "linux", fake)
    assert SystemdUser(c).logs(10) == "Nov 26 palate[1]: ready\n"
    assert fake.calls[-1][:4] == ["journalctl", "--user", "-u", "palate.service"]
    fake.journal = ""
    with pytest.raises(PalateError, match="no log yet"):
        SystemdUser(c).logs(10)
    c.paths.log_dir.mkdir(parents=True)
    (c.paths.log_dir / "daemon.log").write_text("a\nb\n")
    assert SystemdUser(c).logs(1) == "b\n"
    SystemdUser(c).logs(5, follow=True)
    assert fake.calls[-1] == ["journalctl", "--user", "-u", "palate.service", "-n", "5",
                              "--no-pager", "-f"]  # fmt: skip


def test_unsupported_platform() -> None:
    with pytest.raises(PalateError, match="no service integration"):
        manager_for(ServiceContext.detect(platform="win32"))


# --- the CLI, with the real runner and fake tools on PATH ----------------------------------


FAKE_TOOL = """#!/bin/sh
echo "$(basename "$0") $*" >> "$PALATE_TEST_CALLS"
case "$*" in
  *is-active*) exit 3 ;;
esac
exit 0
"""


def test_cli_install_status_and_uninstall_with_recorded_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`palate service install` through click and the real subprocess runner: the
    systemctl on PATH is a script that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("systemctl", "journalctl"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls.log"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PALATE_TEST_CALLS": str(calls),
        "PALATE_HOME": str(tmp_path / "ph"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)

    def make() -> Any:
        return manager_for(ServiceContext.detect(platform="linux", runner=subprocess_runner))

    monkeypatch.setattr(cli_service, "make_manager", make)
    runner = CliRunner()
    dry = runner.invoke(cli_service.service, ["install", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "ExecStart=" in dry.output and not calls.exists()
    res = runner.invoke(cli_service.service, ["install", "--json"])
    assert res.exit_code == 0, res.output
    unit = home / ".config/systemd/user/palate.service"
    assert unit.is_file() and f"PALATE_HOME={tmp_path}/ph" in unit.read_text()
    assert calls.read_text().splitlines() == [
        "systemctl --user daemon-reload",
        "systemctl --user is-active --quiet palate.service",
        "systemctl --user enable --now palate.service",
    ]
    st = runner.invoke(cli_service.service, ["status", "--json"])
    assert st.exit_code == 3  # our fake reports nothing running
    res = runner.invoke(cli_service.service, ["uninstall"])
    assert res.exit_code == 0 and "removed" in res.output and not unit.exists()
    assert "systemctl --user disable --now palate.service" in calls.read_text()


def test_schedule_command_without_a_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALATE_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[schedule]\ntime = "04:30"\nrequire_idle_s = 0\n')
    res = CliRunner().invoke(cli_service.schedule, ["--json"])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.output)
    assert data["daemon"] is False and data["config"]["time"] == "04:30"
    assert [c["name"] for c in data["conditions"]] == ["ac_power"]
    human = CliRunner().invoke(cli_service.schedule, [])
    assert "nightly at 04:30" in human.output and "not running" in human.output


# --- doctor: keychain ---------------------------------------------------------------------


def test_locked_keychain_has_its_own_message() -> None:
    locked = classify_keychain(
        "security: SecKeychainCopySettings login.keychain-db: User interaction is not "
        "allowed. (-25308)",
        36,
    )
    assert locked.status == "fail" and "locked" in locked.detail
    assert "security unlock-keychain" in locked.fix
    ok = classify_keychain(
        'Keychain "/Users/ana/Library/Keychains/login.keychain-db" no-timeout', 0
    )
    assert ok.status == "ok"
    assert classify_keychain("The specified keychain could not be found. (-25294)").status == (
        "fail"
    )
    assert keychain_lock_check(resolve(Path("/tmp/x")), platform="linux").status == "ok"

    def runner(argv: Sequence[str], **kw: Any) -> CommandResult:
        assert list(argv) == ["security", "show-keychain-info"]
        return CommandResult(tuple(argv), 36, "", "User interaction is not allowed.")

    check = keychain_lock_check(resolve(Path("/tmp/x")), runner, "darwin")
    assert check.status == "fail" and "locked" in check.detail
