"""Health checks behind ``palate doctor``: each says what is wrong and how to fix it."""

from __future__ import annotations

import importlib.metadata as md
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .errors import PalateError
from .keys import KeyManager, keyring_available
from .paths import MAX_SOCKET_PATH, Paths


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> Check:
    parts = [f"python {sys.version.split()[0]}"]
    missing = []
    for pkg in ("msgpack", "sqlcipher3", "keyring", "cryptography", "mlx", "mlx-lm"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            missing.append(pkg)
    if missing:
        return Check(
            "versions",
            "fail",
            f"missing: {', '.join(missing)}",
            "reinstall Palate: `make run` or `pip install -e .`",
        )
    return Check("versions", "ok", ", ".join(parts))


def _keychain(paths: Paths) -> Check:
    ok, detail = keyring_available()
    try:
        status = KeyManager.for_home(paths).status()
    except PalateError as e:
        return Check("key", "fail", e.message, "restore key.json or run `palate key recover`")
    if status.backend == "file":
        return Check(
            "key",
            "warn",
            f"key backend: file ({status.warning})",
            "install and unlock a keychain, then `palate key rotate --backend keyring`",
        )
    if not ok:
        return Check(
            "key",
            "fail",
            f"key backend: keyring, but {detail}",
            "unlock/start your keychain, or `palate key recover` with your recovery key",
        )
    rec = "" if status.has_recovery else " (no recovery key exported yet)"
    fix = "" if status.has_recovery else "run `palate key recovery-export` and keep it safe"
    return Check(
        "key", "ok" if status.has_recovery else "warn", f"key backend: keyring ({detail}){rec}", fix
    )


def _permissions(paths: Paths) -> Check:
    bad = []
    for d in (paths.home, paths.data_dir, paths.run_dir):
        if d.exists():
            st = os.lstat(d)
            if st.st_uid != os.getuid() or st.st_mode & 0o077 or stat.S_ISLNK(st.st_mode):
                bad.append(f"{d} ({oct(st.st_mode & 0o777)})")
    if bad:
        return Check(
            "permissions",
            "fail",
            "not private: " + ", ".join(bad),
            "chmod 700 those directories (Palate does this when it creates them)",
        )
    sock = len(os.fsencode(str(paths.socket)))
    return Check(
        "permissions",
        "ok",
        f"data dirs are 0700; socket path {paths.socket} ({sock}/{MAX_SOCKET_PATH} bytes)",
    )


def _daemon(paths: Paths) -> Check:
    from .client import Client

    try:
        with Client(socket_path=paths.socket, timeout=5) as c:
            hello = c.hello("palate-doctor")
        return Check("daemon", "ok", f"running, pid {hello['pid']}, version {hello['version']}")
    except PalateError as e:
        return Check("daemon", "warn", e.message, "start it with `palate daemon`")


def _blas() -> Check:
    from .blas import blas_report

    r = blas_report()
    detail = f"{r.blas} BLAS ({r.status.detail}); fp32 matmul {r.gflops:.1f} GFLOP/s on {r.device}"
    if r.blas == "reference":
        return Check(
            "blas",
            "warn",
            detail,
            "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread); "
            "MLX's bundled reference BLAS is 20-40x slower",
        )
    return Check("blas", "ok", detail)


def _embedded_model() -> Check:
    from .base_model import BUILTIN_PREFIX, DEFAULT_BASE_MODEL, locate_builtin

    try:
        path = locate_builtin(DEFAULT_BASE_MODEL.removeprefix(BUILTIN_PREFIX))
    except PalateError as e:
        return Check("model", "fail", e.message, str(e.details.get("install", "")))
    return Check("model", "ok", f"embedded base model {DEFAULT_BASE_MODEL}: {path}")


CHECKS: list[Callable[[Paths], Check]] = [
    lambda p: _versions(),
    _permissions,
    _keychain,
    _daemon,
    lambda p: _embedded_model(),
    lambda p: _blas(),
]


def run_checks(paths: Paths) -> list[Check]:
    # The service/disk/training checks live beside the service code and import Check from
    # here, so they are gathered at call time rather than at import.
    from .doctor_extra import EXTRA_CHECKS

    out = []
    for check in [*CHECKS, *EXTRA_CHECKS]:
        try:
            out.append(check(paths))
        except Exception as e:  # a broken check must not hide the others
            out.append(
                Check(
                    getattr(check, "__name__", "check"),
                    "fail",
                    f"check crashed: {type(e).__name__}: {e}",
                )
            )
    return out
