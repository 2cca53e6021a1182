"""Key contract tests, run against every KEK backend: the file fallback and the real
Secret Service (gnome-keyring on a private D-Bus session)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backends import fail

from palate.errors import PalateError
from palate.paths import Paths, resolve
from palate.store.database import Store, check_key
from palate.store.keys import (
    FileBackend,
    KeyManager,
    KeyringBackend,
    decode_recovery,
    encode_recovery,
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


def doc(paths: Paths) -> dict[str, object]:
    data: dict[str, object] = json.loads(paths.key_file.read_text())
    return data


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


def test_rotate_rewraps_and_deletes_old_kek(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    dek = bytes(km.create())
    old_ref = str(doc(paths)["ref"])
    km.rotate()
    new_ref = str(doc(paths)["ref"])
    assert new_ref != old_ref
    assert bytes(km.unwrap()) == dek
    store = kek_store(km, backend)
    assert store.get(old_ref) is None
    assert store.get(new_ref) is not None


def test_recovery_restores_access_after_kek_loss(paths: Paths, backend: str) -> None:
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
        km.recover(first, lambda d: check_key(paths.db_file, d))
    with pytest.raises(PalateError):
        km.recover("PLT1-AAAA", lambda d: check_key(paths.db_file, d))
    km.recover(code, lambda d: check_key(paths.db_file, d))
    assert bytes(km.unwrap()) == bytes(dek)


def test_tampered_key_file_is_detected_and_left_alone(paths: Paths, backend: str) -> None:
    km = KeyManager(paths, backend)
    km.create()
    d = doc(paths)
    wrapped = dict(d["wrapped"])  # type: ignore[call-overload]
    ct = bytearray(__import__("base64").b64decode(wrapped["ct"]))
    ct[0] ^= 1
    wrapped["ct"] = __import__("base64").b64encode(bytes(ct)).decode()
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


def test_recovery_code_format() -> None:
    secret = secrets.token_bytes(32)
    code = encode_recovery(secret)
    assert code.startswith("PLT1-")
    assert decode_recovery(code) == secret
    assert decode_recovery(code.lower().replace("-", " ")) == secret
    with pytest.raises(PalateError):
        decode_recovery("XYZ-1234")
