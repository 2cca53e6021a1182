"""The `palate` command as a user runs it: real processes, real daemon, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import HH_DATA, PALATE, REPO, DaemonProc, daemon_env, missing
from palate.cli.main import EXIT_CODES, cli


def all_commands() -> list[list[str]]:
    import click

    out: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append(path)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(cli, [])
    return out


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "palate")
def test_every_command_has_help(path: list[str], home: Path) -> None:
    r = subprocess.run(
        [*PALATE, *path, "--help"], env=daemon_env(home), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout
    assert len(r.stdout.splitlines()) > 3


def test_docs_list_every_command_and_exit_code() -> None:
    doc = (REPO / "docs" / "cli.md").read_text()
    for path in all_commands():
        if path:
            assert f"palate {' '.join(path)}" in doc, f"docs/cli.md does not document {path}"
    for code, exit_code in EXIT_CODES.items():
        assert re.search(rf"\b{exit_code}\b", doc) and code in doc


def test_feedback_file_contract(palate_daemon: DaemonProc, tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "p2", "response": "r", "label": -1}),
        json.dumps(
            {"kind": "edit", "source": "ed", "prompt": "p3", "original": "o", "edited": "e"}
        ),
        "{not json",
        json.dumps({"prompt": "p4", "chosen": "same", "rejected": "same"}),
        "",
        json.dumps({"prompt": "p5", "chosen": "x", "rejected": "y", "id": "given-id"}),
    ]
    f.write_text("\n".join(lines) + "\n")
    r = palate_daemon.cli("feedback", "--file", str(f), "--source", "imp", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["accepted"], out["duplicates"], out["rejected"]) == (4, 0, 2)
    assert {x["line"] for x in out["rejections"]} == {4, 5}
    assert "rejected must differ from chosen" in out["rejections"][1]["reason"]
    again = json.loads(
        palate_daemon.cli("feedback", "--file", str(f), "--source", "imp", "--json").stdout
    )
    assert (again["accepted"], again["duplicates"]) == (0, 4), "re-import must store nothing"
    strict = palate_daemon.cli("feedback", "--file", str(f), "--source", "imp", "--strict")
    assert strict.returncode == EXIT_CODES["invalid_event"]
    assert "line 4" in strict.stderr
    st = json.loads(palate_daemon.cli("status", "--json").stdout)
    assert st["events"]["total"] == 4
    assert st["events"]["by_kind"] == {"pair": 2, "rating": 1, "edit": 1}
    assert st["events"]["by_source"] == {"imp": 3, "ed": 1}
    assert st["key_backend"] == "file"
    assert st["daemon"]["version"]


def test_feedback_hh_file(palate_daemon: DaemonProc) -> None:
    if not HH_DATA.exists():
        missing("shared data not present")
    r = palate_daemon.cli("feedback", "--file", str(HH_DATA), "--source", "hh")
    assert r.returncode == 0, r.stderr
    n = sum(1 for line in HH_DATA.open() if line.strip())
    assert f"accepted {n} " in r.stdout
    st = json.loads(palate_daemon.cli("status", "--json").stdout)
    assert st["events"]["by_source"] == {"hh": n}


def test_single_feedback_export_forget(palate_daemon: DaemonProc, tmp_path: Path) -> None:
    r = palate_daemon.cli("feedback", "--prompt", "2+2?", "--chosen", "4", "--rejected", "5")
    assert r.returncode == 0 and "stored pair" in r.stdout
    r = palate_daemon.cli("feedback", "--prompt", "hi", "--response", "hello", "--good")
    assert r.returncode == 0 and "stored rating" in r.stdout
    r = palate_daemon.cli("feedback", "--prompt", "hi", "--chosen", "x")
    assert r.returncode == 2, "a half-given pair is a usage mistake (exit 2), not an event error"
    assert "--rejected" in r.stderr
    assert palate_daemon.cli("feedback").returncode == 2
    out = tmp_path / "e.jsonl"
    r = palate_daemon.cli("export", "--out", str(out), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["count"] == 2
    assert len(out.read_text().splitlines()) == 2
    r = palate_daemon.cli("export", "--out", str(out))
    assert r.returncode == EXIT_CODES["conflict"] and "exists" in r.stderr
    assert palate_daemon.cli("forget", "--all").returncode != 0  # needs --yes when scripted
    r = palate_daemon.cli("forget", "--all", "--yes", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"deleted": 2}


def test_no_daemon_exit_code(home: Path) -> None:
    r = subprocess.run(
        [*PALATE, "status"], env=daemon_env(home), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == EXIT_CODES["unavailable"]
    assert "palate daemon" in r.stderr
    assert "Traceback" not in r.stderr


def test_key_commands(palate_daemon: DaemonProc) -> None:
    st = json.loads(palate_daemon.cli("key", "status", "--json").stdout)
    assert st["backend"] == "file" and st["has_recovery"] is False and st["warning"]
    assert st["recovery"] == "none"
    r = palate_daemon.cli("key", "recovery-export", "--json")
    assert r.returncode == 0
    kit = json.loads(r.stdout)["kit"]
    assert kit.startswith("PLTK-")
    assert kit not in (palate_daemon.paths.log_dir / "daemon.log").read_text()
    assert json.loads(palate_daemon.cli("key", "status", "--json").stdout)["recovery"] == (
        "unconfirmed"
    )
    r = palate_daemon.cli("key", "rotate", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["backend"] == "file"
    palate_daemon.cli("feedback", "--prompt", "p", "--chosen", "a", "--rejected", "b", check=True)
    palate_daemon.terminate()
    # Lose the key-encryption key: the daemon refuses, recovery restores access.
    for kek in palate_daemon.paths.data_dir.glob("*.kek"):
        kek.unlink()
    r = palate_daemon.cli("daemon")
    assert r.returncode == EXIT_CODES["key_error"] and "recover" in r.stderr
    argv = palate_daemon.cli("key", "recover", "--code", kit)
    assert argv.returncode == 2 and "standard input" in argv.stderr, "never a secret in argv"
    bad = palate_daemon.cli("key", "recover", input="PLTK-" + "A" * 72)
    assert bad.returncode == EXIT_CODES["key_error"]
    r = palate_daemon.cli("key", "recover", input=json.dumps({"kit": kit}))
    assert r.returncode == 0, r.stderr
    palate_daemon.start()
    st = json.loads(palate_daemon.cli("status", "--json").stdout)
    assert st["events"]["total"] == 1
    assert st["key"]["recovery"] == "confirmed"


def test_doctor_reports_each_check(palate_daemon: DaemonProc) -> None:
    r = palate_daemon.cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert {"versions", "permissions", "key", "daemon"} <= set(checks)
    assert checks["daemon"]["status"] == "ok"
    # No recovery kit yet: a lock-out waiting to happen, so a failure (exit 1), not a warning.
    assert checks["key"]["status"] == "fail" and "recovery-export" in checks["key"]["fix"]
    assert r.returncode == 1
    human = palate_daemon.cli("doctor")
    assert "[FAIL] key" in human.stdout
