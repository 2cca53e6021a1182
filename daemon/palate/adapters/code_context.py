"""How an editor's code context becomes an event prompt (shared by the editor adapters).

Completion logs carry the text before the cursor (prefix) and after it (suffix).
The prompt is ``prefix + CURSOR + suffix``, with the prefix cut from the left
and the suffix from the right, so the code nearest the cursor, which decides
whether a completion fits, is always kept and the prompt stays far below the
event text limit. One rendering for every editor means a completion from
Continue and one from Tabby look alike to the reward model.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from palate.events import CODE_CURSOR, MAX_FUTURE_S, MIN_TS

CURSOR = CODE_CURSOR
DEFAULT_PREFIX_CHARS = 6000
DEFAULT_SUFFIX_CHARS = 2000

_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".jsx": "javascript",
    ".mjs": "javascript", ".ts": "typescript", ".tsx": "typescript", ".rs": "rust",
    ".go": "go", ".java": "java", ".kt": "kotlin", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp", ".rb": "ruby", ".php": "php",
    ".swift": "swift", ".scala": "scala", ".sh": "shell", ".bash": "shell", ".lua": "lua",
    ".sql": "sql", ".md": "markdown", ".html": "html", ".css": "css", ".json": "json",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".zig": "zig", ".ex": "elixir",
    ".hs": "haskell", ".ml": "ocaml", ".r": "r", ".jl": "julia", ".dart": "dart",
}  # fmt: skip


def code_prompt(
    prefix: str,
    suffix: str = "",
    *,
    prefix_chars: int = DEFAULT_PREFIX_CHARS,
    suffix_chars: int = DEFAULT_SUFFIX_CHARS,
) -> str:
    """``prefix<|cursor|>suffix``, trimmed around the cursor; never blank."""
    return prefix[-prefix_chars:] + CURSOR + suffix[:suffix_chars]


def local_path(filepath: str) -> str:
    """A filesystem path from an editor's path or ``file://`` URI (for the deny list)."""
    if filepath.startswith("file://"):
        return unquote(urlsplit(filepath).path)
    return filepath


def language_of(filepath: str | None) -> str | None:
    if not filepath:
        return None
    return _LANGUAGES.get(PurePosixPath(local_path(filepath)).suffix.lower())


def parse_ts(value: Any, *, millis: bool = False) -> float | None:
    """Unix seconds from an ISO-8601 string or a number; None if absent or implausible."""
    ts: float | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        ts = float(value) / (1000.0 if millis or value > 1e11 else 1.0)
    elif isinstance(value, str) and value:
        try:
            ts = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    if ts is None or not math.isfinite(ts) or ts < MIN_TS:
        return None
    import time

    return ts if ts <= time.time() + MAX_FUTURE_S else None


def context(app: str, task: str, filepath: str | None = None, language: Any = None) -> dict:
    """The event ``context`` map for code: app, domain "code", task, language, conversation.

    ``conversation`` names the file (:func:`file_conversation`): the held-out split keys an
    editor context on its file and the region around the cursor, so a burst of completions
    at one place never lands on both sides (evaluation/split.py).
    """
    ctx = {"app": app[:128], "domain": "code", "task": task}
    lang = language if isinstance(language, str) and language.strip() else language_of(filepath)
    if lang:
        ctx["language"] = lang[:128]
    if filepath:
        ctx["conversation"] = file_conversation(filepath)
    return ctx


def file_conversation(filepath: str) -> str:
    """``file:<16 hex>``: a file named by a hash of its path (the path itself is never sent)."""
    digest = hashlib.sha256(local_path(filepath).encode("utf-8", "surrogatepass")).hexdigest()
    return "file:" + digest[:16]


def nonblank(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None
