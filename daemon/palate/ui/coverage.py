"""What the overview says about the data: how it spreads, and plain notes where it is narrow.

A personal reward model learns only what the feedback covers: one tool, one kind of task or
a few hours of the day make a model that knows that and little else. These notes are simple
thresholds over ``events_stats``, worded for a person, not a statistician.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Below this many events, training is mostly noise (the gate will likely hold).
FEW_EVENTS = 200
#: One value holding this share of the data makes that dimension "narrow".
DOMINANT = 0.8


def shares(counts: Mapping[str, int]) -> list[tuple[str, int, float]]:
    """``(name, count, share)`` largest first."""
    total = sum(counts.values()) or 1
    return [(k, n, n / total) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _dominated(counts: Mapping[str, int], what: str, where: str) -> str | None:
    rows = shares(counts)
    if not rows:
        return None
    name, _, share = rows[0]
    if len(rows) == 1:
        return f"All of it comes from one {what}: {name}. {where}"
    if share >= DOMINANT:
        return f"{share:.0%} comes from one {what} ({name}). {where}"
    return None


def notes(stats: Mapping[str, Any]) -> list[str]:
    """Plain sentences about where the data is narrow (empty when it is not)."""
    total = int(stats.get("total") or 0)
    if total == 0:
        return [
            "No feedback yet. Enable an adapter (`palate adapters`), install the browser "
            "extension or send some with `palate feedback`."
        ]
    out: list[str] = []
    if total < FEW_EVENTS:
        out.append(
            f"Only {total} events so far; a model trained on fewer than {FEW_EVENTS} mostly "
            "learns noise, and the gate will probably hold it."
        )
    for note in (
        _dominated(
            stats.get("by_source") or {},
            "source",
            "The model will learn your taste in that tool only; other tools' feedback would "
            "broaden it.",
        ),
        _dominated(
            stats.get("by_kind") or {},
            "kind of feedback",
            "Pairs (A better than B) teach the most; thumbs and edits add breadth.",
        ),
    ):
        if note:
            out.append(note)
    context = stats.get("by_context") or {}
    sampled = int(stats.get("context_sampled") or total)
    for key, label in (("task", "task"), ("language", "language")):
        counts = context.get(key) or {}
        tagged = sum(counts.values())
        if sampled and tagged / sampled < 0.1:
            out.append(
                f"Almost no events say which {label} they were about "
                f"({tagged} of {sampled}); slices by {label} cannot be checked."
            )
        elif len(counts) == 1:
            out.append(f"Every event with a {label} has the same one: {next(iter(counts))}.")
    hours = list(stats.get("by_hour") or [])
    if hours and sum(hours):
        top = sorted(hours, reverse=True)
        busy = next(i for i in range(1, 25) if sum(top[:i]) >= DOMINANT * sum(hours))
        if busy <= 3:
            out.append(
                f"{DOMINANT:.0%} of it was given within {busy} hour(s) of the day; "
                "what you prefer at other times is not represented."
            )
    active = sum(1 for d in stats.get("days") or [] if d.get("by_source"))
    span = len(stats.get("days") or [])
    if span >= 7 and active <= 2:
        out.append(f"Feedback came on only {active} of the last {span} days.")
    return out
