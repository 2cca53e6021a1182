"""One contract every adapter passes: real daemon, real adapter process, real fixture files.

Parametrized over every adapter Palate itself registers in the entry-point group
(third-party discovery is off), so a new built-in adapter cannot ship without a
scenario here. The contract:

* idempotent restart: a second run over the same files stores nothing new;
* no loss across a crash between read and commit: the process is killed -9
  after parsing, just before its first commit; the next run stores everything;
* bad lines are reported (status channel) and skipped, good ones still stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter_harness import AdapterProc, exported, scenario, total, wait_total, write_config
from conftest import DaemonProc
from palate.adapters import entry_points

os.environ["PALATE_THIRD_PARTY_ADAPTERS"] = "0"
BUILTIN = sorted(entry_points(third_party=False))


def test_every_builtin_is_covered() -> None:
    assert BUILTIN == ["continue", "jsonl", "tabby", "voice"]


@pytest.mark.parametrize("name", BUILTIN)
def test_restart_is_idempotent_and_bad_lines_are_skipped(
    name: str, palate_daemon: DaemonProc, tmp_path: Path
) -> None:
    opts, expected, bad = scenario(name, tmp_path)
    write_config(palate_daemon.home, {name: opts})
    sock = palate_daemon.paths.socket

    first = AdapterProc(name, palate_daemon.home)
    first.wait_for("scan")
    wait_total(sock, expected)
    assert len(first.wait_for("bad", bad)) == bad
    assert first.stop() == 0
    ids = sorted(e["id"] for e in exported(sock, tmp_path / "a.jsonl"))
    assert len(ids) == len(set(ids)) == expected
    with palate_daemon.client() as c:
        assert c.cursors(name), "cursors are committed with the events"

    second = AdapterProc(name, palate_daemon.home)
    second.wait_for("scan", 2)  # two full reconcile passes over every file
    assert second.stop() == 0
    assert total(sock) == expected
    assert not [m for m in second.seen if m["type"] == "emitted" and m["accepted"] > 0]
    assert not [m for m in first.seen + second.seen if m["type"] == "garbage"]


@pytest.mark.parametrize("name", BUILTIN)
def test_no_loss_when_killed_between_read_and_commit(
    name: str, palate_daemon: DaemonProc, tmp_path: Path
) -> None:
    opts, expected, _ = scenario(name, tmp_path)
    write_config(palate_daemon.home, {name: opts})
    sock = palate_daemon.paths.socket

    doomed = AdapterProc(name, palate_daemon.home, PALATE_ADAPTER_FAULT="kill_before_commit:1")
    assert doomed.wait() == -9  # SIGKILL after reading and parsing, before the commit
    assert total(sock) == 0
    with palate_daemon.client() as c:
        assert c.cursors(name) == {}

    survivor = AdapterProc(name, palate_daemon.home)
    wait_total(sock, expected)
    survivor.wait_for("scan", 2)
    assert survivor.stop() == 0
    ids = [e["id"] for e in exported(sock, tmp_path / "b.jsonl")]
    assert len(ids) == len(set(ids)) == expected
