"""The wire contract as the fuzzers and tests check it, derived rather than restated.

* Methods come from the daemon's own method table (``Api.methods``), never from a list kept
  here; docs/protocol.md's section 5 headings are parsed so a test can assert the two agree.
* Each method's parameter names come from the daemon itself: an unknown parameter is answered
  ``invalid_request`` with ``details.allowed``.
* The error codes a method may answer are the ones its section of docs/protocol.md names, plus
  the two the section 5 preamble grants every method (``invalid_request``, ``busy``).
  ``internal`` ("a bug") is never an acceptable answer to bad input.
* Parameter types: ``PARAM_TYPES`` below, keyed by parameter *name*; ``check_param_types``
  fails when the daemon grows a parameter this table does not know, or when the docs' parameter
  tables give a parameter another type.

Used by fuzz/fuzz_*.py (atheris, in-process) and tests/test_fuzz_wire.py (hypothesis, live
daemon). No imports from tests/.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

from palate.errors import ERROR_CODES, PalateError
from palate.runtime.api import Api

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_MD = REPO / "docs" / "protocol.md"

#: A parameter name no method will ever have: probing with it yields ``details.allowed``.
PROBE_PARAM = "\x00palate-fuzz-probe"

#: The type of each wire parameter, by name (docs/protocol.md section 5). "num" = int or
#: float, "path" = an absolute path str, "event"/"events"/"cursor" = the structured values.
PARAM_TYPES: dict[str, str] = {
    "client": "str",
    "api_level": "int",
    "event": "event",
    "events": "events",
    "cursor": "cursor",
    "adapter": "str",
    "ids": "[str]",
    "source": "str",
    "since": "num",
    "until": "num",
    "all": "bool",
    "path": "path",
    "overwrite": "bool",
    "version": "int",
    "override": "bool",
    "reason": "str",
    "wait": "bool",
    "prompt": "str",
    "responses": "[str]",
    "candidates": "[str]",
    "top_k": "int",
    "timeout_ms": "int",
    "a": "str",
    "b": "str",
    # browsing and the collection pause (the web UI)
    "kind": "str",
    "q": "str",
    "before": "int",
    "limit": "int",
    "preview": "int",
    "full": "bool",
    "id": "str",
    "days": "int",
    "tz_offset_s": "int",
    "for_s": "num",
    # ensembles and the review queue
    "lower_bound": "num",
    "remember": "bool",
    "answer": "str",
    # generation (docs/generation.md)
    "n": "int",
    "strategy": "str",
    "lambda": "num",
    "kappa": "num",
    "max_tokens": "int",
    "temperature": "num",
    "top_p": "num",
    "seed": "int",
    "policy": "policy",
    "model": "str",
    "reward_model": "path",
    "pairs": "pairs",
    "deploy": "bool",
}
#: How docs/protocol.md's parameter tables spell those types.
_DOC_TYPES = {
    "str": {"str"},
    "int": {"int"},
    "num": {"num"},
    "bool": {"bool"},
    "path": {"str"},
    "event": {"map"},
    "events": {"[map]"},
    "cursor": {"map"},
    "[str]": {"[str]"},
    "policy": {"str or int"},
    "pairs": {"[map]"},
}

#: Methods that start heavy work when their params are valid: fuzzed with invalid params only.
HEAVY = frozenset({"train", "policy_register"})


def method_table() -> list[str]:
    """The daemon's method names, from ``Api.methods`` (no store needed to build the table)."""
    api = Api(None, None, Path("/nonexistent"))  # type: ignore[arg-type]
    return sorted(api.methods)


def _section5() -> str:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    start = text.index("\n## 5. Methods")
    end = text.index("\n## 6.", start)
    return text[start:end]


def documented_methods() -> dict[str, str]:
    """``{method: its section text}`` from the ``### `name`...`` headings of section 5."""
    out: dict[str, str] = {}
    parts = re.split(r"^### ", _section5(), flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        names = re.findall(r"`([a-z_]+)`", heading.split(":")[0])
        for name in names:
            out[name] = heading + "\n" + body
    return out


def documented_error_codes() -> set[str]:
    """The codes of the section 6 table."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    start = text.index("\n## 6. Error codes")
    end = text.index("\n## 7.", start)
    return set(re.findall(r"^\| `([a-z_]+)` \|", text[start:end], flags=re.M))


def allowed_codes(method: str) -> set[str]:
    """Codes a method may answer to bad input: its doc section's, plus the preamble's."""
    section = documented_methods()[method]
    named = set(re.findall(r"`([a-z_]+)`", section)) & set(ERROR_CODES)
    return (named | {"invalid_request", "busy"}) - {"internal"}


def documented_param_types() -> dict[tuple[str, str], str]:
    """``{(method, param): type}`` from the ``| `param` | type | ...`` rows of section 5."""
    out: dict[tuple[str, str], str] = {}
    for method, section in documented_methods().items():
        for name, typ in re.findall(r"^\| `([a-z_]+)` \| ([^|]+?) \|", section, flags=re.M):
            out[(method, name)] = typ.strip()
    return out


async def probe_allowed(api: Any) -> dict[str, list[str]]:
    """Each method's parameter names, asked of the daemon's own validation."""
    out: dict[str, list[str]] = {}
    for method in sorted(api.methods):
        try:
            await api.dispatch(method, {PROBE_PARAM: 1})
        except PalateError as e:
            if e.code != "invalid_request" or "allowed" not in e.details:
                raise AssertionError(f"{method}: unknown parameter not refused: {e!r}") from e
            out[method] = list(e.details["allowed"])
        else:
            raise AssertionError(f"{method} accepted an unknown parameter")
    return out


def probe_allowed_sync(api: Any) -> dict[str, list[str]]:
    return asyncio.run(probe_allowed(api))


def check_param_types(allowed: dict[str, list[str]]) -> list[str]:
    """Problems: a parameter without a known type, or one the docs type differently."""
    problems = []
    docs = documented_param_types()
    for method, names in allowed.items():
        for name in names:
            if name not in PARAM_TYPES:
                problems.append(f"{method}.{name}: no entry in fuzz/contract.py PARAM_TYPES")
                continue
            doc = docs.get((method, name))
            if doc is not None and doc not in _DOC_TYPES[PARAM_TYPES[name]]:
                ours = PARAM_TYPES[name]
                problems.append(f"{method}.{name}: docs say {doc!r}, fuzzers use {ours!r}")
    return problems


# --- values ------------------------------------------------------------------------------

#: A string that arrives as invalid UTF-8 (the daemon decodes it with surrogateescape).
BAD_UTF8 = "a\udcffb"
NO_SUCH_USER = "palate-fuzz-nouser"


def valid_events() -> list[dict[str, Any]]:
    """One valid event of each kind (plus optional fields)."""
    return [
        {"kind": "pair", "source": "fuzz", "prompt": "p", "chosen": "a", "rejected": "b"},
        {"kind": "rating", "source": "fuzz", "prompt": "p", "response": "r", "label": 1},
        {"kind": "rating", "source": "fuzz", "prompt": "p", "response": "r", "score": 0.5},
        {"kind": "edit", "source": "fuzz", "prompt": "p", "original": "o", "edited": "e"},
        {"kind": "ranking", "source": "fuzz", "prompt": "p", "responses": ["x", "y", "z"]},
        {
            "kind": "pair",
            "source": "fuzz:x/y-1.2",
            "prompt": "p",
            "chosen": "a",
            "rejected": "b",
            "margin": 1.5,
            "weight": 2,
            "confidence": 0.5,
            "context": {"app": "a", "domain": "d", "language": "l", "task": "t"},
            "id": "fuzz-id-1",
            "ts": 1_700_000_000,
            "v": 1,
        },
    ]


def bad_events() -> list[Any]:
    pair = valid_events()[0]
    return [
        {},
        None,
        "event",
        [pair],
        {"kind": "pair"},
        {"kind": "nope", "source": "fuzz"},
        {**pair, "chosen": "same", "rejected": "same"},
        {**pair, "prompt": BAD_UTF8},
        {**pair, "source": BAD_UTF8},
        {**pair, "id": BAD_UTF8},
        {**pair, "ts": float("nan")},
        {**pair, "ts": 2**64 - 1},
        {**pair, "ts": -(2**63)},
        {**pair, "weight": float("inf")},
        {**pair, "margin": True},
        {**pair, "context": {"app": BAD_UTF8}},
        {**pair, "context": {"other": "x"}},
        {**pair, "context": []},
        {**pair, "prompt": "x" * 200_001},
        {**pair, "v": 2},
        {**pair, "extra": 1},
        {"kind": "ranking", "source": "fuzz", "prompt": "p", "responses": ["a"] * 33},
        {"kind": "ranking", "source": "fuzz", "prompt": "p", "responses": ["a", "a"]},
        {"kind": "ranking", "source": "fuzz", "prompt": "p", "responses": [1, None]},
        {"kind": "rating", "source": "fuzz", "prompt": "p", "response": "r"},
        {"kind": "rating", "source": "fuzz", "prompt": "p", "response": "r", "label": 2},
        {"kind": "rating", "source": "fuzz", "prompt": "p", "response": "r", "score": 1.5},
    ]


def valid_value(kind: str, sandbox: str) -> Any:
    """A value of ``kind`` that the daemon accepts (the base a single mutation starts from)."""
    return {
        "str": "fuzz",
        "int": 1,
        "num": 1_700_000_000.0,
        "bool": False,
        "path": f"{sandbox}/out.jsonl",
        "event": valid_events()[0],
        "events": valid_events()[:3],
        "cursor": {"adapter": "a", "key": "k", "value": {"offset": 1}},
        "[str]": ["a", "b"],
        "policy": "base",
        "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}],
    }[kind]


def wrong_type_values() -> list[Any]:
    """One value of every msgpack type (each is the wrong type for most parameters)."""
    return [None, True, False, 0, -1, 1.5, "s", b"bytes", [], [1], {}, {"k": 1}, [{}]]


def edge_values(kind: str, sandbox: str) -> list[Any]:
    """Well-typed values at and past the edges of what ``kind`` accepts.

    Paths only ever point into ``sandbox`` (or nowhere): the daemon under test runs as this
    user and ``export`` with ``overwrite`` replaces files.
    """
    ints = [0, 1, -1, 2, 31, 32, 33, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]
    strs = [
        "",
        " ",
        "a",
        "fuzz",
        "x" * 64,
        "x" * 65,
        "x" * 1025,
        "x" * 50_001,
        BAD_UTF8,
        "a\x00b",
        "é€😀",
        "../etc",
        "\n",
    ]
    if kind == "str":
        return strs
    if kind == "int":
        return ints
    if kind == "num":
        return [
            *ints,
            0.0,
            -0.0,
            1e308,
            -1e308,
            float("nan"),
            float("inf"),
            float("-inf"),
            946_684_800.0,
            1_700_000_000.5,
        ]
    if kind == "bool":
        return [True, False]
    if kind == "path":
        return [
            "",
            "relative.jsonl",
            "/",
            "//",
            f"{sandbox}",
            f"{sandbox}/",
            f"{sandbox}/out.jsonl",
            f"{sandbox}/missing/out.jsonl",
            f"{sandbox}/{BAD_UTF8}.jsonl",
            f"{sandbox}/a\x00b",
            f"~{NO_SUCH_USER}/x",
            f"{sandbox}/" + "n" * 300,
            f"{sandbox}/.",
        ]
    if kind == "[str]":
        return [
            [],
            [""],
            ["a"],
            ["a", "b"],
            [BAD_UTF8],
            ["a"] * 33,
            ["a"] * 2001,
            ["x" * 50_001],
            [1],
            [None],
            ["a", 1],
            [["a"]],
            [str(i) for i in range(10_000)],
        ]
    if kind == "event":
        return [*valid_events(), *bad_events()]
    if kind == "events":
        good = valid_events()
        return [
            [],
            good,
            good[:1] * 2,
            good[:1] * 2001,
            bad_events(),
            [*good, None],
            [{**e, "id": f"fuzz-{i}"} for i, e in enumerate(good * 20)],
        ]
    if kind == "cursor":
        return [
            {},
            {"adapter": "a", "key": "k", "value": 1},
            {"adapter": "a", "key": "k", "value": None},
            {"adapter": "a", "key": "k"},
            {"adapter": "", "key": "k", "value": 1},
            {"adapter": "x" * 65, "key": "k", "value": 1},
            {"adapter": "a", "key": "k" * 1025, "value": 1},
            {"adapter": BAD_UTF8, "key": "k", "value": 1},
            {"adapter": "a", "key": BAD_UTF8, "value": 1},
            {"adapter": "a", "key": "k", "value": BAD_UTF8},
            {"adapter": "a", "key": "k", "value": {"nested": [BAD_UTF8]}},
            {"adapter": "a", "key": "k", "value": "v" * 70_000},
            {"adapter": "a", "key": "k", "value": float("nan")},
            {"adapter": "a", "key": "k", "value": b"\x00\xff"},
            {"adapter": 1, "key": "k", "value": 1},
            {"adapter": "a", "key": "k", "value": 1, "extra": 2},
        ]
    if kind == "policy":
        return [
            "base",
            "",
            "relative",
            0,
            1,
            -1,
            2**63,
            True,
            BAD_UTF8,
            f"{sandbox}",
            f"{sandbox}/missing",
            f"{sandbox}/a\x00b",
        ]
    if kind == "pairs":
        pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
        return [
            [],
            [pair],
            [{}],
            [1],
            [None],
            [{**pair, "prompt": BAD_UTF8}],
            [{**pair, "chosen": 1}],
            [pair] * 1001,
            [{**pair, "extra": 1}],
        ]
    raise KeyError(kind)


def sandbox_path(value: Any, sandbox: str) -> Any:
    """Keep an arbitrary ``path`` value from reaching outside ``sandbox``.

    Absolute paths are re-rooted under the sandbox and ``~user`` is pointed at a user that does
    not exist; relative paths are left alone (the daemon refuses them without writing).
    """
    if not isinstance(value, str):
        return value
    if value.startswith("~"):
        head, sep, rest = value[1:].partition("/")
        return f"~{NO_SUCH_USER}{sep}{rest}" if head else f"~{NO_SUCH_USER}/{rest}"
    if value.startswith("/"):
        norm = os.path.normpath(value)
        if norm == sandbox or norm.startswith(sandbox + "/"):
            return value
        return sandbox + "/" + value.lstrip("/").replace("..", "__")
    return value


def sandbox_params(method: str, params: Any, sandbox: str) -> Any:
    if method == "export" and isinstance(params, dict) and "path" in params:
        return {**params, "path": sandbox_path(params["path"], sandbox)}
    return params
