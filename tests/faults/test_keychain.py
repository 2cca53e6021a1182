"""The keychain holding the key-encryption key is unreachable, or locked, when the daemon
starts; then the recovery key brings the data back.

Runs against a real Secret Service (gnome-keyring on a private D-Bus session, the
``secret_service`` fixture). "Unreachable" points ``DBUS_SESSION_BUS_ADDRESS`` at a socket
that does not exist, as on a headless login; "locked" locks the collection over D-Bus (no
prompt can be shown, so unlocking fails, as over SSH).

Each time: ``palate daemon`` exits 5 with a message that says what is wrong and names
``palate key recover``; ``palate status`` exits 3; ``key.json``, the KEK entries and the
database are byte-for-byte as before (no new key over existing data). Once the keychain is
back, every event is there; with it gone for good -- and ``key.json`` with it -- ``palate key
recover`` and the recovery kit alone (read from standard input) restore access, into the file
backend.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PALATE, DaemonProc, daemon_env

from .helpers import NO_SCHEDULE, fingerprint, rating, run_daemon_once

pytestmark = pytest.mark.keyring

KEYRING_ENV = ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "HOME", "XDG_DATA_HOME")
PASSWORD = "palate-test-password"  # what conftest unlocks the login keyring with

_SECRETS = """
import sys, secretstorage
from secretstorage.util import DBusAddressWrapper, format_secret, open_session
bus = secretstorage.dbus_init()
col = secretstorage.get_default_collection(bus)
if sys.argv[1] == "lock":
    col.lock()
elif sys.argv[1] == "unlock":
    # gnome-keyring's own call: unlock with the password, no prompt
    session = open_session(bus)
    secret = format_secret(session, sys.argv[2].encode(), "text/plain")
    DBusAddressWrapper(
        "/org/freedesktop/secrets",
        "org.gnome.keyring.InternalUnsupportedGuiltRiddenInterface",
        bus,
    ).call("UnlockWithMasterPassword", "o(oayays)", col.collection_path, secret)
print("locked" if col.is_locked() else "unlocked")
if not col.is_locked():
    print(len(list(col.search_items({"service": "palate"}))))
"""


def secrets(env: dict[str, str], *args: str) -> list[str]:
    """Lock/unlock the login collection; its state and the number of palate entries."""
    r = subprocess.run(
        [sys.executable, "-c", _SECRETS, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.fixture
def keyring_env(secret_service: dict[str, str]) -> Iterator[dict[str, str]]:
    env = {k: secret_service[k] for k in KEYRING_ENV if k in secret_service}
    yield env
    if secrets({**secret_service}, "state")[0] == "locked":  # never leave it locked
        assert secrets({**secret_service}, "unlock", PASSWORD)[0] == "unlocked"


def cli(
    env: dict[str, str], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PALATE, *args], env=env, capture_output=True, text=True, timeout=60, input=input
    )


def test_keychain_unreachable_or_locked_at_start_then_recovery(
    home: Path, keyring_env: dict[str, str]
) -> None:
    (home / "config.toml").write_text(NO_SCHEDULE)
    env = daemon_env(home, PALATE_KEY_BACKEND="keyring", **keyring_env)
    d = DaemonProc(home, env).start()
    ids = [f"k{i}" for i in range(200)]
    with d.client() as c:
        c.ingest_batch([rating(i) for i in ids])
        assert c.status()["key"]["backend"] == "keyring"
    r = cli(env, "key", "recovery-export", "--json")
    assert r.returncode == 0, r.stderr
    code = json.loads(r.stdout)["kit"]
    assert code.startswith("PLTK-")
    assert d.terminate() == 0
    data = d.paths.data_dir
    before = fingerprint(data)
    assert not any(name.endswith(".kek") for name in before), "the KEK must be in the keychain"
    entries = secrets(env, "state")
    assert entries[0] == "unlocked"

    def refused(run_env: dict[str, str], says: str) -> str:
        r = run_daemon_once(run_env)
        assert r.returncode == 5, (r.returncode, r.stderr)
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("palate: error:") and says in line, line
        assert "palate key recover" in line, line
        assert "Traceback" not in r.stderr
        assert fingerprint(data) == before, "a file in the data directory changed"
        assert not d.paths.socket.exists()
        return line

    # 1. No Secret Service reachable at all.
    gone = {**env, "DBUS_SESSION_BUS_ADDRESS": f"unix:path={home}/no-such-bus"}
    unreachable = refused(gone, "keychain")
    st = cli(gone, "status")
    assert st.returncode == 3 and "not running" in st.stderr, st.stderr
    # 2. The collection is locked and nothing can prompt for its password.
    assert secrets(env, "lock") == ["locked"]
    locked = refused(env, "unlock")
    assert secrets(env, "unlock", PASSWORD)[0] == "unlocked"
    assert secrets(env, "state") == entries, "no keychain entry may be added or removed"

    # 3. Keychain back: everything is there.
    d = DaemonProc(home, env).start()
    with d.client() as c:
        assert c.status()["events"]["total"] == len(ids)
    assert d.terminate() == 0

    # 4. Keychain gone for good, and key.json lost too: the kit alone, into the file backend
    #    (a wrong one is tests/test_keys.py's business).
    d.paths.key_file.unlink()
    ok = cli(gone, "key", "recover", "--backend", "file", input=code)
    assert ok.returncode == 0, ok.stderr
    file_env = {**gone, "PALATE_KEY_BACKEND": "file"}
    d = DaemonProc(home, file_env).start()
    with d.client() as c:
        st = c.status()
        assert st["events"]["total"] == len(ids) and st["key"]["backend"] == "file"
        export = home / "after-recovery.jsonl"
        assert c.export(export) == len(ids)
    assert sorted(json.loads(line)["id"] for line in export.open()) == sorted(ids)
    assert d.terminate() == 0
    print(f"unreachable: {unreachable!r}; locked: {locked!r}")
