"""``palate doctor``: every check, in the order the user reads them, each with a fix.

The checks live in four modules grouped by what they look at: ``checks_install`` (packages,
model, BLAS, login service), ``checks_data`` (permissions, disk, key, keychain),
``checks_daemon`` (the running daemon and its training runs) and ``checks_adapters`` (each
enabled adapter's folder and connection, the browser's manifests and launcher). A check
returns one finding, or a list of them (one per adapter).
"""

from __future__ import annotations

from collections.abc import Callable

from palate.paths import Paths
from palate.service.check import Check
from palate.service.checks_adapters import adapter_checks, browser_check
from palate.service.checks_daemon import _daemon, training_check
from palate.service.checks_data import _keychain, _permissions, disk_check, keychain_lock_check
from palate.service.checks_install import _blas, _embedded_model, _versions, service_check

__all__ = ["CHECKS", "Check", "run_checks"]

CHECKS: list[Callable[[Paths], Check | list[Check]]] = [
    lambda p: _versions(),
    _permissions,
    _keychain,
    _daemon,
    lambda p: _embedded_model(),
    lambda p: _blas(),
    service_check,
    disk_check,
    training_check,
    adapter_checks,
    browser_check,
    keychain_lock_check,
]


def run_checks(paths: Paths) -> list[Check]:
    out = []
    for check in CHECKS:
        try:
            found = check(paths)
            out.extend(found if isinstance(found, list) else [found])
        except Exception as e:  # a broken check must not hide the others
            out.append(
                Check(
                    getattr(check, "__name__", "check"),
                    "fail",
                    f"check crashed: {type(e).__name__}: {e}",
                )
            )
    return out
