"""``palate pause`` and ``palate resume``: stop and restart collection from the command line.

Thin commands over the daemon's ``pause`` / ``resume`` / ``pause_state`` socket methods
(docs/protocol.md), the same ones ``palate ui``'s pause page uses. While paused, adapters and
the browser's native host send nothing (and events from inside a pause are never collected
later); feedback given on purpose (``palate feedback``, review answers) is still stored.
"""

from __future__ import annotations

import re
import time
from typing import Any

import click

from palate.cli.common import emit, handles_errors, json_option
from palate.wire.client import Client

#: The longest timed pause the daemon accepts (``runtime.api.MAX_PAUSE_S``, 30 days; a test
#: keeps the two equal). Checked here too so a value out of range is a usage mistake (exit 2)
#: before anything is sent, as docs/cli.md's one rule for usage mistakes says.
MAX_PAUSE_S = 30 * 86_400

_UNITS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30m``, ``1h``, ``2h30m``, ``1d`` or ``90s``.

    Every number needs its unit: a bare ``30`` could mean seconds or minutes, and guessing
    wrong pauses collection for 60 times too long or too short. Raises ``ValueError`` with
    the reason.
    """
    s = text.strip().lower().replace(" ", "")
    if not _WHOLE.fullmatch(s):
        raise ValueError(
            f"{text!r} is not a duration; give a number with a unit, e.g. 30m, 1h, 2h30m or 1d "
            "(units: d, h, m, s)"
        )
    seen: set[str] = set()
    total = 0.0
    for number, unit in _PART.findall(s):
        if unit in seen:
            raise ValueError(f"{text!r} gives the unit {unit!r} twice")
        seen.add(unit)
        total += float(number) * _UNITS[unit]
    if total <= 0:
        raise ValueError(f"{text!r} is no time at all; leave --for out to pause until resumed")
    if total > MAX_PAUSE_S:
        raise ValueError(
            f"{text!r} is longer than the longest pause, 30 days; leave --for out to pause "
            "until `palate resume`"
        )
    return total


class Duration(click.ParamType):
    """A click parameter for :func:`parse_duration`: a bad value is a usage error (exit 2)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def for_humans(seconds: float) -> str:
    """``2h30m``, ``45m``, ``3d4h``: the remaining time of a pause, to the minute."""
    minutes = max(1, round(seconds / 60))
    d, rest = divmod(minutes, 1440)
    h, m = divmod(rest, 60)
    if d:
        return f"{d}d{h}h" if h else f"{d}d"
    if h:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    return f"{m}m"


def _at(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def paused_line(paused: dict[str, Any]) -> str:
    """The ``palate status`` line for a pause (``status``'s ``paused`` map)."""
    if paused.get("until") is None:
        when = f"until resumed (since {_at(paused['since'])})"
    else:
        when = f"until {_at(paused['until'])} ({for_humans(paused['remaining_s'])} left)"
    return f"paused   {when}: adapters and the browser collect nothing; `palate resume`"


COLLECTS_NOTHING = (
    "Adapters and the browser collect nothing meanwhile, and nothing from inside the pause is "
    "collected later; feedback you give yourself (`palate feedback`, review answers) is still "
    "stored."
)


@click.command()
@click.option(
    "--for",
    "duration",
    type=Duration(),
    metavar="DURATION",
    help="How long, e.g. 30m, 1h, 2h30m or 1d (at most 30 days). Default: until `palate resume`.",
)
@json_option
@handles_errors
def pause(duration: float | None, as_json: bool) -> None:
    """Pause collection: adapters and the browser send nothing until resumed (or --for ends).

    The pause is kept by the daemon (encrypted, in the store), so it survives a restart.
    Feedback you give on purpose (`palate feedback`) is still stored. Pausing while paused
    keeps when the pause began and sets the new end.

    \b
    JSON: the daemon's `pause` result, {"paused": {"since", "until", "remaining_s"}}
    (`until` and `remaining_s` null when it lasts until `palate resume`).
    """
    with Client() as c:
        before = c.call("pause_state").get("paused")
        data = c.call("pause", {} if duration is None else {"for_s": duration})

    def human(d: dict[str, Any]) -> None:
        p = d["paused"]
        if p["until"] is None:
            click.echo("collection paused until you resume it (`palate resume`)")
        else:
            click.echo(
                f"collection paused until {_at(p['until'])} "
                f"(for {for_humans(p['remaining_s'])}); `palate resume` ends it sooner"
            )
        if before is not None:
            click.echo(f"(it was already paused, since {_at(p['since'])})")
        click.echo(COLLECTS_NOTHING)

    emit(data, as_json, human)


@click.command()
@json_option
@handles_errors
def resume(as_json: bool) -> None:
    """Resume collection now (nothing to do when it is not paused; exit 0 either way).

    \b
    JSON: the daemon's `resume` result, {"paused": null, "was_paused": true|false}.
    """
    with Client() as c:
        before = c.call("pause_state").get("paused")
        data = c.call("resume")

    def human(d: dict[str, Any]) -> None:
        if not d.get("was_paused"):
            click.echo("collection was not paused; nothing changed")
            return
        since = (before or {}).get("since")
        if since is None:  # paused between our two calls: nothing more to say about it
            click.echo("collection resumed")
        else:
            click.echo(
                f"collection resumed (it was paused since {_at(since)}, "
                f"for {for_humans(time.time() - since)})"
            )

    emit(data, as_json, human)
