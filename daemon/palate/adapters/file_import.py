"""Importing feedback from JSONL files: parse, validate locally, send in batches.

Used by ``palate feedback --file`` and by anything else that bulk-loads events.
Lines are validated here first (with the same rules the daemon applies) so one
bad line is reported with its line number instead of failing a whole batch;
the daemon validates again, because the socket trusts no client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palate.errors import PalateError
from palate.events import MAX_BATCH, from_simple, validate_event
from palate.wire.client import Client

#: Events per ``ingest_batch``; large enough to amortise a commit, small enough
#: to stay far below the frame limit with long texts.
DEFAULT_BATCH = 500
#: Characters of text per batch; x4 (worst-case UTF-8) stays below the 4 MiB frame.
MAX_BATCH_CHARS = 800_000


@dataclass
class Rejection:
    line: int
    reason: str


@dataclass
class ImportSummary:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": len(self.rejected),
            "rejections": [{"line": r.line, "reason": r.reason} for r in self.rejected],
            "seconds": round(self.seconds, 3),
        }


def parse_lines(path: Path, source: str, summary: ImportSummary) -> Iterator[dict[str, Any]]:
    """Yield validated events from a JSONL file; record every bad line in ``summary``."""
    try:
        fh = path.open("rb")
    except OSError as e:
        raise PalateError("not_found", f"cannot read {path}: {e.strerror}") from e
    now = time.time()
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            summary.lines += 1
            try:
                # Without its line ending: parsed with it, an error at the end of a truncated
                # line is reported at column 1 of the (empty) line after it.
                text = raw.rstrip(b"\r\n").decode("utf-8")
                obj = json.loads(text)
            except UnicodeDecodeError:
                summary.rejected.append(Rejection(lineno, "line is not valid UTF-8"))
                continue
            except json.JSONDecodeError as e:
                cut = "; the line ends there: is it cut short?" if e.pos >= len(text) else ""
                summary.rejected.append(
                    Rejection(lineno, f"not valid JSON ({e.msg} at column {e.colno}{cut})")
                )
                continue
            try:
                yield validate_event(from_simple(obj, source), now=now)
            except PalateError as e:
                reasons = (
                    "; ".join(f"{x['field']} {x['reason']}" for x in e.details.get("errors", []))
                    or e.message
                )
                summary.rejected.append(Rejection(lineno, reasons))


def import_file(
    client: Client,
    path: Path,
    *,
    source: str = "cli",
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Send every valid line of ``path`` to the daemon; return what happened.

    Each batch is acknowledged only after its durable commit, so an interrupted
    import can simply be rerun: ids derived from content make it idempotent.
    """
    batch = max(1, min(batch, MAX_BATCH))
    summary = ImportSummary()
    t0 = time.perf_counter()
    pending: list[dict[str, Any]] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not pending:
            return
        res = client.ingest_batch(pending)
        summary.accepted += int(res["accepted"])
        summary.duplicates += int(res["duplicates"])
        if progress is not None:
            progress(len(pending))
        pending.clear()
        size = 0

    for ev in parse_lines(path, source, summary):
        ev_size = _chars(ev)
        if pending and (len(pending) >= batch or size + ev_size > MAX_BATCH_CHARS):
            flush()
        pending.append(ev)
        size += ev_size
    flush()
    summary.seconds = time.perf_counter() - t0
    return summary


def _chars(ev: dict[str, Any]) -> int:
    n = 0
    for v in ev.values():
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, list):
            n += sum(len(x) for x in v)
    return n
