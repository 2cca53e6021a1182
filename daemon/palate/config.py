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

from palate.errors import PalateError
from palate.paths import Paths

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
class ScheduleConfig:
    """The ``[schedule]`` table: when the nightly training run happens and what it waits for.

    Every condition is a key so a user can relax it (a desktop with no battery, a server
    with no idle signal) without editing code; ``palate schedule`` shows which one blocks.
    """

    enabled: bool = True
    """Run training on a schedule at all (``palate train --now`` works either way)."""
    time: str = "03:00"
    """Local wall-clock time of the nightly run, ``HH:MM`` (24 h)."""
    min_new_events: int = 20
    """New feedback events needed since the last completed run; 0 always trains."""
    require_ac: bool = True
    """Only train on mains power. Where power cannot be read, training is allowed."""
    require_idle_s: float = 300.0
    """Seconds without keyboard/mouse input needed (macOS only); 0 turns the check off."""
    grace_h: float = 24.0
    """How late a missed run may still start (e.g. after a night asleep); 24 = always once."""
    budget_h: float = 4.0
    """Wall-clock budget of one training run; the child is stopped after it."""
    memory_gb: float = 6.0
    """Resident-memory ceiling of the training child; it is stopped above it (0 = none)."""


#: Allowed ``[schedule]`` keys and the types their TOML values may have.
SCHEDULE_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": (bool,),
    "time": (str,),
    "min_new_events": (int,),
    "require_ac": (bool,),
    "require_idle_s": (int, float),
    "grace_h": (int, float),
    "budget_h": (int, float),
    "memory_gb": (int, float),
}


def parse_hhmm(text: str) -> tuple[int, int]:
    """``"03:00"`` -> ``(3, 0)``; anything else is an error naming the expected form."""
    hh, sep, mm = text.partition(":")
    if sep and hh.isdigit() and mm.isdigit() and len(mm) == 2:
        h, m = int(hh), int(mm)
        if 0 <= h < 24 and 0 <= m < 60:
            return h, m
    raise ValueError(f"time must be HH:MM in 24-hour local time, got {text!r}")


def _schedule(raw: Any, where: str) -> ScheduleConfig:
    def err(msg: str) -> PalateError:
        return PalateError("invalid_request", f"{where}: [schedule] {msg}")

    if not isinstance(raw, dict):
        raise err("must be a table")
    unknown = sorted(set(raw) - set(SCHEDULE_TYPES))
    if unknown:
        raise err(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SCHEDULE_TYPES)}")
    for key, value in raw.items():
        types = SCHEDULE_TYPES[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise err(f"{key} must be a {types[0].__name__}, got {type(value).__name__}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise err(f"{key} must not be negative")
    if "time" in raw:
        try:
            parse_hhmm(raw["time"])
        except ValueError as e:
            raise err(str(e)) from None
    if raw.get("budget_h", 1) == 0:
        raise err("budget_h must be more than 0")
    return ScheduleConfig(**raw)


@dataclass(frozen=True)
class PolicyConfig:
    """The ``[policy]`` table: the optional nightly DPO policy run (docs/generation.md).

    A table of its own rather than a ``[train]`` key: ``[train]`` holds the reward model's
    knobs (every key is checked against ``palate.model.training.TrainConfig``), and a policy
    adapter has other knobs (``palate.generation.dpo.PolicyTrainConfig``: loss, beta, lr...).
    So ``[policy]`` holds the switch, the two knobs of the nightly run itself, and any
    ``PolicyTrainConfig`` key, which the run checks when it builds that config (an unknown
    one is reported as the policy part's error, never failing the reward model's run).
    """

    nightly: bool = False
    """Train, judge and gate a policy adapter after every nightly reward-model run."""
    max_examples: int = 256
    """The newest training-side examples it trains on (its cost grows with them)."""
    win_prompts: int = 16
    """Held-out prompts sampled (2 samples each) for the win rate and KL."""
    train: Mapping[str, Any] = field(default_factory=dict)
    """Every other key of the table: ``PolicyTrainConfig`` overrides."""


#: The ``[policy]`` keys of the nightly run itself, with their types (the rest train).
POLICY_TYPES: dict[str, type] = {"nightly": bool, "max_examples": int, "win_prompts": int}


def _policy(raw: Any, where: str) -> PolicyConfig:
    def err(msg: str) -> PalateError:
        return PalateError("invalid_request", f"{where}: [policy] {msg}")

    if not isinstance(raw, dict):
        raise err("must be a table")
    own = {k: v for k, v in raw.items() if k in POLICY_TYPES}
    for key, value in own.items():
        typ = POLICY_TYPES[key]
        if isinstance(value, bool) is not (typ is bool) or not isinstance(value, typ):
            raise err(f"{key} must be a {typ.__name__}, got {type(value).__name__}")
    if own.get("max_examples", 1) < 1:
        raise err("max_examples must be at least 1")
    if own.get("win_prompts", 0) < 0:
        raise err("win_prompts must not be negative")
    train = {k: v for k, v in raw.items() if k not in POLICY_TYPES}
    return PolicyConfig(**own, train=train)


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
    """Overrides of training knobs ([train] table; keys of palate.model.training.TrainConfig)."""
    gate: dict[str, Any] = field(default_factory=dict)
    """Overrides of the gate policy ([gate] table; keys of palate.evaluation.gate.GatePolicy)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """When training runs by itself and what it waits for ([schedule] table)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The optional nightly policy run ([policy] table; off unless ``nightly = true``)."""


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
    if "schedule" in data:
        data["schedule"] = _schedule(data["schedule"], str(paths.config_file))
    if "policy" in data:
        data["policy"] = _policy(data["policy"], str(paths.config_file))
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
