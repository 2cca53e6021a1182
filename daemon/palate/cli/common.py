"""What every ``palate`` command module shares: exit codes, error output, ``--json``.

Kept apart from ``cli.py`` so the command modules (``cli_model``, ``cli_adapters``,
``cli_service``) can use it without importing the command group itself.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from palate.errors import PalateError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes by error code; documented in docs/cli.md and tested.
EXIT_CODES: dict[str, int] = {
    "internal": 1,
    "unknown_method": 1,
    "unavailable": 3,
    "invalid_event": 4,
    "invalid_request": 4,
    "too_large": 4,
    "not_found": 4,
    "conflict": 4,
    "key_error": 5,
    "storage_error": 5,
    "storage_full": 5,
    "busy": 6,
    "model_error": 7,
    "no_model": 7,
    "unauthorized": 8,
}


def fail(err: PalateError, as_json: bool = False) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": err.to_wire()}), err=False)
    click.echo(f"palate: error: {err.message}", err=True)
    sys.exit(EXIT_CODES.get(err.code, 1))


def handles_errors(fn: F) -> F:
    """Turn PalateError into one line + exit code; keep tracebacks for real bugs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PalateError as e:
            fail(e, bool(kwargs.get("as_json")))

    return wrapper  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
    )(fn)


def emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        human(data)


def check_prompt(prompt: str, hint: str) -> None:
    """One rule for every command that takes a prompt (feedback, rerank, score): an empty or
    blank prompt is a usage mistake (exit 2), as the event schema rejects it for feedback and
    a preference about nothing cannot be scored meaningfully either."""
    if not prompt.strip():
        raise click.BadParameter("must not be empty or blank", param_hint=f"'{hint}'")
