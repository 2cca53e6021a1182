"""`palate pause` / `palate resume` through the real daemon and real processes: what the
daemon's pause state becomes, what `palate status` shows, usage mistakes exiting 2, and exit 3
without a daemon (docs/cli.md)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import PALATE, DaemonProc, daemon_env, module_daemon
from palate.cli import pause as cli_pause
from palate.cli.main import EXIT_CODES, cli


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProc]:
    with module_daemon("pp-") as daemon:
        yield daemon


@pytest.fixture(autouse=True)
def _collecting(d: DaemonProc) -> Iterator[None]:
    """Every test starts, and leaves the daemon, collecting."""
    with d.client() as c:
        c.call("resume")
    yield
    with d.client() as c:
        c.call("resume")


def state(d: DaemonProc) -> dict[str, Any]:
    with d.client() as c:
        return c.call("pause_state")  # type: ignore[no-any-return]


def status_lines(d: DaemonProc) -> dict[str, str]:
    r = d.cli("status")
    assert r.returncode == 0, r.stderr
    return {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}


def local(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def test_pause_for_a_duration_then_resume(d: DaemonProc) -> None:
    t0 = time.time()
    r = d.cli("pause", "--for", "2h30m", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["paused"]
    assert p["since"] >= t0 - 1
    assert p["until"] - p["since"] == pytest.approx(9000, abs=5)
    assert 8990 < p["remaining_s"] <= 9000
    # the daemon holds it: pause_state, status --json and the status text all say so
    assert state(d)["paused"]["until"] == pytest.approx(p["until"])
    assert json.loads(d.cli("status", "--json").stdout)["paused"]["until"] == pytest.approx(
        p["until"]
    )
    line = status_lines(d)["paused"]
    assert line.startswith(f"paused   until {local(p['until'])} (2h"), line
    assert "`palate resume`" in line
    # resume ends it now and says how long it lasted
    r = d.cli("resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"collection resumed (it was paused since {local(p['since'])}")
    assert state(d)["paused"] is None
    assert "paused" not in status_lines(d)
    ended = state(d)["windows"][-1]
    assert ended[0] == pytest.approx(p["since"]) and ended[1] < p["until"]
    # resuming again changes nothing and still exits 0
    r = d.cli("resume", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"paused": None, "was_paused": False}
    assert d.cli("resume").stdout.strip() == "collection was not paused; nothing changed"


def test_pause_until_resumed_and_pausing_again(d: DaemonProc) -> None:
    r = d.cli("pause")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "collection paused until you resume it (`palate resume`)"
    assert "feedback you give yourself" in r.stdout
    first = state(d)["paused"]
    assert first["until"] is None and first["remaining_s"] is None
    assert status_lines(d)["paused"].startswith(
        f"paused   until resumed (since {local(first['since'])})"
    )
    # pausing while paused keeps the start and sets the new end, and says it was paused
    r = d.cli("pause", "--for", "45m")
    assert r.returncode == 0, r.stderr
    assert re.match(r"collection paused until \S+ \S+ \(for 45m\);", r.stdout), r.stdout
    assert "it was already paused, since" in r.stdout
    again = state(d)["paused"]
    assert again["since"] == pytest.approx(first["since"])
    assert again["until"] - time.time() == pytest.approx(2700, abs=10)
    assert d.cli("resume", "--json").stdout and state(d)["paused"] is None


BAD_DURATIONS = [
    ("30", "is not a duration; give a number with a unit"),
    ("abc", "is not a duration"),
    ("0m", "is no time at all"),
    ("31d", "longer than the longest pause, 30 days"),
    ("1h1h", "gives the unit 'h' twice"),
    ("-5m", "is not a duration"),
]


def test_a_bad_duration_is_a_usage_error_and_pauses_nothing(d: DaemonProc) -> None:
    # One real process shows the whole message; the rest run in process (same code, less
    # start-up time), against the same running daemon.
    r = d.cli("pause", "--for", "30")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Usage: palate pause" in r.stderr and "Invalid value for '--for'" in r.stderr
    assert BAD_DURATIONS[0][1] in r.stderr and "Traceback" not in r.stderr
    runner = CliRunner()
    for value, why in BAD_DURATIONS:
        res = runner.invoke(cli, ["pause", "--for", value])
        assert res.exit_code == 2, (value, res.output)
        assert "Invalid value for '--for'" in res.output and why in res.output, res.output
    assert state(d)["paused"] is None, "nothing was sent"


def test_durations() -> None:
    parse = cli_pause.parse_duration
    assert parse("30m") == 1800
    assert parse("1h") == 3600
    assert parse("2h30m") == 9000
    assert parse(" 1d 2h ") == 93_600
    assert parse("1.5h") == 5400
    assert parse("90s") == 90
    assert parse("30d") == 30 * 86_400
    assert cli_pause.for_humans(9000) == "2h30m"
    assert cli_pause.for_humans(3599.4) == "1h"
    assert cli_pause.for_humans(93_600) == "1d2h"
    assert cli_pause.for_humans(20) == "1m"


def test_the_cli_limit_is_the_daemons() -> None:
    from palate.runtime.api import MAX_PAUSE_S

    assert cli_pause.MAX_PAUSE_S == MAX_PAUSE_S


def test_without_a_daemon_exit_3(home: Path) -> None:
    for args in (["pause"], ["pause", "--for", "1h"], ["resume"]):
        r = subprocess.run(
            [*PALATE, *args], env=daemon_env(home), capture_output=True, text=True, timeout=60
        )
        assert r.returncode == EXIT_CODES["unavailable"], (args, r.stderr)
        assert "palate daemon" in r.stderr
