"""Voice transcripts: turn conversations with a voice agent into ratings.

Watched folder (option ``dirs``, default ``<PALATE_HOME>/voice/``) holding

* ``*.jsonl``: the generic turn format, one turn per line, appended live::

    {"session": "call-42", "id": "t7", "ts": 1755850003.9, "role": "user",
     "text": "No, I said Tuesday.", "confidence": 0.93}
    {"session": "call-42", "role": "assistant", "text": "...", "interrupted": true}
    {"session": "call-42", "role": "user", "feedback": "down"}   # a UI button

  ``role`` is ``user`` or ``assistant``; ``text`` is required except on a
  ``feedback`` line (``up``/``down``). ``session`` (default: the file), ``id``,
  ``ts`` (Unix s), ``interrupted`` and ``confidence`` (ASR, 0..1) are optional.
* ``*.json``: a LiveKit Agents export, ``session.history.to_dict()`` (``{"items":
  [...]}``) or a session report (``{"chat_history": {"items": [...]}, ...}``);
  read whenever the file is complete and its content changed.

Every assistant answer A (consecutive assistant messages joined), its prompt P
(the user turn(s) before it) and the follow-up F (the next user turn) are judged
by :func:`judge`; rules in order, the first group that fires decides:

1. explicit: a ``feedback`` button, or F says "thumbs up/down", "that's wrong",
   "that's right", ... -> label +1/-1, weight 1.0;
2. implicit negatives: A was interrupted (0.3), F is a correction ("no, ...",
   "I said ...", "actually ..."; a "no" answering a question is not) (0.4), F
   repeats P (word-sequence similarity >= 0.75) (0.4) -> label -1, weight = the
   largest that fired;
3. implicit positive: F thanks ("thanks", "great", "perfect") -> +1, weight 0.2.

An answer with no follow-up yet is not judged (the user may still react). F's
ASR confidence, when known, becomes the event's ``confidence``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from palate.adapters import AdapterContext, Candidate
from palate.adapters.code_context import parse_ts
from palate.adapters.tailing import (
    BadRecord,
    DocumentParser,
    Line,
    Options,
    RecordParser,
    TailingAdapter,
    expand,
)
from palate.paths import default_home

W_EXPLICIT = 1.0
W_INTERRUPTED = 0.3
W_CORRECTION = 0.4
W_REPEATED = 0.4
W_THANKS = 0.2
REPEAT_SIMILARITY = 0.75
MAX_SESSIONS = 64
MAX_LINES_PER_TURN = 8

_EXPLICIT_NEG = re.compile(
    r"\b(thumbs? down|that'?s (wrong|incorrect|not (right|correct|true|it|what i "
    r"(asked|wanted|meant|said)))|(you'?re|you are) wrong|wrong answer|bad answer|not helpful)\b"
)
_EXPLICIT_POS = re.compile(
    r"\b(thumbs? up|that'?s (right|correct|exactly (right|it)|perfect)|(you'?re|you are) right"
    r"|good answer|great answer|well done|exactly right)\b"
)
_CORRECTION = re.compile(r"^(no|nope|not quite|actually|wait|i said|i meant|i asked)\b")
_PLAIN_NO = re.compile(r"^(no|nope)\b(?!.*\bi (said|meant|asked)\b)")
_THANKS = re.compile(r"\b(thanks|thank you|great|perfect|awesome)\b")


@dataclass
class Turn:
    role: str
    text: str
    id: str
    ts: float | None = None
    interrupted: bool = False
    confidence: float | None = None
    feedback: int | None = None


@dataclass
class Verdict:
    label: int
    weight: float
    rule: str


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", _norm(text))


def repeated(prompt: str, follow: str) -> bool:
    """Is ``follow`` the same question as ``prompt`` asked again?"""
    a, b = _words(prompt), _words(follow)
    if min(len(a), len(b)) < 3:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= REPEAT_SIMILARITY


def judge(prompt: Turn, answer: Turn, follow: Turn | None) -> Verdict | None:
    """The rating an answer earns from what happened around it (module docstring)."""
    text = _norm(follow.text) if follow is not None else ""
    if follow is not None:
        if follow.feedback in (1, -1):
            return Verdict(follow.feedback, W_EXPLICIT, "feedback")
        if _EXPLICIT_NEG.search(text):
            return Verdict(-1, W_EXPLICIT, "explicit")
        if _EXPLICIT_POS.search(text):
            return Verdict(1, W_EXPLICIT, "explicit")
    fired: list[tuple[float, str]] = []
    if answer.interrupted:
        fired.append((W_INTERRUPTED, "interrupted"))
    if follow is not None and text:
        asked = answer.text.rstrip().endswith("?")
        if _CORRECTION.match(text) and not (asked and _PLAIN_NO.match(text)):
            fired.append((W_CORRECTION, "correction"))
        if repeated(prompt.text, follow.text):
            fired.append((W_REPEATED, "repeated"))
    if fired:
        return Verdict(-1, max(w for w, _ in fired), "+".join(r for _, r in fired))
    if follow is not None and _THANKS.search(text) and not _PLAIN_NO.match(text):
        return Verdict(1, W_THANKS, "thanks")
    return None


def rating(
    app: str,
    event_id: str,
    prompt: Turn,
    answer: Turn,
    follow: Turn | None,
    v: Verdict,
    conversation: str = "",
) -> Candidate:
    """The rating event; ``conversation`` (the call) keeps every turn of it on one side of the
    held-out split."""
    ctx = {"app": app, "domain": "voice", "task": "conversation"}
    if conversation:
        ctx["conversation"] = conversation_id(conversation)
    ev: dict[str, Any] = {
        "kind": "rating",
        "id": event_id,
        "prompt": prompt.text,
        "response": answer.text,
        "label": v.label,
        "weight": v.weight,
        "context": ctx,
    }
    ts = (follow.ts if follow is not None else None) or answer.ts
    if ts is not None:
        ev["ts"] = ts
    if follow is not None and follow.confidence is not None and v.rule != "interrupted":
        ev["confidence"] = follow.confidence
    return Candidate(ev, (f"app:{app}",))


def conversation_id(*parts: str) -> str:
    """``voice:<16 hex>``: one call, named by a hash of where it came from (file, session)."""
    return "voice:" + hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


def _join(turns: list[Turn]) -> Turn:
    first = turns[0]
    return Turn(
        role=first.role,
        text="\n".join(t.text for t in turns if t.text),
        id=first.id,
        ts=turns[-1].ts or first.ts,
        interrupted=any(t.interrupted for t in turns),
        confidence=min((t.confidence for t in turns if t.confidence is not None), default=None),
    )


def rate_conversation(turns: list[Turn]) -> list[tuple[Turn, Turn, Turn, Verdict]]:
    """Judge every answer of a complete transcript that has a follow-up."""
    out = []
    prompt: list[Turn] = []
    answer: list[Turn] = []
    for t in turns:
        if t.role == "assistant":
            if prompt:
                answer.append(t)
            continue
        if t.feedback is not None and not t.text:
            if prompt and answer:
                v = judge(_join(prompt), _join(answer), t)
                if v is not None:
                    out.append((_join(prompt), _join(answer), t, v))
            continue
        if answer:
            v = judge(_join(prompt), _join(answer), t)
            if v is not None:
                out.append((_join(prompt), _join(answer), t, v))
            prompt, answer = [], []
        prompt.append(t)
    return out


# --- the generic JSONL turn format (streamed) ----------------------------------------

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "agent": "assistant"}


def turn_from_json(rec: Any, fallback_id: str) -> tuple[str, Turn]:
    """(session, Turn) from one line of the generic format; BadRecord if unusable."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    role = _ROLES.get(str(rec.get("role", "")).lower())
    if role is None:
        raise BadRecord("role must be user or assistant")
    raw_feedback = rec.get("feedback")
    if raw_feedback is not None and raw_feedback not in ("up", "down"):
        raise BadRecord("feedback must be up or down")
    feedback = None if raw_feedback is None else (1 if raw_feedback == "up" else -1)
    text = rec.get("text", "")
    if not isinstance(text, str) or (not text.strip() and feedback is None):
        raise BadRecord("text must be a non-empty string")
    conf = rec.get("confidence")
    conf = float(conf) if isinstance(conf, (int, float)) and 0 <= conf <= 1 else None
    ident = rec.get("id") if isinstance(rec.get("id"), str) and rec.get("id") else fallback_id
    turn = Turn(
        role=role,
        text=text.strip(),
        id=str(ident)[:80],
        ts=parse_ts(rec.get("ts")),
        interrupted=rec.get("interrupted") is True,
        confidence=conf,
        feedback=feedback,
    )
    return str(rec.get("session") or ""), turn


class TurnParser:
    """Streams the generic format; per session it keeps only byte offsets of P and A."""

    def __init__(self, app: str = "voice") -> None:
        self.app = app

    def _reread(self, line: Line, offsets: list[int]) -> list[Turn]:
        turns = []
        for off in offsets:
            raw = line.read_at(off)
            if raw is None:
                continue
            other = Line(line.path, off, raw, line.fid, line.adapter)
            try:
                turns.append(turn_from_json(json.loads(raw), other.event_id("turn"))[1])
            except (ValueError, BadRecord):
                continue
        return turns

    def parse(self, line: Line, state: dict[str, Any]) -> list[Candidate]:
        session, turn = turn_from_json(line.json(), line.event_id("turn"))
        sessions: dict[str, dict[str, list[int]]] = state.setdefault("s", {})
        s = sessions.pop(session, None) or {"u": [], "a": []}
        sessions[session] = s  # most recent last
        while len(sessions) > MAX_SESSIONS:
            sessions.pop(next(iter(sessions)))
        out: list[Candidate] = []
        if turn.role == "assistant":
            if s["u"] and len(s["a"]) < MAX_LINES_PER_TURN:
                s["a"].append(line.offset)
            return out
        if s["a"]:
            prompt, answer = self._reread(line, s["u"]), self._reread(line, s["a"])
            if prompt and answer:
                p, a = _join(prompt), _join(answer)
                v = judge(p, a, turn)
                if v is not None:
                    ident = f"voice:{session[:40]}:{a.id}"
                    call = f"{line.fid}\x00{session}"
                    out.append(rating(self.app, ident, p, a, turn, v, conversation=call))
        if turn.feedback is not None and not turn.text:
            return out  # a button press judges the answer; it is not a new prompt
        if s["a"]:
            s["u"], s["a"] = [], []
        if len(s["u"]) < MAX_LINES_PER_TURN:
            s["u"].append(line.offset)
        return out


# --- LiveKit Agents exports (whole documents) ----------------------------------------


def livekit_turns(doc: Any) -> list[Turn]:
    """Turns from ``history.to_dict()`` or a session report; BadRecord if neither."""
    if isinstance(doc, dict) and isinstance(doc.get("chat_history"), dict):
        doc = doc["chat_history"]
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise BadRecord("not a LiveKit export: expected {items: [...]} or {chat_history: ...}")
    turns = []
    for item in doc["items"]:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            continue
        role = item.get("role")
        if role not in ("user", "assistant"):
            continue
        parts = [c for c in item.get("content") or [] if isinstance(c, str)]
        text = "\n".join(parts).strip()
        if not text or not isinstance(item.get("id"), str):
            continue
        conf = item.get("transcript_confidence")
        turns.append(
            Turn(
                role=role,
                text=text,
                id=item["id"][:80],
                ts=parse_ts(item.get("created_at")),
                interrupted=item.get("interrupted") is True,
                confidence=float(conf) if isinstance(conf, (int, float)) else None,
            )
        )
    return turns


class LiveKitParser:
    def __init__(self, app: str = "livekit") -> None:
        self.app = app

    def parse_document(self, path: Path, data: bytes, fid: str) -> list[Candidate]:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRecord(f"not (yet) a complete JSON document: {e}") from e
        return [
            rating(self.app, f"livekit:{a.id}", p, a, f, v, conversation=fid)
            for p, a, f, v in rate_conversation(livekit_turns(doc))
        ]


class VoiceAdapter(TailingAdapter):
    """Watches transcript folders: generic ``*.jsonl`` turns and LiveKit ``*.json``."""

    name = "voice"
    patterns = ("*.jsonl",)
    documents = ("*.json",)
    options: ClassVar[Options] = {**TailingAdapter.options, "dirs": list, "app": str}

    def roots(self, ctx: AdapterContext) -> list[Path]:
        dirs = ctx.options.get("dirs") or [str((ctx.home or default_home()) / "voice")]
        return [expand(str(d)) for d in dirs]

    def parser(self, ctx: AdapterContext) -> RecordParser:
        return TurnParser(str(ctx.options.get("app", "voice")))

    def document_parser(self, ctx: AdapterContext) -> DocumentParser:
        return LiveKitParser()
