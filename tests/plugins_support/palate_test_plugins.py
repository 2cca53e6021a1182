"""Adapters used only by the tests (loaded through config ``module = ...``)."""

from __future__ import annotations

import signal
import time
from typing import Any, ClassVar


class Crashy:
    """Sends one event, then crashes: the supervisor must restart it with backoff."""

    name = "crashy"
    api_version = 1
    options: ClassVar[dict[str, Any]] = {}

    def run(self, ctx: Any) -> None:
        ev = {"kind": "rating", "id": "crashy-1", "prompt": "p", "response": "r", "label": 1}
        ctx.emit([ev])
        raise RuntimeError("boom: crashy adapter crashed on purpose")


class Stubborn:
    """Ignores SIGTERM: stop() must fall back to SIGKILL after its timeout."""

    name = "stubborn"
    api_version = 1
    options: ClassVar[dict[str, Any]] = {}

    def run(self, ctx: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(0.2)


class OldSpec:
    """Declares a hook api this Palate does not speak: skipped, never restarted."""

    name = "oldspec"
    api_version = 0
    options: ClassVar[dict[str, Any]] = {}

    def run(self, ctx: Any) -> None:  # pragma: no cover - never loaded
        raise AssertionError("must not run")
