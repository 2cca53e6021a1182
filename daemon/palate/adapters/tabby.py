"""Tabby (TabbyML/tabby): completion events joined with what the user did with them.

Files (crates/tabby-common/src/path.rs, crates/tabby/src/services/event.rs):
``<root>/events/YYYY-MM-DD.json``, ``<root>`` = ``$TABBY_ROOT`` or ``~/.tabby``;
one file per UTC day holding **JSON lines** ``{"user", "ts" (unix ms), "event":
{<kind>: {...}}}`` (crates/tabby-common/src/api/event.rs). The writer flushes
every 5 s, so a partial last line is normal (the tailer holds it back).

A ``completion`` record carries the code context and the choices; the verdict
comes later in ``view`` / ``select`` / ``dismiss`` records with the same
``completion_id``. Pending completions are remembered by the *byte offset* of
their record (not their text) in the per-file cursor state, so the join
survives restarts and the state stays small; at most ``MAX_PENDING`` are kept.

Mapping (weights in docs/plugins.md):

* ``select``               -> rating +1, weight 1.0 (accepted)
* ``select`` with ``kind`` -> rating +1, weight 0.5 (partial accept: a line or word)
* ``dismiss``              -> rating -1, weight 0.5
* ``select`` of one choice -> also rating -1, weight 0.5, for every *other* choice of that
  completion that was viewed (shown, not selected). The ratings share the completion's
  prompt, so the evaluator derives the pair "selected over shown" (events.derive_pairs)
* ``view`` never followed by select/dismiss within ``VIEW_EXPIRY_MS`` of record
  time, or pushed out of the bounded pending set -> rating -1, weight 0.25
* a completion never viewed -> nothing (the user never saw it)

The first verdict wins (the id is ``tabby:<completion_id>:<choice>``). A verdict
for a completion this file never showed (e.g. across the UTC midnight file
switch) has nothing to join with and is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from palate.adapters import AdapterContext, Candidate
from palate.adapters.code_context import code_prompt, context, nonblank, parse_ts
from palate.adapters.tailing import BadRecord, Line, Options, RecordParser, TailingAdapter, expand

MAX_PENDING = 256
VIEW_EXPIRY_MS = 3_600_000

W_SELECT = 1.0
W_PARTIAL = 0.5
W_DISMISS = 0.5
W_NOT_SELECTED = 0.5
W_IGNORED = 0.25
#: Choices tracked per completion (a bit each in the pending entry's "viewed" mask).
MAX_CHOICES = 16


class TabbyParser:
    def __init__(self, prefix_chars: int = 6000) -> None:
        self.prefix_chars = prefix_chars

    def parse(self, line: Line, state: dict[str, Any]) -> list[Candidate]:
        rec = line.json()
        if not isinstance(rec, dict) or not isinstance(rec.get("event"), dict):
            raise BadRecord("expected {user, ts, event: {...}}")
        ts = rec.get("ts")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise BadRecord("ts must be unix milliseconds")
        ((kind, body),) = rec["event"].items() if len(rec["event"]) == 1 else ((None, None),)
        if not isinstance(body, dict):
            raise BadRecord("event must hold exactly one {kind: {...}}")
        pending: dict[str, list[Any]] = state.setdefault("p", {})
        out = self._expire(line, pending, int(ts))
        cid = body.get("completion_id")
        if kind not in ("completion", "view", "select", "dismiss"):
            return out
        if not isinstance(cid, str):
            raise BadRecord(f"{kind} record without a completion_id")
        if kind == "completion":
            pending.pop(cid, None)
            pending[cid] = [line.offset, 0, int(ts)]  # re-insert: newest last
            out += self._bound(line, pending)
        elif kind == "view":
            if cid in pending:  # a bit per viewed choice (1 in older state = choice 0)
                pending[cid][1] = int(pending[cid][1]) | (1 << _choice(body))
        elif kind in ("select", "dismiss"):
            entry = pending.pop(cid, None)
            if entry is not None:
                choice = _choice(body)
                if kind == "dismiss":
                    label, weight = -1, W_DISMISS
                else:
                    label, weight = 1, W_PARTIAL if body.get("kind") else W_SELECT
                out += self._verdict(line, entry[0], choice, label, weight, int(ts))
                if kind == "select":
                    for other in _viewed(entry[1]) - {choice}:
                        out += self._verdict(line, entry[0], other, -1, W_NOT_SELECTED, int(ts))
        return out

    def _expire(self, line: Line, pending: dict[str, list[Any]], now_ms: int) -> list[Candidate]:
        out: list[Candidate] = []
        for cid in [c for c, e in pending.items() if now_ms - int(e[2]) > VIEW_EXPIRY_MS]:
            out += self._ignored(line, pending.pop(cid))
        return out

    def _bound(self, line: Line, pending: dict[str, list[Any]]) -> list[Candidate]:
        out: list[Candidate] = []
        while len(pending) > MAX_PENDING:
            oldest = next(iter(pending))
            out += self._ignored(line, pending.pop(oldest))
        return out

    def _ignored(self, line: Line, entry: list[Any]) -> list[Candidate]:
        out: list[Candidate] = []  # never shown: no signal
        for choice in sorted(_viewed(entry[1])):
            out += self._verdict(line, entry[0], choice, -1, W_IGNORED, int(entry[2]))
        return out

    def _verdict(
        self, line: Line, offset: int, choice: Any, label: int, weight: float, ts_ms: int
    ) -> list[Candidate]:
        raw = line.read_at(int(offset))
        if raw is None:
            return []
        try:
            comp = json.loads(raw.decode("utf-8"))["event"]["completion"]
        except (ValueError, KeyError, TypeError):
            return []
        choice = choice if isinstance(choice, int) and not isinstance(choice, bool) else 0
        text = next(
            (c.get("text") for c in comp.get("choices") or [] if c.get("index") == choice), None
        )
        if nonblank(text) is None:
            return []
        seg = comp.get("segments") if isinstance(comp.get("segments"), dict) else {}
        prefix = seg.get("prefix") if isinstance(seg.get("prefix"), str) else None
        if prefix is not None:
            suffix = seg["suffix"] if isinstance(seg.get("suffix"), str) else ""
            prompt = code_prompt(prefix, suffix, prefix_chars=self.prefix_chars)
        elif nonblank(comp.get("prompt")):
            prompt = comp["prompt"][-self.prefix_chars :]
        else:
            return []
        filepath = seg.get("filepath") if isinstance(seg.get("filepath"), str) else None
        ev: dict[str, Any] = {
            "kind": "rating",
            "id": f"tabby:{str(comp['completion_id'])[:100]}:{choice}",
            "prompt": prompt,
            "response": text,
            "label": label,
            "weight": weight,
            "context": context("tabby", "autocomplete", filepath, comp.get("language")),
        }
        ts = parse_ts(ts_ms, millis=True)
        if ts is not None:
            ev["ts"] = ts
        subjects = tuple(s for s in (filepath, seg.get("git_url")) if isinstance(s, str) and s)
        return [Candidate(ev, subjects)]


def _choice(body: dict[str, Any]) -> int:
    """The record's ``choice_index`` (0 when absent or not a small non-negative int)."""
    c = body.get("choice_index", 0)
    ok = isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_CHOICES
    return c if ok else 0


def _viewed(mask: Any) -> set[int]:
    m = int(mask) if isinstance(mask, int) else 0
    return {i for i in range(MAX_CHOICES) if m >> i & 1}


class TabbyAdapter(TailingAdapter):
    """Tails ``<root>/events/*.json`` (JSON lines despite the name)."""

    name = "tabby"
    patterns = ("events/*.json",)
    options: ClassVar[Options] = {**TailingAdapter.options, "root": str, "prefix_chars": int}

    def roots(self, ctx: AdapterContext) -> list[Path]:
        root = ctx.options.get("root") or os.environ.get("TABBY_ROOT") or "~/.tabby"
        return [expand(str(root))]

    def parser(self, ctx: AdapterContext) -> RecordParser:
        return TabbyParser(int(ctx.options.get("prefix_chars", 6000)))
