"""The data key: generated once, kept wrapped, unwrapped only to open the store.

Envelope encryption: a random 256-bit data key (DEK) encrypts the SQLCipher
database. The DEK is stored in ``key.json`` only wrapped (AES-256-GCM) by a
key-encryption key (KEK) that lives in the OS keychain via ``keyring``, service
``palate``. Where no keychain exists (headless Linux) the KEK goes to a 0600
file beside the database instead, which only protects against other users, and
Palate says so loudly wherever it reports status.

A recovery key (a second, independent wrap of the DEK) lets the user regain
access when the keychain entry is lost. Rotation re-wraps; it never re-encrypts
the database. Nothing here ever prints or logs key material, and no code path
creates a new key while a database already exists: that would orphan the data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from palate.errors import PalateError
from palate.paths import Paths

log = logging.getLogger(__name__)

KEYRING_SERVICE = "palate"
KEY_FILE_FORMAT = 1
RECOVERY_PREFIX = "PLT1"
BACKENDS = ("auto", "keyring", "file")

FILE_BACKEND_WARNING = (
    "no OS keychain is available: the key that protects your data is in a 0600 file "
    "beside the database, so anyone who can read your files can read your feedback. "
    "Install and unlock a keychain (e.g. gnome-keyring), then run "
    "`palate key rotate --backend keyring`."
)


class KekBackend(Protocol):
    """Where the key-encryption key lives. One contract, tested on every backend."""

    name: str

    def get(self, ref: str) -> bytes | None: ...
    def put(self, ref: str, kek: bytes) -> None: ...
    def delete(self, ref: str) -> None: ...


class KeyringBackend:
    """The OS keychain through ``keyring`` (macOS Keychain, Secret Service, ...)."""

    name = "keyring"

    def get(self, ref: str) -> bytes | None:
        import keyring
        from keyring.errors import KeyringError

        try:
            value = keyring.get_password(KEYRING_SERVICE, ref)
        except KeyringError as e:
            raise PalateError(
                "key_error",
                f"the keychain refused to give Palate's key ({type(e).__name__}: {e}); "
                "unlock your keychain and retry, or use `palate key recover`",
            ) from e
        return None if value is None else base64.b64decode(value)

    def put(self, ref: str, kek: bytes) -> None:
        import keyring
        from keyring.errors import KeyringError

        try:
            keyring.set_password(KEYRING_SERVICE, ref, base64.b64encode(kek).decode("ascii"))
        except KeyringError as e:
            raise PalateError(
                "key_error", f"cannot store Palate's key in the keychain ({type(e).__name__}: {e})"
            ) from e

    def delete(self, ref: str) -> None:
        import keyring
        from keyring.errors import KeyringError, PasswordDeleteError

        try:
            keyring.delete_password(KEYRING_SERVICE, ref)
        except PasswordDeleteError:
            pass
        except KeyringError as e:
            log.warning("could not delete old keychain entry: %s", type(e).__name__)


class FileBackend:
    """A 0600 file in the data directory: the clearly reported fallback."""

    name = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, ref: str) -> Path:
        return self.directory / f"{ref}.kek"

    def get(self, ref: str) -> bytes | None:
        try:
            data = self._path(ref).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise PalateError("key_error", f"key file {self._path(ref)} is corrupted") from e

    def put(self, ref: str, kek: bytes) -> None:
        write_private(self._path(ref), base64.b64encode(kek))

    def delete(self, ref: str) -> None:
        self._path(ref).unlink(missing_ok=True)


def keyring_available() -> tuple[bool, str]:
    """Whether a real keychain backend exists, and which one (for doctor/status)."""
    try:
        import keyring
        from keyring.backends import chainer, fail, null
    except Exception as e:  # pragma: no cover - keyring is a hard dependency
        return False, f"keyring not importable: {e}"
    kr = keyring.get_keyring()
    if isinstance(kr, (fail.Keyring, null.Keyring)):
        return False, "no keychain backend (no Secret Service / Keychain reachable)"
    if isinstance(kr, chainer.ChainerBackend) and not kr.backends:
        return False, "no keychain backend"
    return True, f"{type(kr).__module__}.{type(kr).__name__}"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to a 0600 file (temp file, fsync, rename, fsync dir).

    Key files must never be observed half-written: a crash mid-write would
    otherwise leave the only wrapped copy of the key unreadable.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise PalateError(
                "storage_full",
                f"the disk is full: {path.name} could not be written and was left as it was. "
                "Free some space and retry.",
            ) from e
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _wrap(kek: bytes, dek: bytes, aad: bytes) -> dict[str, str]:
    nonce = secrets.token_bytes(12)
    return {
        "alg": "AES-256-GCM",
        "nonce": _b64(nonce),
        "ct": _b64(AESGCM(kek).encrypt(nonce, dek, aad)),
    }


def _unwrap(kek: bytes, wrapped: dict[str, Any], aad: bytes) -> bytearray:
    try:
        nonce = base64.b64decode(wrapped["nonce"])
        ct = base64.b64decode(wrapped["ct"])
        return bytearray(AESGCM(kek).decrypt(nonce, ct, aad))
    except (InvalidTag, KeyError, ValueError, TypeError) as e:
        raise PalateError(
            "key_error",
            "the wrapped data key does not open with this key: the key file was tampered "
            "with or the keychain holds a different key. Nothing was changed; "
            "use `palate key recover` with your recovery key.",
        ) from e


def encode_recovery(secret: bytes) -> str:
    """``PLT1-XXXX-...``: base32 in groups of 4, easy to read aloud and type."""
    b32 = base64.b32encode(secret).decode("ascii").rstrip("=")
    return RECOVERY_PREFIX + "-" + "-".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def decode_recovery(code: str) -> bytes:
    cleaned = "".join(code.split()).upper().replace("-", "")
    if not cleaned.startswith(RECOVERY_PREFIX):
        raise PalateError("key_error", f"a recovery key starts with {RECOVERY_PREFIX}-")
    body = cleaned[len(RECOVERY_PREFIX) :]
    try:
        secret = base64.b32decode(body + "=" * (-len(body) % 8))
    except binascii.Error as e:
        raise PalateError("key_error", "that recovery key is mistyped (not base32)") from e
    if len(secret) != 32:
        raise PalateError("key_error", "that recovery key is incomplete (wrong length)")
    return secret


@dataclass
class KeyStatus:
    backend: str
    backend_detail: str
    warning: str | None
    key_id: str | None
    has_recovery: bool
    created: float | None
    rotated: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class KeyManager:
    """Creates, unwraps, rotates and recovers the data key for one Palate home."""

    def __init__(self, paths: Paths, backend: str | None = None) -> None:
        self.paths = paths
        pref = backend or os.environ.get("PALATE_KEY_BACKEND") or "auto"
        if pref not in BACKENDS:
            raise PalateError("key_error", f"key backend must be one of {BACKENDS}, got {pref!r}")
        self.preference = pref

    @classmethod
    def for_home(cls, paths: Paths) -> KeyManager:
        """A manager honouring the home's config.toml (and PALATE_KEY_BACKEND)."""
        from palate.config import load_config

        return cls(paths, load_config(paths).key_backend)

    # -- file format ---------------------------------------------------------
    def _load(self) -> dict[str, Any] | None:
        try:
            raw = self.paths.key_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
                raise ValueError("unknown format")
            return doc
        except ValueError as e:
            raise PalateError(
                "key_error",
                f"{self.paths.key_file} is corrupted or from a newer Palate; it was left as is",
            ) from e

    def _save(self, doc: dict[str, Any]) -> None:
        write_private(self.paths.key_file, json.dumps(doc, indent=1).encode("utf-8"))

    def _backend(self, name: str) -> KekBackend:
        if name == "keyring":
            return KeyringBackend()
        if name == "file":
            return FileBackend(self.paths.data_dir)
        raise PalateError("key_error", f"key file names an unknown backend {name!r}")

    def _choose_backend(self) -> str:
        if self.preference != "auto":
            return self.preference
        ok, _ = keyring_available()
        return "keyring" if ok else "file"

    @staticmethod
    def _aad(doc: dict[str, Any], purpose: str) -> bytes:
        return f"palate-dek|v{KEY_FILE_FORMAT}|{doc['key_id']}|{purpose}".encode()

    # -- public API ----------------------------------------------------------
    def exists(self) -> bool:
        return self.paths.key_file.exists()

    def create(self) -> bytearray:
        """Make a new data key. Refuses when a key file or database already exists."""
        if self.exists() or self.paths.db_file.exists():
            raise PalateError(
                "key_error",
                "refusing to create a new data key: a key file or database already exists "
                f"in {self.paths.data_dir}; a new key would make that data unreadable",
            )
        backend_name = self._choose_backend()
        dek = bytearray(secrets.token_bytes(32))
        kek = secrets.token_bytes(32)
        doc: dict[str, Any] = {
            "format": KEY_FILE_FORMAT,
            "key_id": secrets.token_hex(8),
            "generation": 1,
            "backend": backend_name,
            "created": time.time(),
            "rotated": None,
            "recovery": None,
        }
        doc["ref"] = f"kek-{doc['key_id']}-1"
        doc["wrapped"] = _wrap(kek, bytes(dek), self._aad(doc, "kek"))
        self._backend(backend_name).put(doc["ref"], kek)
        self._save(doc)
        return dek

    def unwrap(self) -> bytearray:
        """The data key, for opening the store. Callers zero it when done."""
        doc = self._require()
        backend = self._backend(doc["backend"])
        if doc["backend"] == "keyring":
            ok, why = keyring_available()
            if not ok:
                raise PalateError(
                    "key_error",
                    f"Palate's key is in the OS keychain, which is unavailable ({why}). "
                    "Unlock or start your keychain, or run `palate key recover` with your "
                    "recovery key. Your data is untouched.",
                )
        kek = backend.get(doc["ref"])
        if kek is None:
            raise PalateError(
                "key_error",
                f"the key entry {doc['ref']!r} is missing from the {doc['backend']} backend. "
                "Your data is untouched; run `palate key recover` with your recovery key.",
            )
        return _unwrap(kek, doc["wrapped"], self._aad(doc, "kek"))

    def _require(self) -> dict[str, Any]:
        doc = self._load()
        if doc is None:
            raise PalateError("key_error", f"no key file at {self.paths.key_file}")
        return doc

    def status(self) -> KeyStatus:
        doc = self._load()
        backend = doc["backend"] if doc else self._choose_backend()
        detail = keyring_available()[1] if backend == "keyring" else str(self.paths.data_dir)
        return KeyStatus(
            backend=backend,
            backend_detail=detail,
            warning=FILE_BACKEND_WARNING if backend == "file" else None,
            key_id=doc["key_id"] if doc else None,
            has_recovery=bool(doc and doc.get("recovery")),
            created=doc.get("created") if doc else None,
            rotated=doc.get("rotated") if doc else None,
        )

    def rotate(self, backend: str | None = None) -> KeyStatus:
        """Re-wrap the data key under a fresh KEK (optionally moving backends).

        Order matters for crash safety: the new KEK is stored first, then the key
        file is atomically replaced, and only then is the old KEK deleted. A crash
        at any point leaves a key file whose KEK exists.
        """
        doc = self._require()
        dek = self.unwrap()
        try:
            old_backend, old_ref = self._backend(doc["backend"]), doc["ref"]
            self._rewrap(doc, dek, backend or doc["backend"])
            old_backend.delete(old_ref)
        finally:
            zero(dek)
        return self.status()

    def _rewrap(self, doc: dict[str, Any], dek: bytearray, target: str) -> None:
        """Wrap ``dek`` under a fresh KEK in ``target`` and save the new key file."""
        if target == "auto":
            target = self._choose_backend()
        if target not in ("keyring", "file"):
            raise PalateError("key_error", f"unknown key backend {target!r}")
        new = dict(doc)
        new["generation"] = int(doc.get("generation", 1)) + 1
        new["ref"] = f"kek-{doc['key_id']}-{new['generation']}"
        new["backend"] = target
        new["rotated"] = time.time()
        kek = secrets.token_bytes(32)
        new["wrapped"] = _wrap(kek, bytes(dek), self._aad(new, "kek"))
        self._backend(target).put(new["ref"], kek)
        self._save(new)
        if target == "file":
            log.warning("%s", FILE_BACKEND_WARNING)

    def export_recovery(self) -> str:
        """A new recovery key; the previous one stops working."""
        doc = self._require()
        dek = self.unwrap()
        try:
            secret = secrets.token_bytes(32)
            doc["recovery"] = _wrap(secret, bytes(dek), self._aad(doc, "recovery"))
            doc["recovery"]["created"] = time.time()
            self._save(doc)
        finally:
            zero(dek)
        return encode_recovery(secret)

    def recover(
        self, code: str, verify: Callable[[bytes], None], backend: str | None = None
    ) -> KeyStatus:
        """Unwrap with the recovery key, check it opens the store, re-wrap under a new KEK."""
        doc = self._require()
        if not doc.get("recovery"):
            raise PalateError(
                "key_error",
                "no recovery key was ever exported for this data; it cannot be recovered",
            )
        secret = decode_recovery(code)
        try:
            dek = _unwrap(secret, doc["recovery"], self._aad(doc, "recovery"))
        except PalateError as e:
            raise PalateError("key_error", "that recovery key does not match this data") from e
        try:
            verify(bytes(dek))
            self._rewrap(doc, dek, backend or self.preference)
            # The old KEK is useless now (and may be gone with the keychain); drop it.
            with contextlib.suppress(PalateError, OSError):
                self._backend(doc["backend"]).delete(doc["ref"])
        finally:
            zero(dek)
        return self.status()


def zero(buf: bytearray) -> None:
    """Overwrite a key buffer in place (best effort: Python may hold copies)."""
    for i in range(len(buf)):
        buf[i] = 0
