"""Doctor checks of the installation: packages, the embedded model, BLAS and the login service.

None of these needs the daemon or the user's data.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

from palate.errors import PalateError
from palate.paths import Paths
from palate.service.check import Check
from palate.service.manager import ServiceContext, manager_for


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


def _blas() -> Check:
    from palate.model.blas import blas_report

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
    from palate.model.base_model import BUILTIN_PREFIX, DEFAULT_BASE_MODEL, locate_builtin

    try:
        path = locate_builtin(DEFAULT_BASE_MODEL.removeprefix(BUILTIN_PREFIX))
    except PalateError as e:
        return Check("model", "fail", e.message, str(e.details.get("install", "")))
    return Check("model", "ok", f"embedded base model {DEFAULT_BASE_MODEL}: {path}")


def service_check(paths: Paths, ctx: ServiceContext | None = None) -> Check:
    """Installed, enabled and running under launchd / systemd --user?"""
    try:
        st = manager_for(ctx or ServiceContext.detect(paths=paths)).status()
    except PalateError as e:
        return Check("service", "warn", e.message, "run `palate daemon` yourself")
    if st.disabled_by_user:
        return Check("service", "fail", st.detail, st.fix)
    if st.running:
        return Check("service", "ok", f"{st.manager}: {st.detail}")
    if not st.installed:
        return Check(
            "service",
            "warn",
            f"not installed ({st.file} absent): the daemon will not start at login",
            "run `palate service install`",
        )
    return Check("service", "warn", f"{st.manager}: {st.state}; {st.detail}".rstrip("; "), st.fix)
