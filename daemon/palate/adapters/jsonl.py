"""Generic JSONL: a documented line format any editor or script can append to.

Any tool that can append a line to a file can give Palate feedback without a
socket client: write JSON lines to ``*.jsonl`` files in a watched folder
(default ``<PALATE_HOME>/inbox/``; option ``dirs``). Each line is one of:

* a full v1 event (has ``kind``; docs/events.md);
* a short form of ``palate feedback --file`` (``{prompt, chosen, rejected}``,
  ``{prompt, response, label|score}``, ``{prompt, original, edited}``,
  ``{prompt, responses}``);
* the editor form ``{prompt, response, accepted: true|false}`` -> rating +1/-1.

Plus optional editor keys, removed before validation: ``file`` (path of the
edited file: checked against the deny list, gives ``context.language``),
``app``, ``language``, ``task`` (go into ``context``). ``source`` defaults to the
adapter option ``source`` (``jsonl``); ``id`` defaults to one derived from the
file and the line's position and bytes, so re-reading a file stores nothing twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from palate.adapters import AdapterContext, Candidate
from palate.adapters.code_context import language_of, local_path
from palate.adapters.tailing import BadRecord, Line, Options, RecordParser, TailingAdapter, expand
from palate.events import from_simple
from palate.paths import default_home

EDITOR_KEYS = ("file", "app", "language", "task", "accepted")


class JsonlParser:
    def __init__(self, source: str = "jsonl") -> None:
        self.source = source

    def parse(self, line: Line, state: dict[str, Any]) -> list[Candidate]:
        rec = line.json()
        if not isinstance(rec, dict):
            raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
        ev = {k: v for k, v in rec.items() if k not in EDITOR_KEYS}
        accepted = rec.get("accepted")
        if "accepted" in rec:
            if not isinstance(accepted, bool):
                raise BadRecord("accepted must be true or false")
            if "label" in ev or "score" in ev:
                raise BadRecord("give accepted or label/score, not both")
            ev["label"] = 1 if accepted else -1
        ev = from_simple(ev, self.source)
        file = rec.get("file") if isinstance(rec.get("file"), str) else None
        raw_ctx = ev.get("context")
        ctx = dict(raw_ctx) if isinstance(raw_ctx, dict) else ({} if raw_ctx is None else None)
        if ctx is not None:
            for key in ("app", "task", "language"):
                if isinstance(rec.get(key), str) and rec[key].strip():
                    ctx.setdefault(key, rec[key][:128])
            if "language" not in ctx and language_of(file):
                ctx["language"] = language_of(file)
            if ctx:
                ev["context"] = ctx
        ev.setdefault("id", line.event_id("line"))
        return [Candidate(ev, (local_path(file),) if file else ())]


class JsonlAdapter(TailingAdapter):
    """Tails ``*.jsonl`` in the configured folders."""

    name = "jsonl"
    patterns = ("*.jsonl",)
    options: ClassVar[Options] = {**TailingAdapter.options, "dirs": list, "source": str}

    def roots(self, ctx: AdapterContext) -> list[Path]:
        dirs = ctx.options.get("dirs") or [str((ctx.home or default_home()) / "inbox")]
        return [expand(str(d)) for d in dirs]

    def parser(self, ctx: AdapterContext) -> RecordParser:
        return JsonlParser(str(ctx.options.get("source", "jsonl")))
