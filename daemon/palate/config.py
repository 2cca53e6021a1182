"""The user's configuration: ``config.toml`` in the Palate home, all keys optional.

Unknown keys are an error rather than silently ignored: a typo in a privacy or
key setting must not fall back to a default without the user knowing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import PalateError
from .paths import Paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: Keys every ``[adapters.<name>]`` table may hold, with their types. Any other key
#: is the adapter's own option, checked against its declared ``options`` when it
#: loads (an unknown one fails that adapter, visibly, in ``palate status``).
ADAPTER_COMMON_KEYS: dict[str, type] = {"enabled": bool, "redact_deny": list, "module": str}


@dataclass(frozen=True)
class AdaptersConfig:
    """The ``[adapters]`` table: a global deny list plus one table per adapter.

    ``[adapters] redact_deny = ["~/secret/*", "*.bank.example"]`` drops events
    from matching paths/sites/apps for every adapter; ``[adapters.<name>]``
    holds ``enabled`` (default false: nothing is read until the user opts in),
    an extra ``redact_deny``, an optional ``module = "pkg.mod:Factory"`` (load
    an unpackaged adapter) and the adapter's own options.
    """

    redact_deny: tuple[str, ...] = ()
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def enabled(self) -> list[str]:
        return sorted(n for n, t in self.tables.items() if t.get("enabled") is True)

    def options(self, name: str) -> dict[str, Any]:
        return dict(self.tables.get(name, {}))

    def deny_for(self, name: str) -> tuple[str, ...]:
        return self.redact_deny + tuple(self.tables.get(name, {}).get("redact_deny", ()))


@dataclass(frozen=True)
class Config:
    key_backend: str = "auto"
    """Where the key-encryption key lives: auto (keychain if any, else file), keyring, file."""
    log_level: str = "info"
    """debug, info, warning or error. Logs never contain feedback text."""
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    """Which feedback adapters run, with their options and redaction deny lists."""
    base_model: str = "builtin:smollm2-135m"
    """The base LM the reward model is trained on: builtin:NAME, a .gguf file, an mlx-lm
    directory or a hub id (docs/model.md)."""
    idle_unload_s: float = 900.0
    """Seconds without a score request after which the model is unloaded (memory back)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of training knobs ([train] table; keys of palate.training.TrainConfig)."""
    gate: dict[str, Any] = field(default_factory=dict)
    """Overrides of the gate policy ([gate] table; keys of palate.gate.GatePolicy)."""


def _adapters(raw: Any, where: str) -> AdaptersConfig:
    def err(msg: str) -> PalateError:
        return PalateError("invalid_request", f"{where}: [adapters] {msg}")

    if not isinstance(raw, dict):
        raise err("must be a table")
    deny: tuple[str, ...] = ()
    tables: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key == "redact_deny":
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise err("redact_deny must be a list of glob strings")
            deny = tuple(value)
        elif isinstance(value, dict):
            for k, typ in ADAPTER_COMMON_KEYS.items():
                if k in value and not isinstance(value[k], typ):
                    raise err(f"{key}.{k} must be a {typ.__name__}")
            if not all(isinstance(p, str) for p in value.get("redact_deny", [])):
                raise err(f"{key}.redact_deny must be a list of glob strings")
            tables[key] = dict(value)
        else:
            raise err(f"unknown setting {key!r}; expected redact_deny or [adapters.<name>] tables")
    return AdaptersConfig(deny, tables)


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
    if "adapters" in data:
        data["adapters"] = _adapters(data["adapters"], str(paths.config_file))
    for table in ("train", "gate"):
        if table in data and not isinstance(data[table], dict):
            raise PalateError("invalid_request", f"{paths.config_file}: [{table}] must be a table")
    if "PALATE_KEY_BACKEND" in os.environ:
        data["key_backend"] = os.environ["PALATE_KEY_BACKEND"]
    cfg = Config(**data)
    if cfg.key_backend not in ("auto", "keyring", "file"):
        raise PalateError("invalid_request", "key_backend must be auto, keyring or file")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise PalateError("invalid_request", "log_level must be debug, info, warning or error")
    return cfg
