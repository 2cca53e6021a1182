"""The user's configuration: ``config.toml`` in the Palate home, all keys optional.

Unknown keys are an error rather than silently ignored: a typo in a privacy or
key setting must not fall back to a default without the user knowing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from typing import Any

from .errors import PalateError
from .paths import Paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Config:
    key_backend: str = "auto"
    """Where the key-encryption key lives: auto (keychain if any, else file), keyring, file."""
    log_level: str = "info"
    """debug, info, warning or error. Logs never contain feedback text."""


def load_config(paths: Paths) -> Config:
    data: dict[str, Any] = {}
    if paths.config_file.exists():
        try:
            data = tomllib.loads(paths.config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise PalateError("invalid_request", f"{paths.config_file}: {e}") from e
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PalateError(
            "invalid_request",
            f"{paths.config_file}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}",
        )
    if "PALATE_KEY_BACKEND" in os.environ:
        data["key_backend"] = os.environ["PALATE_KEY_BACKEND"]
    cfg = Config(**data)
    if cfg.key_backend not in ("auto", "keyring", "file"):
        raise PalateError("invalid_request", "key_backend must be auto, keyring or file")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise PalateError("invalid_request", "log_level must be debug, info, warning or error")
    return cfg
