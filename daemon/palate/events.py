"""Feedback events, schema v1: validation and conversion to training examples.

Every way feedback reaches Palate (the socket, the CLI, adapters) goes through
:func:`validate_event`, so one set of rules holds everywhere. A rejection names
every offending field and why, all at once, so a plugin author fixes an event in
one round trip. docs/events.md is the contract. This module does no I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from palate.errors import PalateError, brief

SCHEMA_VERSION = 1
KINDS = ("pair", "rating", "edit", "ranking")

MAX_ID_LEN = 128
MAX_SOURCE_LEN = 64
MAX_TEXT_CHARS = 200_000
MAX_RANKING = 32
MAX_CONTEXT_VALUE = 128
MAX_WEIGHT = 100.0
MAX_BATCH = 2_000
#: Timestamps before this (2000-01-01) are surely a unit mistake (ms vs s).
MIN_TS = 946_684_800.0
#: Clock skew tolerated for timestamps from the future.
MAX_FUTURE_S = 86_400.0

_ID_RE = re.compile(r"^[\x21-\x7e]+$")
_SOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")

COMMON_FIELDS = {"id", "kind", "source", "ts", "context", "weight", "confidence", "v"}
KIND_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required, optional)
    "pair": ({"prompt", "chosen", "rejected"}, {"margin"}),
    "rating": ({"prompt", "response"}, {"label", "score"}),
    "edit": ({"prompt", "original", "edited"}, set()),
    "ranking": ({"prompt", "responses"}, set()),
}
_ALLOWED = {k: frozenset(COMMON_FIELDS | r | o) for k, (r, o) in KIND_FIELDS.items()}
CONTEXT_KEYS = {"app", "domain", "language", "task", "conversation"}
#: Where an editor's cursor was in a code prompt (``prefix<|cursor|>suffix``, docs/plugins.md).
#: The held-out split keys code on the region around it and truncation keeps the code nearest it.
CODE_CURSOR = "<|cursor|>"
#: The fields whose text is the user's content (hashed for derived ids, never logged).
CONTENT_FIELDS = ("prompt", "chosen", "rejected", "response", "original", "edited", "responses")


class _Errors:
    """Collects every problem with one event before raising once."""

    def __init__(self, prefix: str = "") -> None:
        self.items: list[dict[str, str]] = []
        self.prefix = prefix

    def add(self, field: str, reason: str) -> None:
        self.items.append({"field": self.prefix + field, "reason": reason})


def _text(obj: Mapping[str, Any], field: str, errs: _Errors, *, name: str | None = None) -> str:
    label = name or field
    if field not in obj:
        return ""  # reported once, with what the kind needs, by _missing
    value = obj.get(field)
    if not isinstance(value, str):
        errs.add(label, f"must be a string, got {_type_name(value)}")
        return ""
    return _check_text(value, label, errs)


def _check_text(value: str, label: str, errs: _Errors) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        errs.add(label, "is not valid UTF-8")
        return ""
    if not value.strip():
        errs.add(label, "must not be empty or blank")
    elif len(value) > MAX_TEXT_CHARS:
        errs.add(label, f"is {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def validate_event(
    obj: Any, *, now: float | None = None, index: int | None = None
) -> dict[str, Any]:
    """Check one event and return its canonical form (what the store keeps).

    ``ts`` defaults to ``now`` and ``id`` to :func:`derive_id` when absent, so a
    client that resends the same content is idempotent without inventing ids.
    Raises ``PalateError('invalid_event')`` whose ``details['errors']`` lists
    ``{field, reason}`` for every problem (fields prefixed ``events[i].`` when
    ``index`` is given).
    """
    errs = _Errors("" if index is None else f"events[{index}].")
    if not isinstance(obj, Mapping):
        errs.add("event", f"must be a map, got {_type_name(obj)}")
        raise _invalid(errs)
    now = time.time() if now is None else now
    kind = obj.get("kind")
    if kind is None and "kind" not in obj:
        errs.add("kind", f"is missing; {_SHAPES}")
        raise _invalid(errs)
    if kind not in KINDS:
        errs.add("kind", f"must be one of {', '.join(KINDS)}; got {brief(kind)}")
        raise _invalid(errs)
    allowed = _ALLOWED[kind]
    for key in obj:
        if key not in allowed:
            errs.add(str(key)[:64], f"is not a field of a {kind} event (schema v1)")
    if "v" in obj and obj["v"] != SCHEMA_VERSION:
        errs.add("v", f"schema version {brief(obj['v'])} is not supported; this daemon speaks 1")

    out: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": kind}
    source = obj.get("source")
    if not isinstance(source, str) or not source:
        errs.add("source", f"must be a non-empty string, got {_type_name(source)}")
    elif len(source) > MAX_SOURCE_LEN or not _SOURCE_RE.match(source):
        errs.add(
            "source",
            f"must be 1-{MAX_SOURCE_LEN} characters of letters, digits and ._:/- "
            "starting with a letter or digit",
        )
    out["source"] = source

    ts = obj.get("ts", now)
    tsf = _number(ts)
    if tsf is None:
        errs.add("ts", f"must be a finite number of Unix seconds, got {_type_name(ts)}")
    elif tsf < MIN_TS:
        errs.add("ts", "is before 2000-01-01; send Unix seconds, not milliseconds or days")
    elif tsf > now + MAX_FUTURE_S:
        errs.add("ts", "is more than a day in the future")
    out["ts"] = tsf

    _kind_fields(kind, obj, out, errs)
    _optional_common(obj, out, errs)

    if "id" in obj:
        ident = obj["id"]
        if not isinstance(ident, str) or not ident:
            errs.add("id", f"must be a non-empty string, got {_type_name(ident)}")
        elif len(ident) > MAX_ID_LEN or not _ID_RE.match(ident):
            errs.add("id", f"must be 1-{MAX_ID_LEN} printable ASCII characters without spaces")
        out["id"] = ident
    if errs.items:
        raise _invalid(errs)
    if "id" not in out:
        out["id"] = derive_id(out)
    return out


#: What each kind needs, for the message about a line that is none of them.
_SHAPES = (
    "give {prompt, chosen, rejected} (a pair), {prompt, response, label or score} (a rating), "
    "{prompt, original, edited} (an edit) or {prompt, responses} (a ranking)"
)


def _missing(kind: str, obj: Mapping[str, Any], errs: _Errors) -> None:
    """Name each required field the event lacks, with everything its kind needs."""
    need = ("prompt", *sorted(KIND_FIELDS[kind][0] - {"prompt"}))
    for f in need:
        if f not in obj:
            errs.add(f, f"is missing: a {kind} needs {', '.join(need)}")


def _kind_fields(kind: str, obj: Mapping[str, Any], out: dict[str, Any], errs: _Errors) -> None:
    _missing(kind, obj, errs)
    out["prompt"] = _text(obj, "prompt", errs)
    if kind == "pair":
        chosen = out["chosen"] = _text(obj, "chosen", errs)
        rejected = out["rejected"] = _text(obj, "rejected", errs)
        if chosen and chosen == rejected:
            errs.add("rejected", "must differ from chosen")
        if "margin" in obj:
            m = _number(obj["margin"])
            if m is None or not 0.0 <= m <= MAX_WEIGHT:
                errs.add("margin", f"must be a number in 0..{MAX_WEIGHT:g}")
            out["margin"] = m
    elif kind == "rating":
        out["response"] = _text(obj, "response", errs)
        has_label, has_score = "label" in obj, "score" in obj
        if has_label == has_score:
            errs.add("label", "give exactly one of label (+1 or -1) or score (0..1)")
        elif has_label:
            label = obj["label"]
            if isinstance(label, bool) or label not in (1, -1):
                errs.add("label", f"must be +1 or -1, got {brief(label)}")
            else:
                out["label"] = int(label)
        else:
            s = _number(obj["score"])
            if s is None or not 0.0 <= s <= 1.0:
                errs.add("score", "must be a number in 0..1 (1 = best)")
            out["score"] = s
    elif kind == "edit":
        original = out["original"] = _text(obj, "original", errs)
        edited = out["edited"] = _text(obj, "edited", errs)
        if original and original == edited:
            errs.add("edited", "must differ from original")
    elif kind == "ranking":
        responses = obj.get("responses")
        if not isinstance(responses, (list, tuple)):
            errs.add("responses", f"must be an array of strings, got {_type_name(responses)}")
            return
        if not 2 <= len(responses) <= MAX_RANKING:
            errs.add("responses", f"must hold 2..{MAX_RANKING} responses, got {len(responses)}")
        clean: list[str] = []
        for i, r in enumerate(responses[:MAX_RANKING]):
            if not isinstance(r, str):
                errs.add(f"responses[{i}]", f"must be a string, got {_type_name(r)}")
                continue
            clean.append(_check_text(r, f"responses[{i}]", errs))
        if len(set(clean)) != len(clean):
            errs.add("responses", "must not contain the same response twice")
        out["responses"] = clean


def _optional_common(obj: Mapping[str, Any], out: dict[str, Any], errs: _Errors) -> None:
    if "context" in obj:
        ctx = obj["context"]
        if not isinstance(ctx, Mapping):
            errs.add("context", f"must be a map, got {_type_name(ctx)}")
        else:
            clean: dict[str, str] = {}
            for k, v in ctx.items():
                if k not in CONTEXT_KEYS:
                    errs.add(
                        f"context.{str(k)[:32]}", f"unknown key; allowed: {sorted(CONTEXT_KEYS)}"
                    )
                elif not isinstance(v, str) or not v or len(v) > MAX_CONTEXT_VALUE:
                    errs.add(
                        f"context.{k}", f"must be a string of 1-{MAX_CONTEXT_VALUE} characters"
                    )
                else:
                    clean[k] = _check_text(v, f"context.{k}", errs)
            if clean:
                out["context"] = clean
    if "weight" in obj:
        w = _number(obj["weight"])
        if w is None or not 0.0 < w <= MAX_WEIGHT:
            errs.add("weight", f"must be a number in (0, {MAX_WEIGHT:g}]")
        out["weight"] = w
    if "confidence" in obj:
        c = _number(obj["confidence"])
        if c is None or not 0.0 <= c <= 1.0:
            errs.add("confidence", "must be a number in 0..1")
        out["confidence"] = c


def _invalid(errs: _Errors) -> PalateError:
    first = errs.items[0]
    more = f" (and {len(errs.items) - 1} more)" if len(errs.items) > 1 else ""
    return PalateError(
        "invalid_event",
        f"invalid event: {first['field']} {first['reason']}{more}",
        {"errors": errs.items},
    )


def derive_id(event: Mapping[str, Any]) -> str:
    """A stable id from an event's source, kind and content (not its timestamp).

    Importing the same file twice, or an adapter replaying after a crash, then
    stores each event once. The id is a hash, so it reveals nothing of the text.
    """
    body = {
        k: event[k] for k in ("source", "kind", *CONTENT_FIELDS, "label", "score") if k in event
    }
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    return "d-" + digest[:40]


def from_simple(obj: Any, source: str) -> Any:
    """Accept the short JSONL forms used by ``palate feedback --file``.

    ``{prompt, chosen, rejected}`` becomes a pair, ``{prompt, response, label}``
    (or ``score``) a rating; anything with a ``kind`` is taken as a full v1 event.
    ``source`` fills in a missing source. Unknown shapes are returned unchanged
    so validation reports them.
    """
    if not isinstance(obj, dict):
        return obj
    ev = dict(obj)
    if "kind" not in ev:
        # A short form is recognised by any field only its kind has, so a line that lacks
        # one of them is reported as "rejected is missing: a pair needs ...".
        if "chosen" in ev or "rejected" in ev:
            ev["kind"] = "pair"
        elif "response" in ev:
            ev["kind"] = "rating"
        elif "original" in ev or "edited" in ev:
            ev["kind"] = "edit"
        elif "responses" in ev:
            ev["kind"] = "ranking"
    ev.setdefault("source", source)
    return ev


# --- training examples ---------------------------------------------------------


#: A prompt as text, or as chat turns ``[{role, content}, ...]``.
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PairExample:
    """``chosen`` should score above ``rejected`` by at least ``margin``.

    The one example type for pairs: training, evaluation and the store all use it; the
    metadata fields (source, domain, event id) feed the evaluator's slices.
    """

    prompt: str | Messages
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0
    source: str = ""
    domain: str = ""
    event_id: str = ""
    #: ``context.conversation``: what the held-out split keys on (evaluation/split.py).
    conversation: str = ""


@dataclass(frozen=True)
class RatingExample:
    """A single judged response: ``label`` 1.0 = good, 0.0 = bad (soft values allowed)."""

    prompt: str | Messages
    response: str
    label: float
    weight: float = 1.0
    source: str = ""
    domain: str = ""
    event_id: str = ""
    conversation: str = ""


Example = PairExample | RatingExample


def to_examples(event: Mapping[str, Any]) -> list[Example]:
    """Turn a validated event into training examples (DESIGN.md's table).

    A ranking of n responses becomes its n-1 adjacent pairs plus best-vs-worst:
    adjacent pairs carry the full ordering without the O(n^2) blow-up that would
    let one long ranking dominate a night's data.
    """
    weight = float(event.get("weight", 1.0)) * float(event.get("confidence", 1.0))
    meta: dict[str, Any] = {
        "weight": weight,
        "source": str(event.get("source", "")),
        "domain": str((event.get("context") or {}).get("domain", "")),
        "event_id": str(event.get("id", "")),
        "conversation": str((event.get("context") or {}).get("conversation", "")),
    }
    kind, prompt = event["kind"], event["prompt"]
    if kind == "pair":
        return [
            PairExample(
                prompt,
                event["chosen"],
                event["rejected"],
                float(event.get("margin") or 0.0),
                **meta,
            )
        ]
    if kind == "edit":
        return [PairExample(prompt, event["edited"], event["original"], **meta)]
    if kind == "rating":
        target = float(event["label"] > 0) if "label" in event else float(event["score"])
        return [RatingExample(prompt, event["response"], target, **meta)]
    if kind == "ranking":
        rs = event["responses"]
        pairs = [PairExample(prompt, rs[i], rs[i + 1], **meta) for i in range(len(rs) - 1)]
        if len(rs) > 2:
            pairs.append(PairExample(prompt, rs[0], rs[-1], **meta))
        return list(pairs)
    raise ValueError(f"unknown kind {kind!r}")


#: At most this many pairs are derived from the ratings of one prompt, so a cursor rated
#: many times cannot dominate a night's pairs (rankings are bounded the same way).
MAX_DERIVED_PER_PROMPT = 8


def _prompt_key(prompt: str | Messages) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def derive_pairs(examples: Iterable[Example]) -> list[PairExample]:
    """Pairs implied by ratings that are comparable: same source, same conversation, the
    *same prompt text*, and labels at least 0.5 apart (good vs bad).

    Two ratings of different responses to one prompt by one user say which of the two the
    user preferred, which a rating alone cannot: Tabby's selected choice against the choices
    of the same completion that were shown and not selected (the adapter rates both, with
    one prompt), and a completion rejected and then another accepted at the same cursor
    (the prompt is the code around the cursor, so it is identical only if nothing was typed
    in between). A different prompt is a different question, and its ratings are never
    paired. The pair's weight is the smaller of the two ratings' weights; its ``event_id``
    is ``derived:<good id>><bad id>``. Ratings of the same response text are not paired.
    The ratings themselves stay examples too.
    """
    groups: dict[tuple[str, str, str], list[RatingExample]] = {}
    for e in examples:
        if isinstance(e, RatingExample):
            groups.setdefault((e.source, e.conversation, _prompt_key(e.prompt)), []).append(e)
    out: list[PairExample] = []
    for ratings in groups.values():
        if len(ratings) < 2:
            continue
        ranked = sorted(ratings, key=lambda r: (-r.label, r.event_id))
        seen: set[tuple[str, str]] = set()
        made = 0
        for good in ranked:
            for bad in reversed(ranked):
                if made >= MAX_DERIVED_PER_PROMPT or good.label - bad.label < 0.5:
                    break
                key = (good.response, bad.response)
                if good.response == bad.response or key in seen:
                    continue
                seen.add(key)
                made += 1
                out.append(
                    PairExample(
                        good.prompt,
                        good.response,
                        bad.response,
                        weight=min(good.weight, bad.weight),
                        source=good.source,
                        domain=good.domain or bad.domain,
                        event_id=f"derived:{good.event_id}>{bad.event_id}",
                        conversation=good.conversation,
                    )
                )
    return out
