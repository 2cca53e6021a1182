"""``palate review``: the questions whose answers would teach the model most.

The daemon queues pairs of candidates its ensemble members disagree on (rerank/compare calls
made with ``remember: true``, and candidate sets adapters offer); this answers them. An answer
``a`` or ``b`` is stored as a pair event with source ``review``; ``tie`` and ``skip`` only close
the question. Nothing is ever asked twice.
"""

from __future__ import annotations

import time
from typing import Any

import click

from palate.cli.common import emit, handles_errors, json_option
from palate.wire.client import Client

ANSWERS = ("a", "b", "tie", "skip")


@click.group()
def review() -> None:
    """Answer the questions the model is least sure about (its members disagree)."""


@review.command("list")
@click.option(
    "--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="Items to show."
)
@click.option("--full", is_flag=True, help="Show whole texts instead of the first lines.")
@json_option
@handles_errors
def list_command(limit: int, full: bool, as_json: bool) -> None:
    """Open questions, the most valuable answer first.

    \b
    JSON: {"items": [{id, prompt, a, b, why, source, created, expires, info,
           p_a_over_b, version, ...}], "open": N}
    """
    with Client() as c:
        data = c.review_list(limit)

    def human(d: dict[str, Any]) -> None:
        if not d["items"]:
            click.echo("nothing to review: no open questions")
            return
        click.echo(f"{d['open']} open question(s); most valuable first\n")
        for it in d["items"]:
            click.echo(click.style(it["id"], bold=True) + f"  ({it['why']})")
            click.echo(f"  prompt: {_text(it['prompt'], full)}")
            click.echo(f"  a:      {_text(it['a'], full)}")
            click.echo(f"  b:      {_text(it['b'], full)}")
            left = max(0.0, it["expires"] - time.time()) / 86_400
            click.echo(f"  from {it['source']}, expires in {left:.0f} days\n")
        click.echo("answer with: palate review answer ID a|b|tie|skip")

    emit(data, as_json, human)


@review.command("answer")
@click.argument("item_id", metavar="ID")
@click.argument("answer", type=click.Choice(ANSWERS))
@json_option
@handles_errors
def answer_command(item_id: str, answer: str, as_json: bool) -> None:
    """Answer question ID: a or b (which is better), tie, or skip.

    \b
    JSON: {"id", "answer", "event": {id, seq, duplicate} | null, "open": N}
    """
    with Client() as c:
        data = c.review_answer(item_id, answer)

    def human(d: dict[str, Any]) -> None:
        if d["event"] is not None:
            click.echo(f"stored as pair event {d['event']['id']} (source review)")
        else:
            click.echo(f"closed ({d['answer']}); nothing stored")
        click.echo(f"{d['open']} question(s) left")

    emit(data, as_json, human)


def _text(t: str | None, full: bool) -> str:
    t = (t or "").strip()
    if full:
        return t.replace("\n", "\n          ")
    first = t.replace("\n", " ")
    return first if len(first) <= 100 else first[:99] + "…"
