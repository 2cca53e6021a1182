"""No lock-out by default (issue 14 item 1): the recovery kit, end to end.

* A new home has no kit, and everything says so: ``status --json`` (``key.recovery`` is
  ``none``), the ``status`` text, the daemon log at start, and ``doctor`` (a failure, exit 1).
* ``make run`` in a terminal (``palate daemon`` on a tty) and ``palate service install`` walk
  the user through making one: the kit is shown on the terminal only, typed back to confirm,
  and never written to a log.
* The kit alone restores access: with the keychain entry *and* key.json gone, ``palate key
  recover`` reads the kit from standard input (``recovery-export --json`` prints
  ``{"kit": ...}``, and that string is what it reads) and every event is back.
* doctor's advice for a broken macOS keychain checks for a confirmed kit before it suggests
  anything that would destroy the keychain entry.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import PALATE, DaemonProc, daemon_env, wait_for
from palate.service.checks_data import classify_keychain

pytestmark = pytest.mark.slow


def test_no_kit_is_said_everywhere_and_the_kit_alone_restores(palate_daemon: DaemonProc) -> None:
    d = palate_daemon
    with d.client() as c:
        c.ingest_batch(
            [
                {"kind": "pair", "source": "k", "prompt": f"p{i}", "chosen": "a", "rejected": "b"}
                for i in range(25)
            ]
        )
    st = json.loads(d.cli("status", "--json").stdout)
    assert st["key"]["recovery"] == "none"
    text = d.cli("status")
    assert re.search(r"^recovery +NONE", text.stdout, re.M), text.stdout
    log = (d.paths.log_dir / "daemon.log").read_text()
    assert "no recovery kit exists" in log
    doc = d.cli("doctor", "--json")
    key = {c["name"]: c for c in json.loads(doc.stdout)}["key"]
    assert doc.returncode == 1 and key["status"] == "fail" and "recovery kit" in key["detail"]

    r = d.cli("key", "recovery-export", "--json")
    assert r.returncode == 0, r.stderr
    kit = json.loads(r.stdout)["kit"]
    assert json.loads(d.cli("status", "--json").stdout)["key"]["recovery"] == "unconfirmed"
    assert d.cli("key", "recovery-confirm", input=kit[:-1] + "?").returncode != 0
    assert d.cli("key", "recovery-confirm", input=kit).returncode == 0
    assert json.loads(d.cli("status", "--json").stdout)["key"]["recovery"] == "confirmed"
    assert d.terminate() == 0

    # Lose everything but the database: key.json and the KEK.
    for p in d.paths.data_dir.iterdir():
        if p.name not in ("palate.db", "palate.db-wal", "palate.db-shm"):
            p.unlink()
    refused = d.cli("daemon")
    assert refused.returncode == 5 and "palate key recover" in refused.stderr
    r = d.cli("key", "recover", input=json.dumps({"kit": kit}) + "\n")
    assert r.returncode == 0, r.stderr
    d.start()
    with d.client() as c:
        st = c.status()
    assert st["events"]["total"] == 25 and st["key"]["recovery"] == "confirmed"
    logs = "".join(p.read_text() for p in d.paths.log_dir.rglob("*") if p.is_file())
    assert kit not in logs and kit not in d.log.read_text()


# --- interactive set-up ------------------------------------------------------------------


class Tty:
    """A command on a pseudo-terminal (its controlling terminal), read and typed into."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child
            os.execvpe(argv[0], argv, env)
        self.pid, self.fd = pid, fd
        self.out = b""

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out.decode("utf-8", "replace"))
            if m:
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in: {self.out.decode('utf-8', 'replace')[-2000:]}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"closed; no {pattern!r} in {self.out.decode()[-2000:]}"
                self.out += chunk

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def stop(self) -> int:
        os.kill(self.pid, signal.SIGTERM)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_make_run_in_a_terminal_walks_through_the_kit(home: Path) -> None:
    env = daemon_env(home)
    env.pop("PALATE_NO_SETUP", None)
    t = Tty([*PALATE, "daemon"], env)
    try:
        t.expect(r"Create your recovery kit now\?")
        t.send("y\r")
        kit = t.expect(r"PLTK(-[A-Z2-7]{1,4}){18}").group(0)
        t.expect(r"Paste it back")
        t.send(kit[:-2] + "\r")  # a typo: asked again
        # Wait for the second prompt: hidden input flushes what was typed before it (TCSAFLUSH)
        t.expect(r"does not match[\s\S]*Paste it back")
        t.send(kit + "\r")
        t.expect(r"Recovery kit confirmed")
        t.expect(r"ready on")
        d = DaemonProc(home, env)
        with d.client() as c:
            assert c.status()["key"]["recovery"] == "confirmed"
    finally:
        rc = t.stop()
    assert rc == 0
    log = (home / "logs" / "daemon.log").read_text()
    assert kit not in log and "no recovery kit exists" not in log


def test_skipping_the_walkthrough_leaves_the_warnings(home: Path) -> None:
    env = daemon_env(home)
    t = Tty([*PALATE, "daemon"], env)
    try:
        t.expect(r"Create your recovery kit now\?")
        t.send("n\r")
        t.expect(r"ready on")
        wait_for(
            lambda: "no recovery kit exists" in (home / "logs" / "daemon.log").read_text(),
            10,
            "the daemon log says there is no kit",
        )
    finally:
        rc = t.stop()
    assert rc == 0


def test_service_install_walks_through_the_kit_first(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from palate.cli import keys as cli_keys
    from palate.cli import service as cli_service
    from palate.paths import resolve
    from palate.store.keys import KeyManager

    monkeypatch.setenv("PALATE_HOME", str(home))
    monkeypatch.setenv("PALATE_KEY_BACKEND", "file")
    monkeypatch.setattr(cli_keys, "interactive", lambda: True)
    seen: list[str] = []

    class Report:
        def to_dict(self) -> dict[str, Any]:
            return {"content": None, "written": True, "file": "x", "commands": [], "notes": []}

    class Manager:
        def install(self) -> Report:
            seen.append(KeyManager(resolve(home)).status().recovery)  # the daemon starts now
            return Report()

    monkeypatch.setattr(cli_service, "make_manager", Manager)
    captured: dict[str, str] = {}

    def prompt(text: str, **kw: Any) -> str:
        return captured["kit"]

    orig_echo = cli_keys.click.echo

    def echo(message: Any = None, **kw: Any) -> None:
        m = re.search(r"PLTK(-[A-Z2-7]{1,4}){18}", str(message or ""))
        if m:
            captured["kit"] = m.group(0)
        orig_echo(message, **kw)

    monkeypatch.setattr(cli_keys.click, "prompt", prompt)
    monkeypatch.setattr(cli_keys.click, "echo", echo)
    r = CliRunner().invoke(cli_service.service, ["install"], input="y\n")
    assert r.exit_code == 0, r.output
    assert seen == ["confirmed"], "the kit is made and confirmed before the daemon starts"


# --- doctor's keychain advice ------------------------------------------------------------


def test_keychain_advice_never_destroys_the_only_key() -> None:
    mismatch = "SecKeychainUnlock: The user name or passphrase you entered is not correct. (-25293)"
    missing = "security: SecKeychainCopyDefault: The specified keychain could not be found."
    for recovery in ("none", "unconfirmed"):
        c = classify_keychain(mismatch, 1, recovery)
        assert c.status == "fail" and "do NOT reset" in c.fix, c.fix
        m = classify_keychain(missing, 1, recovery)
        assert "rotate --backend file" not in m.fix and "backup" in m.fix, m.fix
    c = classify_keychain(mismatch, 1, "confirmed")
    assert "palate key recover" in c.fix and "do NOT" not in c.fix
    m = classify_keychain(missing, 1, "confirmed")
    assert "palate key recover" in m.fix
