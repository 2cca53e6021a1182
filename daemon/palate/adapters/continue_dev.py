"""Continue (continuedev/continue): the dev-data JSONL files it always writes locally.

Files (core/util/paths.ts, core/data/log.ts): ``<root>/dev_data/<schema>/<event>.jsonl``
with ``<root>`` = ``$CONTINUE_GLOBAL_DIR`` or ``~/.continue``; schema ``0.2.0``
today and ``0.1.0`` for migrated legacy files, both read. One JSON object per
line, appended, never rotated. Fields follow
``packages/config-yaml/src/schemas/data/`` (see docs/plugins.md for the mapping):

* ``autocomplete``: ``accepted: true`` -> rating +1 (weight 1.0); ``accepted:
  false`` -> rating -1 with weight 0.5, because Continue logs it when a shown
  completion was simply not taken within 10 s, a weaker signal than a click.
  No ``accepted`` -> no outcome, nothing sent. Prompt: prefix + cursor + suffix.
  The id is the record's ``completionId``, so a completion found in both the
  0.1.0 and 0.2.0 files is stored once.
* ``editOutcome``: accepted/rejected edit -> rating +1/-1 (weight 1.0) on the
  instruction and the previous code, response the new code.
* ``chatFeedback``: the thumbs buttons: ``feedback`` true/false -> rating +1/-1
  (weight 1.0); without ``feedback`` nothing is sent. Continue logs the prompt as the
  model saw it: every turn rendered by a template (core/llm/index.ts
  ``_formatChatMessages``: ``<role>\ncontent\n\n``; or a model's own: ChatML,
  Llama 3, ...), system prompt included. The conversation turns are taken back out
  (:func:`chat_turns`), the system prompt and tool output dropped, and the prompt is
  the transcript ``Human: ...\n\nAssistant: ...`` the reward model renders with its
  own template. ``sessionId`` is the conversation id (one chat on one side of the
  held-out split).
* ``nextEditOutcome``: a proposed rewrite of the editable region around the cursor.
  ``accepted: true`` -> pair (rewrite over ``originalEditableRange``), weight 1.0;
  ``accepted: false`` -> pair (original over rewrite), weight 0.5 (shown, not taken);
  ``aborted`` (the user typed on) -> nothing. Prompt: ``userExcerpts`` (the file window
  the model saw) with its cursor marker as the editor prompt's ``<|cursor|>``.

Records of the ``noCode`` level (no prefix/completion text) carry nothing to
learn from and are skipped silently; malformed lines are reported and skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, ClassVar

from palate.adapters import AdapterContext, Candidate
from palate.adapters.code_context import (
    CURSOR,
    code_prompt,
    context,
    local_path,
    nonblank,
    parse_ts,
)
from palate.adapters.tailing import BadRecord, Line, Options, RecordParser, TailingAdapter, expand

EVENTS = ("autocomplete", "editOutcome", "chatFeedback", "nextEditOutcome")
#: Cursor markers of Continue's next-edit prompt templates (core/nextEdit/constants.ts).
NEXT_EDIT_CURSORS = ("<|user_cursor_is_here|>", CURSOR)
#: Roles whose turns are kept; system prompts, tool output and thinking are not the user's.
_KEPT_ROLES = {"user": "Human", "assistant": "Assistant"}
_TEMPLATES = (
    # core/llm/index.ts _formatChatMessages: "<role>\ncontent\n\n" per message.
    re.compile(r"(?:^|\n\n)<(system|user|assistant|tool|thinking)>\n"),
    # ChatML: "<|im_start|>role\ncontent<|im_end|>".
    re.compile(r"(?:<\|im_end\|>\s*)?<\|im_start\|>(system|user|assistant|tool)\n"),
    # Llama 3: "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>".
    re.compile(
        r"(?:<\|eot_id\|>)?(?:<\|begin_of_text\|>)?<\|start_header_id\|>"
        r"(system|user|assistant|tool|ipython)<\|end_header_id\|>\n\n"
    ),
)
_END_MARKERS = re.compile(r"<\|im_end\|>|<\|eot_id\|>|<\|end_of_text\|>")
_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,80}$")

W_EXPLICIT = 1.0
W_TIMEOUT_REJECT = 0.5


def _record_id(prefix: str, value: Any, line: Line, kind: str) -> str:
    if isinstance(value, str) and value:
        if _SAFE_ID.match(value):
            return f"{prefix}:{value}"
        return f"{prefix}:{hashlib.sha256(value.encode()).hexdigest()[:32]}"
    return line.event_id(kind)


class ContinueParser:
    """One Continue dev-data line -> at most one rating."""

    def __init__(self, prefix_chars: int = 6000) -> None:
        self.prefix_chars = prefix_chars

    def parse(self, line: Line, state: dict[str, Any]) -> list[Candidate]:
        rec = line.json()
        if not isinstance(rec, dict):
            raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
        name = rec.get("eventName") or line.path.stem
        if name == "autocomplete":
            return self._autocomplete(rec, line)
        if name == "editOutcome":
            return self._edit_outcome(rec, line)
        if name == "chatFeedback":
            return self._chat_feedback(rec, line)
        if name == "nextEditOutcome":
            return self._next_edit(rec, line)
        return []

    @staticmethod
    def _bool(rec: dict[str, Any], key: str) -> bool | None:
        value = rec.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise BadRecord(f"{key} must be true or false, got {type(value).__name__}")
        return value

    def _autocomplete(self, rec: dict[str, Any], line: Line) -> list[Candidate]:
        accepted = self._bool(rec, "accepted")
        completion = nonblank(rec.get("completion"))
        if accepted is None or completion is None:
            return []
        prefix, suffix = rec.get("prefix"), rec.get("suffix")
        if not isinstance(prefix, str) or not isinstance(suffix, (str, type(None))):
            raise BadRecord("prefix and suffix must be strings")
        filepath = rec.get("filepath") if isinstance(rec.get("filepath"), str) else None
        ev: dict[str, Any] = {
            "kind": "rating",
            "id": _record_id("continue:ac", rec.get("completionId"), line, "ac"),
            "prompt": code_prompt(prefix, suffix or "", prefix_chars=self.prefix_chars),
            "response": completion,
            "label": 1 if accepted else -1,
            "weight": W_EXPLICIT if accepted else W_TIMEOUT_REJECT,
            "context": context("continue", "autocomplete", filepath),
        }
        return [self._with_ts(ev, rec, filepath)]

    def _edit_outcome(self, rec: dict[str, Any], line: Line) -> list[Candidate]:
        accepted = self._bool(rec, "accepted")
        instruction = nonblank(rec.get("prompt"))
        new = nonblank(rec.get("newCode")) or nonblank(rec.get("completion"))
        if accepted is None or instruction is None or new is None:
            return []
        previous = rec.get("previousCode")
        prompt = instruction
        if isinstance(previous, str) and previous.strip():
            prompt = f"{instruction}\n\n{previous[-self.prefix_chars :]}"
        filepath = rec.get("filepath") if isinstance(rec.get("filepath"), str) else None
        ev = {
            "kind": "rating",
            "id": line.event_id("edit"),
            "prompt": prompt,
            "response": new,
            "label": 1 if accepted else -1,
            "weight": W_EXPLICIT,
            "context": context("continue", "edit", filepath),
        }
        return [self._with_ts(ev, rec, filepath)]

    def _chat_feedback(self, rec: dict[str, Any], line: Line) -> list[Candidate]:
        feedback = self._bool(rec, "feedback")
        prompt, completion = nonblank(rec.get("prompt")), nonblank(rec.get("completion"))
        if feedback is None or prompt is None or completion is None:
            return []
        ctx = {"app": "continue", "task": "chat"}
        session = rec.get("sessionId")
        if isinstance(session, str) and _SAFE_ID.match(session):
            ctx["conversation"] = f"continue:{session}"
        ev = {
            "kind": "rating",
            "id": line.event_id("chat"),
            "prompt": transcript(prompt),
            "response": completion,
            "label": 1 if feedback else -1,
            "weight": W_EXPLICIT,
            "context": ctx,
        }
        return [self._with_ts(ev, rec, None)]

    def _next_edit(self, rec: dict[str, Any], line: Line) -> list[Candidate]:
        accepted = self._bool(rec, "accepted")
        if accepted is None or rec.get("aborted") is True:
            return []
        new, old = nonblank(rec.get("completion")), nonblank(rec.get("originalEditableRange"))
        excerpt = nonblank(rec.get("userExcerpts")) or nonblank(rec.get("prompt"))
        if new is None or excerpt is None:
            return []
        for marker in NEXT_EDIT_CURSORS:
            if excerpt.count(marker) == 1:
                before, after = excerpt.split(marker)
                prompt = code_prompt(before, after, prefix_chars=self.prefix_chars)
                break
        else:
            prompt = excerpt[-self.prefix_chars :]
        filepath = rec.get("fileUri") if isinstance(rec.get("fileUri"), str) else None
        ev: dict[str, Any] = {
            "id": _record_id("continue:ne", rec.get("completionId"), line, "ne"),
            "prompt": prompt,
            "weight": W_EXPLICIT if accepted else W_TIMEOUT_REJECT,
            "context": context("continue", "next_edit", filepath),
        }
        if old is not None and old.strip() != new.strip():
            ev.update(
                kind="pair", chosen=new if accepted else old, rejected=old if accepted else new
            )
        else:
            ev.update(kind="rating", response=new, label=1 if accepted else -1)
        return [self._with_ts(ev, rec, filepath)]

    @staticmethod
    def _with_ts(ev: dict[str, Any], rec: dict[str, Any], filepath: str | None) -> Candidate:
        ts = parse_ts(rec.get("timestamp"))
        if ts is not None:
            ev["ts"] = ts
        subjects = (local_path(filepath),) if filepath else ()
        return Candidate(ev, subjects)


def chat_turns(prompt: str) -> list[tuple[str, str]]:
    """(role, content) of each turn in a templated chat prompt; [] if no template matches."""
    for pattern in _TEMPLATES:
        parts = pattern.split(prompt)
        if len(parts) < 3 or parts[0].strip():
            continue
        turns = []
        for role, body in zip(parts[1::2], parts[2::2], strict=False):
            text = _END_MARKERS.sub("", body).strip()
            if text:
                turns.append((role, text))
        if any(role == "user" for role, _ in turns):
            return turns
    return []


def transcript(prompt: str) -> str:
    """The conversation of a templated chat prompt as ``Human: ...\n\nAssistant: ...`` turns
    (system prompt and tool output dropped); the prompt unchanged when no template matches."""
    turns = [(r, t) for r, t in chat_turns(prompt) if r in _KEPT_ROLES]
    while turns and turns[-1][0] == "assistant":
        turns.pop()  # an answer being generated is the response, not the prompt
    if not turns:
        return prompt
    return "\n\n".join(f"{_KEPT_ROLES[r]}: {t}" for r, t in turns)


class ContinueAdapter(TailingAdapter):
    """Tails ``dev_data/{0.1.0,0.2.0}/{autocomplete,editOutcome,chatFeedback,nextEditOutcome}``."""

    name = "continue"
    patterns = tuple(f"dev_data/{v}/{e}.jsonl" for v in ("0.2.0", "0.1.0") for e in EVENTS)
    options: ClassVar[Options] = {**TailingAdapter.options, "root": str, "prefix_chars": int}

    def roots(self, ctx: AdapterContext) -> list[Path]:
        root = ctx.options.get("root") or os.environ.get("CONTINUE_GLOBAL_DIR") or "~/.continue"
        return [expand(str(root))]

    def parser(self, ctx: AdapterContext) -> RecordParser:
        return ContinueParser(int(ctx.options.get("prefix_chars", 6000)))
