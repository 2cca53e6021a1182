"""``palate doctor``: every check, in the order the user reads them, each with a fix.

The checks live in three modules grouped by what they look at: ``checks_install`` (packages,
model, BLAS, login service), ``checks_data`` (permissions, disk, key, keychain) and
``checks_daemon`` (the running daemon and its training runs).
"""

from __future__ import annotations

from collections.abc import Callable

from palate.paths import Paths
from palate.service.check import Check
from palate.service.checks_daemon import _daemon, training_check
from palate.service.checks_data import _keychain, _permissions, disk_check, keychain_lock_check
from palate.service.checks_install import _blas, _embedded_model, _versions, service_check

__all__ = ["CHECKS", "Check", "run_checks"]

CHECKS: list[Callable[[Paths], Check]] = [
    lambda p: _versions(),
    _permissions,
    _keychain,
    _daemon,
    lambda p: _embedded_model(),
    lambda p: _blas(),
    service_check,
    disk_check,
    training_check,
    keychain_lock_check,
]


def run_checks(paths: Paths) -> list[Check]:
    out = []
    for check in CHECKS:
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
