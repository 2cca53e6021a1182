"""Run a built-in adapter's parser over fixture files with a DryRun sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palate.adapters import AdapterContext, DryRun, load_adapter
from palate.adapters.redaction import Redactor


def dry_run(
    name: str, *files: Path, deny: tuple[str, ...] = ()
) -> tuple[list[dict[str, Any]], int]:
    adapter = load_adapter(name)
    events: list[dict[str, Any]] = []
    bad = 0
    for f in files:
        sink = DryRun()
        ctx = AdapterContext(name, sink=sink, redactor=Redactor(deny))
        adapter.dry_run(f, ctx)  # type: ignore[attr-defined]
        events += sink.events
        bad += ctx.bad_records
    return events, bad
