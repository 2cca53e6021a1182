"""The first hour as a new user lives it (issue 20), through the real daemon and real processes:
status that tells, errors that point at the mistake, usage mistakes exiting 2, no dead ends.

The daemon here has never trained (training runs are in tests/test_first_hour.py, with a tiny
model); everything a fresh install shows before its first model is checked here.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from conftest import PALATE, REPO, DaemonProc, daemon_env, module_daemon
from palate.cli import service as cli_service
from palate.cli.main import EXIT_CODES, cli
from palate.service.manager import ServiceContext, manager_for, subprocess_runner


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProc]:
    with module_daemon("pf-") as daemon:
        yield daemon


def usage_error(r: Any, *needles: str) -> None:
    """Exit 2 with click's usage message (``Usage:`` line, ``Error:`` line), no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Usage: palate" in r.stderr and "Error:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


# --- item 6: JSONL errors point at the right column and name the missing field -----------


def test_jsonl_errors_name_the_column_and_the_missing_field(d: DaemonProc, tmp_path: Path) -> None:
    truncated = '{"prompt": "2+2?", "chosen": "4", "rejected"'
    f = tmp_path / "cut.jsonl"
    f.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
        + "\n"
        + truncated
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "only this"})
        + "\n"
        + json.dumps({"prompt": "q", "response": "r"})
        + "\n"
        + json.dumps({"text": "what is this"})
        + "\n"
    )
    r = d.cli("feedback", "--file", str(f), "--json")
    assert r.returncode == 0, r.stderr
    why = {x["line"]: x["reason"] for x in json.loads(r.stdout)["rejections"]}
    # the error is at the end of the line (column len + 1), not column 1 of the next one
    assert f"at column {len(truncated) + 1}" in why[2] and "cut short" in why[2]
    assert why[3] == "rejected is missing: a pair needs prompt, chosen, rejected"
    assert "label give exactly one of label" in why[4]
    assert why[5].startswith("kind is missing; give {prompt, chosen, rejected} (a pair)")


# --- item 7: one rule for usage mistakes -------------------------------------------------


def test_usage_mistakes_exit_2_with_clicks_message(d: DaemonProc, tmp_path: Path) -> None:
    before = json.loads(d.cli("status", "--json").stdout)["events"]["total"]
    usage_error(d.cli("feedback", "--prompt", "x", "--chosen", "a"), "missing --rejected")
    usage_error(d.cli("feedback", "--prompt", "x", "--good"), "--response")
    usage_error(
        d.cli("feedback", "--prompt", "x", "--chosen", "a", "--rejected", "a"),
        "--rejected must differ from --chosen",
    )
    cands = tmp_path / "c.txt"
    cands.write_text("one\ntwo\n")
    usage_error(d.cli("rerank", "p", "--candidates", str(cands), "--top-k", "0"), "--top-k")
    # a missing file reads the same in feedback and rerank: click's message, no [Errno 2]
    nope = tmp_path / "nope.jsonl"
    for args, opt in (
        (["feedback", "--file", str(nope)], "--file"),
        (["rerank", "p", "--candidates", str(nope)], "--candidates"),
    ):
        r = d.cli(*args)
        usage_error(r, f"Invalid value for '{opt}'", "does not exist")
        assert "Errno" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"fine"\n{oops\n')
    usage_error(d.cli("rerank", "p", "--candidates", str(bad)), "bad.jsonl:2: not valid JSON")
    after = json.loads(d.cli("status", "--json").stdout)["events"]["total"]
    assert after == before, "a usage mistake stores nothing"


# --- item 8: one empty-prompt rule; no runner-up claim for one candidate --------------------


@pytest.mark.parametrize(
    "args",
    [
        ["feedback", "--prompt", "", "--chosen", "a", "--rejected", "b"],
        ["feedback", "--prompt", "  ", "--response", "r", "--good"],
        ["rerank", "", "--candidates", "CANDS"],
        ["score", " ", "a response"],
    ],
    ids=["feedback-pair", "feedback-rating", "rerank", "score"],
)
def test_an_empty_prompt_is_one_usage_mistake_everywhere(
    d: DaemonProc, tmp_path: Path, args: list[str]
) -> None:
    cands = tmp_path / "c.txt"
    cands.write_text("one\n")
    r = d.cli(*[str(cands) if a == "CANDS" else a for a in args])
    usage_error(r, "must not be empty or blank")


# --- item 9 -------------------------------------------------------------------------------


def test_export_to_an_existing_file_names_the_overwrite_option(
    d: DaemonProc, tmp_path: Path
) -> None:
    out = tmp_path / "e.jsonl"
    out.write_text("")
    r = d.cli("export", "--out", str(out))
    assert r.returncode == EXIT_CODES["conflict"]
    assert "pass --overwrite to replace it" in r.stderr
    assert d.cli("export", "--out", str(out), "--overwrite").returncode == 0


# --- item 1 (no model trained yet) and item 2 (status text) ------------------------------


def test_rerank_and_score_before_any_model_say_what_to_do(d: DaemonProc, tmp_path: Path) -> None:
    cands = tmp_path / "c.txt"
    cands.write_text("one\ntwo\n")
    for args in (["rerank", "haiku", "--candidates", str(cands)], ["score", "p", "a", "b"]):
        r = d.cli(*args)
        assert r.returncode == EXIT_CODES["no_model"], r.stderr
        assert "no model has been trained" in r.stderr
        assert "`palate train --wait`" in r.stderr and "35 min" in r.stderr
        assert "gate" in r.stderr


def test_status_text_shows_model_training_schedule_and_adapters(d: DaemonProc) -> None:
    r = d.cli("status")
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert lines["model"].split(None, 1)[1] == "none yet: no model has been trained"
    assert lines["training"].split(None, 1)[1] == "no run yet"
    # a fresh home: the first scheduled run is the next 03:00, not a catch-up today
    st = json.loads(d.cli("status", "--json").stdout)["schedule"]
    first = time.strftime("%Y-%m-%d %H:%M", time.localtime(st["next_run"]))
    assert st["first_run"] and st["next_run"] > time.time() + 60
    assert lines["schedule"].startswith(f"schedule first run {first} (in ")
    assert "nightly at 03:00" in lines["schedule"]
    assert "min_new_events" in lines["schedule"], "says the run waits for feedback"
    assert lines["adapters"].startswith("adapters none running")
    sched = d.cli("schedule")
    assert re.search(rf"^first run +{first} \(in ", sched.stdout, re.M), sched.stdout
    log = (d.paths.log_dir / "daemon.log").read_text()
    assert re.search(r"first scheduled training run: \S+T03:00", log), log[-2000:]


# --- item 10: docs list every command that needs the daemon; service status exit codes --


def _leaf_commands() -> Iterator[tuple[str, click.Command]]:
    def walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[str, click.Command]]:
        if isinstance(cmd, click.Group):
            if cmd.invoke_without_command:
                yield " ".join(path), cmd
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    yield from walk(cli, [])


def test_docs_list_every_command_that_talks_to_the_daemon() -> None:
    doc = (REPO / "docs" / "cli.md").read_text()
    para = doc.split("Commands that need the running daemon", 1)[1].split("The `key` commands")[0]
    listed = set(re.findall(r"`([a-z][a-z -]*)`", para))
    for path, cmd in _leaf_commands():
        fn = inspect.unwrap(cmd.callback) if cmd.callback else None
        src = inspect.getsource(fn) if fn else ""
        if re.search(r"(?<![\w.])Client\(|_in_daemon\(", src):  # palate.wire.client.Client
            assert path in listed, f"docs/cli.md does not say that `palate {path}` uses the daemon"


def test_every_listed_daemon_command_exits_3_without_it(home: Path) -> None:
    """What docs/cli.md lists as needing the daemon does fail with 3 when none runs."""
    for args in (["models"], ["rerank", "p", "--candidates", __file__], ["score", "p", "r"]):
        r = __import__("subprocess").run(
            [*PALATE, *args], env=daemon_env(home), capture_output=True, text=True, timeout=60
        )
        assert r.returncode == EXIT_CODES["unavailable"], (args, r.stderr)
        assert "palate daemon" in r.stderr


FAKE_SYSTEMCTL = """#!/bin/sh
case "$*" in
  *show*) printf 'LoadState=loaded\\nActiveState=%s\\nSubState=running\\nMainPID=4242\\n\
UnitFileState=enabled\\n' "$PALATE_FAKE_STATE" ;;
esac
exit 0
"""


def test_service_status_exit_codes_are_the_documented_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (REPO / "docs" / "cli.md").read_text()
    row = next(ln for ln in doc.splitlines() if ln.startswith("| `palate service status"))
    assert "Exit 0" in row and "3" in row and "unknown" in row
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PALATE_HOME", str(tmp_path / "ph"))
    runner = CliRunner()

    def with_path(path: str, platform: str = "linux") -> Any:
        monkeypatch.setenv("PATH", path)
        monkeypatch.setattr(
            cli_service,
            "make_manager",
            lambda: manager_for(ServiceContext.detect(platform=platform, runner=subprocess_runner)),
        )
        return runner.invoke(cli_service.service, ["status", "--json"])

    monkeypatch.setenv("PALATE_FAKE_STATE", "active")
    running = with_path(f"{bin_dir}:/usr/bin:/bin")
    assert running.exit_code == 0, running.output
    monkeypatch.setenv("PALATE_FAKE_STATE", "inactive")
    stopped = with_path(f"{bin_dir}:/usr/bin:/bin")
    assert stopped.exit_code == 3 and json.loads(stopped.output)["state"] != "running"
    unknown = with_path(str(tmp_path / "empty"))  # no systemctl: the manager cannot be asked
    assert unknown.exit_code == 3 and json.loads(unknown.output)["state"] == "unknown"
    other = with_path(f"{bin_dir}:/usr/bin:/bin", platform="plan9")
    assert other.exit_code == EXIT_CODES["unavailable"] and "no service integration" in (
        other.output
    )
