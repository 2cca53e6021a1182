"""Key contract tests, run against every KEK backend: the file fallback and the real
Secret Service (gnome-keyring on a private D-Bus session). Backend *selection* (``auto``)
is tested without forcing a backend: a plaintext keyring must not count as a keychain."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import keyring
import keyring.backend
import pytest
from keyring.backends import chainer, fail

from palate.errors import PalateError
from palate.events import validate_event
from palate.paths import Paths, resolve
from palate.store import keys as keys_module
from palate.store.database import IngestGroup, Store, check_key, reencrypt
from palate.store.keys import (
    RETIRE_AFTER_S,
    FileBackend,
    KeyManager,
    KeyringBackend,
    decode_kit,
    decode_recovery,
    encode_kit,
    encode_recovery,
    keyring_available,
    write_private,
)


@pytest.fixture(params=["file", "keyring"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    previous = keyring.get_keyring()
    if request.param == "keyring":
        env = request.getfixturevalue("secret_service")
        for k in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR"):
            monkeypatch.setenv(k, env[k])
        from keyring.backends.SecretService import Keyring as SecretServiceKeyring

        keyring.set_keyring(SecretServiceKeyring())
    yield str(request.param)
    keyring.set_keyring(previous)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = resolve(tmp_path / "home")
    p.ensure()
    return p


def kek_store(km: KeyManager, name: str) -> FileBackend | KeyringBackend:
    return KeyringBackend() if name == "keyring" else FileBackend(km.paths.data_dir)


def doc(paths: Paths) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(paths.key_file.read_text())
    return data


def verify(paths: Paths) -> Any:
    return lambda dek: check_key(paths.db_file, dek)


def with_events(paths: Paths, dek: bytes | bytearray, n: int = 20) -> None:
    s = Store(paths.db_file, dek)
    s.ingest(
        [
            IngestGroup(
                [
                    validate_event(
                        {"kind": "pair", "source": "k", "prompt": f"p{i}", "chosen": "a"}
                        | {"rejected": "b"}
                    )
                    for i in range(n)
                ]
            )
        ]
    )
    s.close()


def events(paths: Paths, dek: bytes | bytearray) -> int:
    s = Store(paths.db_file, dek)
    try:
        return int(s.counts()["total"])
    finally:
        s.close()


def test_create_unwrap_and_file_modes(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    dek = bytes(km.create())
    assert len(dek) == 32
    assert bytes(km.unwrap()) == dek
    assert paths.key_file.stat().st_mode & 0o777 == 0o600
    assert dek.hex() not in paths.key_file.read_text()
    assert km.status().backend == backend
    assert (km.status().warning is not None) == (backend == "file")
    if backend == "file":
        (kek_file,) = paths.data_dir.glob("*.kek")
        assert kek_file.stat().st_mode & 0o777 == 0o600
    else:
        assert not list(paths.data_dir.glob("*.kek")), "keyring backend must not write a KEK file"


def test_rotate_rewraps_and_deletes_the_old_kek_only_later(paths: Paths, backend: str) -> None:
    """Item 10: rotate used to delete the old KEK at once, so a key.json that a crash or
    power loss (fsync without F_FULLFSYNC on macOS) rolled back had no KEK any more."""
    km = KeyManager(paths, backend)
    dek = bytes(km.create())
    old = doc(paths)
    km.rotate()
    new_ref = str(doc(paths)["ref"])
    assert new_ref != old["ref"]
    assert bytes(km.unwrap()) == dek
    store = kek_store(km, backend)
    assert store.get(new_ref) is not None
    assert store.get(str(old["ref"])) is not None, "the old KEK must survive the grace period"
    # The rolled-back key.json still opens.
    rolled = paths.data_dir / "old-key.json"
    rolled.write_text(json.dumps(old))
    assert bytes(KeyManager(resolve(paths.home), backend)._unwrap_doc(old)) == dek
    assert km.purge_retired(now=doc(paths)["retired"][0]["after"] - 1) == 0
    assert km.purge_retired(now=doc(paths)["retired"][0]["after"] + RETIRE_AFTER_S) == 1
    assert store.get(str(old["ref"])) is None
    assert doc(paths)["retired"] == []
    assert bytes(km.unwrap()) == dek


def test_recovery_kit_alone_restores_access(paths: Paths, backend: str) -> None:
    """Item 1: the kit and the database are enough; key.json and the KEK are both gone."""
    km = KeyManager(paths, backend)
    dek = km.create()
    with_events(paths, dek)
    assert km.status().recovery == "none" and not km.status().has_recovery
    kit = km.export_kit()
    assert kit.startswith("PLTK-")
    assert km.status().recovery == "unconfirmed"
    assert km.export_kit() == kit, "one data key has one kit"
    kek_store(km, backend).delete(str(doc(paths)["ref"]))
    paths.key_file.unlink()
    assert sorted(p.name for p in paths.data_dir.iterdir()) == ["palate.db"]
    st = KeyManager(paths, backend).recover(kit, verify(paths))
    assert st.recovery == "confirmed", "a kit that was used is a kit that works"
    assert bytes(km.unwrap()) == bytes(dek)
    assert events(paths, km.unwrap()) == 20
    # A kit of other data is refused and changes nothing.
    before = paths.key_file.read_bytes()
    other = encode_kit(secrets.token_hex(8), secrets.token_bytes(32))
    with pytest.raises(PalateError, match="does not open"):
        km.recover(other, verify(paths))
    assert paths.key_file.read_bytes() == before


def test_recovery_kit_over_a_corrupt_key_file(paths: Paths) -> None:
    km = KeyManager(paths, "file")
    with_events(paths, km.create())
    kit = km.export_kit()
    paths.key_file.write_text("{broken")
    km.recover(kit, verify(paths))
    assert events(paths, km.unwrap()) == 20
    assert list(paths.data_dir.glob("key.json.replaced-*")), "the broken file is kept aside"


def test_recovery_states_and_confirmation(paths: Paths) -> None:
    km = KeyManager(paths, "file")
    km.create()
    assert km.status().recovery == "none"
    kit = km.export_kit()
    assert km.status().recovery == "unconfirmed"
    key_id, _ = decode_kit(kit)
    wrong = encode_kit(key_id, secrets.token_bytes(32))
    with pytest.raises(PalateError, match="not the recovery kit"):
        km.confirm_kit(wrong)
    typo = kit[:10] + ("A" if kit[10] != "A" else "B") + kit[11:]
    with pytest.raises(PalateError, match="mistyped"):
        km.confirm_kit(typo)
    assert km.status().recovery == "unconfirmed"
    assert km.confirm_kit(kit.lower().replace("-", " ")).recovery == "confirmed"
    km.rotate()
    assert km.status().recovery == "confirmed", "re-wrapping keeps the data key, so the kit"


def test_legacy_recovery_key_still_works(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    dek = km.create()
    Store(paths.db_file, dek).close()
    first = km.export_recovery()
    code = km.export_recovery()
    assert first != code
    kek_store(km, backend).delete(str(doc(paths)["ref"]))
    with pytest.raises(PalateError) as ei:
        km.unwrap()
    assert ei.value.code == "key_error" and "recover" in ei.value.message
    with pytest.raises(PalateError, match="does not match"):
        km.recover(first, verify(paths))
    with pytest.raises(PalateError):
        km.recover("PLT1-AAAA", verify(paths))
    km.recover(code, verify(paths))
    assert bytes(km.unwrap()) == bytes(dek)
    assert km.status().recovery == "none", "a PLT1 key needs key.json: it is not a kit"


def test_tampered_key_file_is_detected_and_left_alone(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    km.create()
    d = doc(paths)
    wrapped = dict(d["wrapped"])
    ct = bytearray(base64.b64decode(wrapped["ct"]))
    ct[0] ^= 1
    wrapped["ct"] = base64.b64encode(bytes(ct)).decode()
    d["wrapped"] = wrapped
    paths.key_file.write_text(json.dumps(d))
    before = paths.key_file.read_bytes()
    with pytest.raises(PalateError) as ei:
        km.unwrap()
    assert ei.value.code == "key_error"
    assert paths.key_file.read_bytes() == before
    paths.key_file.write_text("{not json")
    with pytest.raises(PalateError, match="corrupted"):
        km.unwrap()


def test_never_creates_a_key_over_existing_data(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    km.create()
    with pytest.raises(PalateError, match="refusing"):
        km.create()
    paths.key_file.unlink()
    paths.db_file.write_bytes(b"\x00" * 4096)
    with pytest.raises(PalateError, match="refusing"):
        km.create()


def test_keyring_unavailable_is_a_clear_error(
    paths: Paths, secret_service: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(k, secret_service[k])
    previous = keyring.get_keyring()
    from keyring.backends.SecretService import Keyring as SecretServiceKeyring

    keyring.set_keyring(SecretServiceKeyring())
    try:
        km = KeyManager(paths, "keyring")
        km.create()
        keyring.set_keyring(fail.Keyring())
        with pytest.raises(PalateError) as ei:
            km.unwrap()
        assert ei.value.code == "key_error" and "unavailable" in ei.value.message
        assert paths.key_file.exists()
    finally:
        keyring.set_keyring(previous)


def test_recovery_code_formats() -> None:
    secret = secrets.token_bytes(32)
    code = encode_recovery(secret)
    assert code.startswith("PLT1-")
    assert decode_recovery(code) == secret
    assert decode_recovery(code.lower().replace("-", " ")) == secret
    with pytest.raises(PalateError):
        decode_recovery("XYZ-1234")
    key_id = secrets.token_hex(8)
    kit = encode_kit(key_id, secret)
    assert kit.startswith("PLTK-") and len(kit.split("-")) == 19
    got_id, got = decode_kit(" ".join(kit.lower().split("-")))
    assert got_id == key_id and bytes(got) == secret
    with pytest.raises(PalateError, match="incomplete"):
        decode_kit(kit[:-5])


# --- backend selection (item 3; item 11: nothing here forces the backend) -----------------


class PlaintextKeyring(keyring.backend.KeyringBackend):
    """What keyrings.alt's PlaintextKeyring is: a keyring that stores secrets as they are."""

    priority = 1  # type: ignore[assignment]
    store: ClassVar[dict[tuple[str, str], str]] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.store.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.store[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.store.pop((service, username), None)


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Backend choice left to Palate: no PALATE_KEY_BACKEND, no config, ``auto``."""
    monkeypatch.delenv("PALATE_KEY_BACKEND", raising=False)
    previous = keyring.get_keyring()
    yield
    keyring.set_keyring(previous)


def test_a_plaintext_keyring_is_not_a_keychain(paths: Paths, auto: None) -> None:
    keyring.set_keyring(PlaintextKeyring())
    assert keyring_available()[0] is False
    km = KeyManager.for_home(paths)
    assert km.preference == "auto"
    km.create()
    st = km.status()
    assert st.backend == "file" and st.warning, "auto must treat it like no keychain"
    assert not PlaintextKeyring.store, "nothing may be stored in a plaintext keyring"
    # Behind a chainer (keyring's default when several backends are installed) the same.
    keyring.set_keyring(chainer.ChainerBackend())
    chainer.ChainerBackend.backends = [PlaintextKeyring()]  # type: ignore[assignment]
    try:
        assert keyring_available()[0] is False
    finally:
        del chainer.ChainerBackend.backends


def test_an_explicit_plaintext_keyring_carries_the_warning(paths: Paths, auto: None) -> None:
    keyring.set_keyring(PlaintextKeyring())
    km = KeyManager(paths, "keyring")
    dek = bytes(km.create())
    st = km.status()
    assert st.backend == "keyring" and st.warning and "unencrypted" in st.warning
    assert bytes(km.unwrap()) == dek, "a KEK already in such a keyring must stay usable"


def test_auto_picks_a_real_keychain_when_there_is_one(
    paths: Paths, auto: None, secret_service: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(k, secret_service[k])
    from keyring.backends.SecretService import Keyring as SecretServiceKeyring

    keyring.set_keyring(SecretServiceKeyring())
    km = KeyManager.for_home(paths)
    km.create()
    assert km.status().backend == "keyring" and km.status().warning is None
    keyring.set_keyring(fail.Keyring())
    assert KeyManager.for_home(resolve(paths.home.parent / "other")).status().backend == "file"


def test_auto_selection_in_a_fresh_process(home: Path, secret_service: dict[str, str]) -> None:
    """keyring's own start-up discovery (no set_keyring at all) finds the Secret Service."""
    env = {**secret_service, "PALATE_HOME": str(home)}
    env.pop("PALATE_KEY_BACKEND", None)
    code = (
        "from palate.store.keys import KeyManager; from palate.paths import resolve; "
        "p = resolve(); p.ensure(); km = KeyManager.for_home(p); km.create(); "
        "print(km.status().backend)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["keyring"]


# --- durability (item 10) ---------------------------------------------------------------


def test_key_file_is_flushed_with_f_fullfsync_on_macos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    import fcntl

    def fake_fcntl(fd: int, cmd: int, *a: Any) -> int:
        calls.append(cmd)
        return 0

    monkeypatch.setattr(keys_module.sys, "platform", "darwin")
    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    write_private(tmp_path / "key.json", b"{}")
    assert calls and set(calls) == {getattr(fcntl, "F_FULLFSYNC", 51)}


# --- rekey (item 7) ---------------------------------------------------------------------


def test_rekey_replaces_the_data_key(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    old_dek = bytes(km.create())
    with_events(paths, old_dek)
    kit = km.export_kit()
    old_doc = doc(paths)
    km.rekey(lambda o, n: reencrypt(paths.db_file, o, n), verify(paths))
    new_dek = bytes(km.unwrap())
    assert new_dek != old_dek
    assert events(paths, new_dek) == 20
    # An old key.json copy and its KEK (still there: retired, not yet deleted) unwrap the
    # old data key, which no longer opens the database.
    assert bytes(km._unwrap_doc(old_doc)) == old_dek
    with pytest.raises(PalateError) as ei:
        check_key(paths.db_file, old_dek)
    assert ei.value.code == "key_error"
    assert km.status().recovery == "none", "the old kit is void: a new one is needed"
    with pytest.raises(PalateError, match="does not open"):
        km.recover(kit, verify(paths))
    assert sorted(p.name for p in paths.data_dir.iterdir() if "palate.db" in p.name) == [
        "palate.db"
    ]


_CRASH = """
import os, sys
from pathlib import Path
from palate.paths import resolve
from palate.store.database import check_key, reencrypt
from palate.store.keys import KeyManager
paths = resolve(Path(sys.argv[1]))
km = KeyManager(paths, "file")
def crashing(old, new):
    if sys.argv[2] == "after":
        reencrypt(paths.db_file, old, new)
    os._exit(9)  # as kill -9: no cleanup, no finally
km.rekey(crashing, lambda dek: check_key(paths.db_file, dek))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_rekey_is_crash_safe(paths: Paths, when: str) -> None:
    km = KeyManager(paths, "file")
    old_dek = bytes(km.create())
    with_events(paths, old_dek)
    r = subprocess.run([sys.executable, "-c", _CRASH, str(paths.home), when], timeout=120)
    assert r.returncode == 9
    assert doc(paths).get("pending"), "the crash left the rekey pending"
    done = km.settle(verify(paths))
    assert done == ("finished" if when == "after" else "undone")
    dek = bytes(km.unwrap())
    assert (dek == old_dek) == (when == "before")
    assert events(paths, dek) == 20
    assert not doc(paths).get("pending")


def test_the_daemon_settles_an_interrupted_rekey(home: Path) -> None:
    from conftest import DaemonProc, daemon_env

    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        c.ingest({"kind": "pair", "source": "k", "prompt": "p", "chosen": "a", "rejected": "b"})
    assert d.terminate() == 0
    r = subprocess.run(
        [sys.executable, "-c", _CRASH, str(home), "after"],
        env={**os.environ, "PALATE_KEY_BACKEND": "file"},
        timeout=120,
    )
    assert r.returncode == 9
    d.start()
    with d.client() as c:
        assert c.status()["events"]["total"] == 1
    assert d.terminate() == 0
    assert not json.loads(d.paths.key_file.read_text()).get("pending")
