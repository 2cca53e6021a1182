"""The data key: generated once, kept wrapped, unwrapped only to open the store.

Envelope encryption: a random 256-bit data key (DEK) encrypts the SQLCipher
database. The DEK is stored in ``key.json`` only wrapped (AES-256-GCM) by a
key-encryption key (KEK) that lives in the OS keychain via ``keyring``, service
``palate``. Where no keychain exists (headless Linux), or the only keyring backend
keeps secrets in plaintext (``keyrings.alt``), the KEK goes to a 0600 file beside
the database instead, which only protects against other users, and Palate says so
loudly wherever it reports status.

The **recovery kit** (``PLTK-...``) is the DEK itself, with its key id and a checksum:
the kit and a copy of the database are enough to regain access, with no keychain and
no ``key.json``. Its state (``none``, ``unconfirmed``: exported, ``confirmed``: typed
back or used) is kept in ``key.json`` and reported by status, the log and doctor.

Rotation re-wraps the DEK under a fresh KEK; ``rekey`` replaces the DEK itself and
re-encrypts the database (crash-safe: the new key is pending in ``key.json`` until the
re-encrypted database is verified and in place). Old KEKs are deleted only after a grace
period (:data:`RETIRE_AFTER_S`), so a ``key.json`` that a crash or power loss rolls back
still finds its KEK. Nothing here ever prints or logs key material, and no code path
creates a new key while a database already exists: that would orphan the data.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
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
KIT_PREFIX = "PLTK"
KIT_VERSION = 1
BACKENDS = ("auto", "keyring", "file")
#: ``key.recovery`` in status: no kit for this data key / exported / typed back (or used).
RECOVERY_STATES = ("none", "unconfirmed", "confirmed")
#: An old KEK (after rotate, rekey or recover) is deleted this long after it was replaced,
#: at the next unwrap that works with the new one: a key.json rolled back by a crash or a
#: restored backup still finds its KEK meanwhile.
RETIRE_AFTER_S = 24 * 3600.0

#: keyring backends that keep what they store encrypted at rest (class paths). Anything else,
#: the plaintext file keyrings of ``keyrings.alt`` included, is not a keychain for Palate.
ENCRYPTING_BACKENDS = frozenset(
    {
        "keyring.backends.macOS.Keyring",
        "keyring.backends.SecretService.Keyring",
        "keyring.backends.libsecret.Keyring",
        "keyring.backends.kwallet.DBusKeyring",
        "keyring.backends.kwallet.DBusKeyringKWallet4",
        "keyring.backends.Windows.WinVaultKeyring",
    }
)

FILE_BACKEND_WARNING = (
    "no OS keychain is available: the key that protects your data is in a 0600 file "
    "beside the database, so anyone who can read your files can read your feedback. "
    "Install and unlock a keychain (e.g. gnome-keyring), then run "
    "`palate key rotate --backend keyring`."
)
PLAINTEXT_KEYRING_WARNING = (
    "the keyring backend keeps Palate's key unencrypted ({detail}): anyone who can read "
    "your files can read your feedback, as with the file backend. Install and unlock a real "
    "keychain (e.g. gnome-keyring), then run `palate key rotate --backend keyring`."
)
NO_RECOVERY_WARNING = (
    "no recovery kit exists for your data: if the keychain entry or key.json is lost, every "
    "event is lost with it. Run `palate key recovery-export` and keep the kit offline."
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
                "unlock your keychain and retry, or use `palate key recover` with your "
                "recovery kit",
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


@dataclass(frozen=True)
class KeyringInfo:
    """What ``keyring`` would use: ``usable`` (it can store and return a secret) and
    ``encrypts`` (it keeps it encrypted at rest: only then is it a keychain)."""

    usable: bool
    encrypts: bool
    detail: str


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def keyring_info() -> KeyringInfo:
    """The keyring backend a write would go to, and whether it is a real keychain."""
    try:
        import keyring
        from keyring.backends import chainer, fail, null
    except Exception as e:  # pragma: no cover - keyring is a hard dependency
        return KeyringInfo(False, False, f"keyring not importable: {e}")
    kr = keyring.get_keyring()
    if isinstance(kr, chainer.ChainerBackend):
        # A chainer writes to the first of its backends (highest priority first).
        if not kr.backends:
            return KeyringInfo(False, False, "no keychain backend")
        kr = kr.backends[0]
    if isinstance(kr, (fail.Keyring, null.Keyring)):
        return KeyringInfo(
            False, False, "no keychain backend (no Secret Service / Keychain reachable)"
        )
    name = _class_path(kr)
    if name in ENCRYPTING_BACKENDS:
        return KeyringInfo(True, True, name)
    return KeyringInfo(True, False, f"{name} does not encrypt what it stores")


def keyring_available() -> tuple[bool, str]:
    """Whether a real keychain (a backend that encrypts at rest) exists, and which one."""
    info = keyring_info()
    return info.encrypts, info.detail


def _full_fsync(fd: int) -> None:
    """Flush ``fd`` to stable storage. On macOS fsync stops at the drive's cache; only
    F_FULLFSYNC reaches the medium (it fails on some filesystems: fsync then)."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_FULLFSYNC", 51))
            return
        except OSError:
            pass
    os.fsync(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to a 0600 file (temp file, full fsync, rename, dir fsync).

    Key files must never be observed half-written: a crash mid-write would
    otherwise leave the only wrapped copy of the key unreadable.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                _full_fsync(f.fileno())
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
        _full_fsync(dfd)
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
            "use `palate key recover` with your recovery kit.",
        ) from e


def _grouped(prefix: str, raw: bytes) -> str:
    b32 = base64.b32encode(raw).decode("ascii").rstrip("=")
    return prefix + "-" + "-".join(b32[i : i + 4] for i in range(0, len(b32), 4))


def _ungrouped(code: str, prefix: str, what: str) -> bytes:
    cleaned = "".join(code.split()).upper().replace("-", "")
    if not cleaned.startswith(prefix):
        raise PalateError("key_error", f"a {what} starts with {prefix}-")
    body = cleaned[len(prefix) :]
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8))
    except binascii.Error as e:
        raise PalateError("key_error", f"that {what} is mistyped (not base32)") from e


def encode_recovery(secret: bytes) -> str:
    """``PLT1-XXXX-...``: the legacy recovery key (a second wrap inside key.json)."""
    return _grouped(RECOVERY_PREFIX, secret)


def decode_recovery(code: str) -> bytes:
    secret = _ungrouped(code, RECOVERY_PREFIX, "recovery key")
    if len(secret) != 32:
        raise PalateError("key_error", "that recovery key is incomplete (wrong length)")
    return secret


def _kit_check(body: bytes) -> bytes:
    return hashlib.sha256(b"palate-kit|" + body).digest()[:4]


def encode_kit(key_id: str, dek: bytes | bytearray) -> str:
    """``PLTK-XXXX-...`` (18 groups): version, key id, the data key and a checksum, base32.

    The kit *is* the data key: with it and a copy of the database the data can be read,
    with no keychain and no key.json. Easy to print, read aloud and type back.
    """
    body = bytes([KIT_VERSION]) + bytes.fromhex(key_id) + bytes(dek)
    return _grouped(KIT_PREFIX, body + _kit_check(body))


def decode_kit(code: str) -> tuple[str, bytearray]:
    """(key id, data key) from a kit; ``key_error`` naming what is wrong with it."""
    raw = _ungrouped(code, KIT_PREFIX, "recovery kit")
    if len(raw) != 1 + 8 + 32 + 4:
        raise PalateError("key_error", "that recovery kit is incomplete (wrong length)")
    body, check = raw[:-4], raw[-4:]
    if not hmac.compare_digest(_kit_check(body), check):
        raise PalateError("key_error", "that recovery kit is mistyped (its checksum is wrong)")
    if body[0] != KIT_VERSION:
        raise PalateError("key_error", f"recovery kit version {body[0]} is not supported")
    return body[1:9].hex(), bytearray(body[9:])


def is_kit(text: str) -> bool:
    return "".join(text.split()).upper().startswith(KIT_PREFIX)


@dataclass
class KeyStatus:
    backend: str
    backend_detail: str
    warning: str | None
    key_id: str | None
    has_recovery: bool
    #: ``none`` | ``unconfirmed`` | ``confirmed``: the recovery kit of the current data key.
    recovery: str
    created: float | None
    rotated: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def recovery_state(doc: dict[str, Any] | None) -> str:
    kit = (doc or {}).get("kit") or {}
    if kit.get("confirmed"):
        return "confirmed"
    if kit.get("exported"):
        return "unconfirmed"
    return "none"


class KeyManager:
    """Creates, unwraps, rotates, rekeys and recovers the data key for one Palate home."""

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

    def _choose_backend(self, preference: str | None = None) -> str:
        pref = preference or self.preference
        if pref != "auto":
            return pref
        # Only a keychain that encrypts at rest counts; a plaintext keyring is no better
        # than the file backend, and the file backend at least says so.
        return "keyring" if keyring_info().encrypts else "file"

    @staticmethod
    def _aad(doc: dict[str, Any], purpose: str) -> bytes:
        return f"palate-dek|v{KEY_FILE_FORMAT}|{doc['key_id']}|{purpose}".encode()

    def _new_doc(
        self,
        key_id: str,
        generation: int,
        dek: bytes | bytearray,
        target: str,
        created: float | None,
    ) -> dict[str, Any]:
        """A key file for ``dek`` under a fresh KEK, stored in ``target`` (not yet saved)."""
        if target not in ("keyring", "file"):
            raise PalateError("key_error", f"unknown key backend {target!r}")
        doc: dict[str, Any] = {
            "format": KEY_FILE_FORMAT,
            "key_id": key_id,
            "generation": generation,
            "backend": target,
            "created": time.time() if created is None else created,
            "rotated": None,
            "recovery": None,
            "kit": None,
            "retired": [],
        }
        doc["ref"] = f"kek-{key_id}-{generation}"
        kek = secrets.token_bytes(32)
        doc["wrapped"] = _wrap(kek, bytes(dek), self._aad(doc, "kek"))
        self._backend(target).put(doc["ref"], kek)
        return doc

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
        dek = bytearray(secrets.token_bytes(32))
        self._save(self._new_doc(secrets.token_hex(8), 1, dek, self._choose_backend(), None))
        return dek

    def _unwrap_doc(self, doc: dict[str, Any], wrapped: dict[str, Any] | None = None) -> bytearray:
        backend = self._backend(doc["backend"])
        if doc["backend"] == "keyring":
            info = keyring_info()
            if not info.usable:
                raise PalateError(
                    "key_error",
                    f"Palate's key is in the OS keychain, which is unavailable ({info.detail}). "
                    "Unlock or start your keychain, or run `palate key recover` with your "
                    "recovery kit. Your data is untouched.",
                )
        kek = backend.get(doc["ref"])
        if kek is None:
            raise PalateError(
                "key_error",
                f"the key entry {doc['ref']!r} is missing from the {doc['backend']} backend. "
                "Your data is untouched; run `palate key recover` with your recovery kit.",
            )
        return _unwrap(kek, wrapped or doc["wrapped"], self._aad(doc, "kek"))

    def unwrap(self) -> bytearray:
        """The data key, for opening the store. Callers zero it when done.

        Old KEKs past their grace period are deleted here, once the current one has
        worked (so never while the current key file cannot be used).
        """
        doc = self._require()
        dek = self._unwrap_doc(doc)
        with contextlib.suppress(Exception):  # housekeeping must never block access
            self.purge_retired(doc)
        return dek

    def _require(self) -> dict[str, Any]:
        doc = self._load()
        if doc is None:
            raise PalateError("key_error", f"no key file at {self.paths.key_file}")
        return doc

    def status(self) -> KeyStatus:
        doc = self._load()
        backend = doc["backend"] if doc else self._choose_backend()
        warning = None
        if backend == "keyring":
            info = keyring_info()
            detail = info.detail
            if info.usable and not info.encrypts:
                warning = PLAINTEXT_KEYRING_WARNING.format(detail=info.detail)
        else:
            detail = str(self.paths.data_dir)
            warning = FILE_BACKEND_WARNING
        recovery = recovery_state(doc)
        return KeyStatus(
            backend=backend,
            backend_detail=detail,
            warning=warning,
            key_id=doc["key_id"] if doc else None,
            has_recovery=recovery != "none",
            recovery=recovery,
            created=doc.get("created") if doc else None,
            rotated=doc.get("rotated") if doc else None,
        )

    # -- old KEKs --------------------------------------------------------------
    def _retire(self, new: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Carry ``old``'s pending deletions into ``new`` and add ``old``'s own KEK."""
        retired = list(new.get("retired") or [])
        if old is not None:
            retired.extend(old.get("retired") or [])
            if old.get("ref") and old.get("ref") != new.get("ref"):
                retired.append(
                    {
                        "backend": old["backend"],
                        "ref": old["ref"],
                        "after": time.time() + RETIRE_AFTER_S,
                    }
                )
        new["retired"] = retired

    def purge_retired(self, doc: dict[str, Any] | None = None, now: float | None = None) -> int:
        """Delete the old KEKs whose grace period is over; returns how many."""
        doc = doc or self._require()
        now = time.time() if now is None else now
        keep, gone = [], 0
        for item in doc.get("retired") or []:
            if item.get("after", 0) > now or item.get("ref") == doc.get("ref"):
                keep.append(item)
                continue
            try:
                self._backend(item["backend"]).delete(item["ref"])
                gone += 1
            except (PalateError, OSError, KeyError):
                keep.append(item)
        if gone:
            doc["retired"] = keep
            self._save(doc)
        return gone

    # -- rotation --------------------------------------------------------------
    def rotate(self, backend: str | None = None) -> KeyStatus:
        """Re-wrap the data key under a fresh KEK (optionally moving backends).

        Order matters for crash safety: the new KEK is stored first, then the key
        file is atomically replaced (full fsync); the old KEK is only scheduled for
        deletion (:data:`RETIRE_AFTER_S`). A crash at any point leaves a key file whose
        KEK exists, even if the file system rolls the key file back.
        """
        doc = self._require()
        dek = self._unwrap_doc(doc)
        try:
            self._rewrap(doc, dek, backend or doc["backend"])
        finally:
            zero(dek)
        return self.status()

    def _rewrap(self, doc: dict[str, Any], dek: bytearray, target: str) -> dict[str, Any]:
        """Wrap ``dek`` under a fresh KEK in ``target`` and save the new key file."""
        target = self._choose_backend(target)
        new = self._new_doc(
            doc["key_id"], int(doc.get("generation", 1)) + 1, dek, target, doc.get("created")
        )
        new["recovery"] = doc.get("recovery")
        new["kit"] = doc.get("kit")
        new["rotated"] = time.time()
        self._retire(new, doc)
        self._save(new)
        if target == "file":
            log.warning("%s", FILE_BACKEND_WARNING)
        return new

    def settle(self, verify: Callable[[bytes], None]) -> str | None:
        """Finish or undo a ``rekey`` that a crash interrupted; returns what was done.

        ``verify(dek)`` raises unless ``dek`` opens the database. The pending key is made
        current if the re-encrypted database is in place; it is dropped if the database
        still opens with the current key. If neither opens it, nothing is changed
        (``key_error``). Call with the data lock held (the daemon at start, ``rekey``).
        """
        doc = self._load()
        if not doc or not doc.get("pending"):
            return None
        pending = doc["pending"]

        def opens(d: dict[str, Any]) -> bool:
            try:
                dek = self._unwrap_doc(d)
            except PalateError:
                return False
            try:
                verify(bytes(dek))
                return True
            except PalateError:
                return False
            finally:
                zero(dek)

        if opens(pending):
            pending["rotated"] = time.time()
            self._retire(pending, doc)
            self._save(pending)
            log.warning("an interrupted rekey was finished: the new data key is in use")
            return "finished"
        if opens(doc):
            doc.pop("pending")
            retired = list(doc.get("retired") or [])
            retired.append(
                {"backend": pending["backend"], "ref": pending["ref"], "after": time.time()}
            )
            doc["retired"] = retired
            self._save(doc)
            log.warning("an interrupted rekey was undone: the database kept its data key")
            return "undone"
        raise PalateError(
            "key_error",
            "a rekey was interrupted and the database opens with neither the old nor the new "
            "data key; nothing was changed. `palate key recover` < your recovery kit",
        )

    def rekey(
        self,
        reencrypt: Callable[[bytes, bytes], None],
        verify: Callable[[bytes], None],
        backend: str | None = None,
    ) -> KeyStatus:
        """Replace the data key itself: the database is re-encrypted under a new one.

        Unlike :meth:`rotate`, old copies of ``key.json`` (and their KEKs) stop opening the
        database, and so does the old recovery kit: a new kit must be exported. Crash-safe:

        1. the new DEK, wrapped under a new KEK, is saved in ``key.json`` as ``pending``;
        2. ``reencrypt(old, new)`` writes a re-encrypted copy, verifies it and renames it
           over the database (see :func:`palate.store.database.reencrypt`);
        3. the pending key becomes current; the old KEK is retired (deleted later).

        A crash before the rename leaves the old database and the old key current; after
        it, :meth:`settle` (at the next daemon start) finds the pending key opens the
        database and completes step 3. ``verify(dek)`` raises unless ``dek`` opens the
        database: an error in step 2 is settled by what the database really is.
        """
        doc = self._require()
        if doc.get("pending"):
            raise PalateError(
                "conflict", "a previous rekey was interrupted; start the daemon once to settle it"
            )
        old = self._unwrap_doc(doc)
        new_dek = bytearray(secrets.token_bytes(32))
        try:
            target = self._choose_backend(backend or doc["backend"])
            pending = self._new_doc(secrets.token_hex(8), 1, new_dek, target, None)
            doc["pending"] = pending
            self._save(doc)
            try:
                reencrypt(bytes(old), bytes(new_dek))
            except BaseException:
                # Whichever key the database is under now (an error after the rename still
                # leaves it re-encrypted) becomes or stays the current one.
                self.settle(verify)
                raise
            pending["rotated"] = time.time()
            self._retire(pending, doc)
            self._save(pending)
        finally:
            zero(old)
            zero(new_dek)
        log.warning("the data key was replaced; export a new recovery kit")
        return self.status()

    # -- recovery kit ------------------------------------------------------------
    def export_kit(self) -> str:
        """The recovery kit of the current data key; marks it exported (``unconfirmed``
        unless it was confirmed before: the kit of one data key never changes)."""
        doc = self._require()
        dek = self._unwrap_doc(doc)
        try:
            kit = encode_kit(doc["key_id"], dek)
        finally:
            zero(dek)
        record = dict(doc.get("kit") or {})
        record["exported"] = time.time()
        record.setdefault("confirmed", None)
        doc["kit"] = record
        self._save(doc)
        return kit

    def confirm_kit(self, text: str) -> KeyStatus:
        """Mark the kit confirmed when ``text`` is this data key's kit."""
        key_id, kit_dek = decode_kit(text)
        doc = self._require()
        dek = self._unwrap_doc(doc)
        try:
            same = key_id == doc["key_id"] and hmac.compare_digest(bytes(dek), bytes(kit_dek))
        finally:
            zero(dek)
            zero(kit_dek)
        if not same:
            raise PalateError("key_error", "that is not the recovery kit of this data key")
        record = dict(doc.get("kit") or {})
        record.setdefault("exported", time.time())
        record["confirmed"] = time.time()
        doc["kit"] = record
        self._save(doc)
        return self.status()

    def recover_kit(
        self, text: str, verify: Callable[[bytes], None], backend: str | None = None
    ) -> KeyStatus:
        """Regain access with the kit alone: no key.json, no keychain entry needed.

        ``verify(dek)`` must prove the kit's key opens the database; then a new key file is
        written with the key under a fresh KEK (the kit counts as confirmed: it was used).
        A key file that is there but unusable (another key, corrupt) is kept beside it as
        ``key.json.replaced-<time>``.
        """
        key_id, dek = decode_kit(text)
        try:
            try:
                verify(bytes(dek))
            except PalateError as e:
                raise PalateError(
                    "key_error", f"that recovery kit does not open this database ({e.message})"
                ) from e
            try:
                old = self._load()
            except PalateError:
                old = None
                aside = self.paths.key_file.with_name(f"key.json.replaced-{int(time.time())}")
                with contextlib.suppress(OSError):
                    os.replace(self.paths.key_file, aside)
            same = old is not None and old.get("key_id") == key_id and not old.get("pending")
            generation = int(old.get("generation", 1)) + 1 if same and old else 1
            target = self._choose_backend(backend)
            new = self._new_doc(
                key_id, generation, dek, target, old.get("created") if same and old else None
            )
            if same and old:
                new["recovery"] = old.get("recovery")
                self._retire(new, old)
            elif old is not None:
                # Another key's file (a different database, an unfinished rekey): keep it.
                aside = self.paths.key_file.with_name(f"key.json.replaced-{int(time.time())}")
                with contextlib.suppress(OSError):
                    os.replace(self.paths.key_file, aside)
            now = time.time()
            new["kit"] = {"exported": now, "confirmed": now}
            new["rotated"] = now
            self._save(new)
        finally:
            zero(dek)
        return self.status()

    # -- legacy recovery key (PLT1, a wrap inside key.json) -----------------------
    def export_recovery(self) -> str:
        """A legacy recovery key (PLT1); the previous one stops working. It needs key.json:
        prefer :meth:`export_kit`."""
        doc = self._require()
        dek = self._unwrap_doc(doc)
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
        """Recover with a kit (``PLTK-``, needs no key.json) or a legacy PLT1 recovery key
        (a second wrap inside key.json): check it opens the store, re-wrap under a new KEK."""
        if is_kit(code):
            return self.recover_kit(code, verify, backend)
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
        finally:
            zero(dek)
        return self.status()


def protect_process() -> list[str]:
    """For a process that holds the data key (the daemon, a training run): no core dumps
    (RLIMIT_CORE 0) and no debugger attach where the OS allows it (Linux: PR_SET_DUMPABLE 0,
    which also keeps /proc/<pid>/mem and friends from same-uid processes; macOS:
    PT_DENY_ATTACH). Best effort; returns what took effect."""
    import ctypes
    import resource

    done = []
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done.append("no core dumps")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            pr_set_dumpable = 4
            if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) == 0:
                done.append("not dumpable (no ptrace attach)")
        elif sys.platform == "darwin":
            pt_deny_attach = 31
            if libc.ptrace(pt_deny_attach, 0, None, 0) == 0:
                done.append("PT_DENY_ATTACH")
    except (OSError, AttributeError):
        pass
    return done


def zero(buf: bytearray) -> None:
    """Overwrite a key buffer in place (best effort: Python may hold copies)."""
    for i in range(len(buf)):
        buf[i] = 0
