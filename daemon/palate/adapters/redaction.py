"""Privacy at the edge: drop events from denied places, strip obvious secrets.

Runs inside the adapter process, before an event is validated and sent, so a
secret the user pasted into an editor never reaches the socket, the store or a
training batch. Two independent tools:

* a **deny list** of glob patterns matched against an event's *subjects*: the
  file path it came from, the web site (URL or host), or the app
  (``app:<name>``). A match drops the whole event.
* **secret scrubbing** of every text field: API keys (``sk-...``, ``AKIA...``,
  ``ghp_...``, ...), bearer tokens, JWTs, private key blocks and
  ``password = "..."``-style assignments become ``[REDACTED:<kind>]``.

Patterns err towards redacting: losing a few characters of a training example
costs little, leaking a key costs a lot (safe first, then useful).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

#: Event fields that hold user text (events.CONTENT_FIELDS minus the list field).
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "response", "original", "edited")

_KEY_WORDS = (
    r"password|passwd|passphrase|pwd|secret|client[_-]?secret|api[_-]?key|apikey|"
    r"access[_-]?key|secret[_-]?key|private[_-]?key|auth[_-]?token|access[_-]?token|token"
)
#: Values of a `password=`-style assignment that are code, not secrets.
_NOT_SECRET = re.compile(
    r"^(none|null|nil|true|false|undefined|(os|process|env|self|this|config|settings|cfg)\..*)$",
    re.IGNORECASE,
)

#: (kind, pattern, group to replace or 0 for the whole match). Order matters:
#: private key blocks first, so their base64 body is not matched piecemeal.
_SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str], int], ...] = (
    (
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----"
            r"(.*?-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|.*\Z)",
            re.DOTALL,
        ),
        0,
    ),
    ("api_key", re.compile(r"\bsk-(?:ant-|proj-|live-|test-)?[A-Za-z0-9_\-]{20,}"), 0),
    ("aws_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"), 0),
    (
        "github_token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
        0,
    ),
    ("slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), 0),
    ("google_key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}"), 0),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), 0),
    ("bearer", re.compile(r"(?i)\b(?:bearer|token)\s+([A-Za-z0-9._~+/\-]{16,}=*)"), 1),
    (
        "password",
        re.compile(
            rf"(?i)(?:\b|_)(?:{_KEY_WORDS})[\"']?\s*(?:=|:|:=|=>)\s*"
            r"(?:\"([^\"\n]+)\"|'([^'\n]+)'|([^\s\"'(),;{}\[\]]{4,}(?![\w.]*\()))"
        ),
        -1,  # whichever value group matched
    ),
)


def scrub_text(text: str) -> tuple[str, int]:
    """Replace every secret in ``text``; return the new text and how many were replaced."""
    count = 0
    for kind, pattern, group in _SECRET_PATTERNS:

        def repl(m: re.Match[str], kind: str = kind, group: int = group) -> str:
            nonlocal count
            if group == 0:
                count += 1
                return f"[REDACTED:{kind}]"
            g = group if group > 0 else next(i for i in (1, 2, 3) if m.group(i) is not None)
            value = m.group(g)
            if group < 0 and _NOT_SECRET.match(value):
                return m.group(0)
            count += 1
            start, end = m.start(g) - m.start(0), m.end(g) - m.start(0)
            whole = m.group(0)
            return whole[:start] + f"[REDACTED:{kind}]" + whole[end:]

        text = pattern.sub(repl, text)
    return text, count


def _normalize_subject(subject: str) -> list[str]:
    """The forms a subject is matched in: as given, as a path, and a URL's host."""
    forms = [subject]
    if subject.startswith("file://"):
        forms.append(unquote(urlsplit(subject).path))
    elif "://" in subject:
        parts = urlsplit(subject)
        if parts.hostname:
            forms.append(parts.hostname)
            forms.append(parts.hostname + parts.path)
    return forms


@dataclass
class Redactor:
    """The redaction hook every adapter's events pass through (see AdapterContext.emit).

    ``deny`` holds glob patterns (``*`` also matches ``/``); ``~`` is expanded.
    """

    deny: tuple[str, ...] = ()
    strip_secrets: bool = True
    dropped: int = 0
    redacted: int = 0
    _patterns: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._patterns = tuple(os.path.expanduser(p) for p in self.deny)

    def denied(self, subjects: Iterable[str | None]) -> str | None:
        """The first deny pattern any subject matches, or None."""
        for subject in subjects:
            if not subject:
                continue
            for form in _normalize_subject(subject):
                for pat in self._patterns:
                    if fnmatch.fnmatchcase(form, pat):
                        return pat
        return None

    def apply(
        self, event: Mapping[str, Any], subjects: Iterable[str | None] = ()
    ) -> dict[str, Any] | None:
        """The event with secrets stripped, or None when a subject is on the deny list."""
        subjects = list(subjects)
        app = (event.get("context") or {}).get("app") if isinstance(event, Mapping) else None
        if isinstance(app, str):
            subjects.append(f"app:{app}")
        if self.denied(subjects) is not None:
            self.dropped += 1
            return None
        out = dict(event)
        if not self.strip_secrets:
            return out
        for key in _TEXT_FIELDS:
            value = out.get(key)
            if isinstance(value, str):
                out[key], n = scrub_text(value)
                self.redacted += n
        responses = out.get("responses")
        if isinstance(responses, list):
            clean = []
            for r in responses:
                if isinstance(r, str):
                    r, n = scrub_text(r)
                    self.redacted += n
                clean.append(r)
            out["responses"] = clean
        return out
