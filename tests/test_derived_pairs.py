"""Pairs derived from comparable ratings (events.derive_pairs), end to end from Tabby's log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapter_dryrun import dry_run
from palate.events import (
    MAX_DERIVED_PER_PROMPT,
    PairExample,
    RatingExample,
    derive_pairs,
    to_examples,
    validate_event,
)


def _rating(prompt: str, response: str, label: float, eid: str, **kw: Any) -> RatingExample:
    return RatingExample(prompt, response, label, event_id=eid, source=kw.pop("source", "t"), **kw)


def test_good_and_bad_ratings_of_one_prompt_become_a_pair() -> None:
    rs = [
        _rating("p", "bad", 0.0, "b", weight=0.25),
        _rating("p", "good", 1.0, "g"),
        _rating("other prompt", "x", 0.0, "o"),  # a different question: never paired
    ]
    (pair,) = derive_pairs(rs)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("p", "good", "bad")
    assert pair.weight == 0.25 and pair.event_id == "derived:g>b" and pair.source == "t"


def test_what_is_not_comparable_is_not_paired() -> None:
    assert derive_pairs([_rating("p", "a", 1.0, "1"), _rating("p", "b", 1.0, "2")]) == []
    assert derive_pairs([_rating("p", "a", 0.7, "1"), _rating("p", "b", 0.4, "2")]) == []
    assert derive_pairs([_rating("p", "a", 1.0, "1"), _rating("p", "a", 0.0, "2")]) == []
    other_source = [_rating("p", "a", 1.0, "1"), _rating("p", "b", 0.0, "2", source="u")]
    assert derive_pairs(other_source) == []
    other_conv = [
        _rating("p", "a", 1.0, "1", conversation="c1"),
        _rating("p", "b", 0.0, "2", conversation="c2"),
    ]
    assert derive_pairs(other_conv) == []
    pair = PairExample("p", "a", "b")
    assert derive_pairs([pair, _rating("p", "c", 0.0, "3")]) == []  # pairs are not ratings
    soft = derive_pairs([_rating("p", "a", 0.9, "1"), _rating("p", "b", 0.3, "2")])
    assert [(p.chosen, p.rejected) for p in soft] == [("a", "b")]


def test_one_prompt_yields_at_most_the_cap() -> None:
    rs = [_rating("p", f"good{i}", 1.0, f"g{i}") for i in range(6)]
    rs += [_rating("p", f"bad{i}", 0.0, f"b{i}") for i in range(6)]
    pairs = derive_pairs(rs)
    assert len(pairs) == MAX_DERIVED_PER_PROMPT
    assert all(p.chosen.startswith("good") and p.rejected.startswith("bad") for p in pairs)
    assert len({(p.chosen, p.rejected) for p in pairs}) == len(pairs)


def _line(ts: int, kind: str, body: dict[str, Any]) -> str:
    return json.dumps({"user": None, "ts": ts, "event": {kind: body}}) + "\n"


def test_tabby_selected_choice_over_shown_choices_and_retry_at_one_cursor(
    tmp_path: Path,
) -> None:
    day = tmp_path / "events" / "2026-07-02.json"
    day.parent.mkdir()
    seg = {"prefix": "def f(n):\n    ", "suffix": "\n", "filepath": "a.py"}
    t = 1751414400000
    lines = [
        # completion 1: three choices, two shown, the second selected
        _line(
            t,
            "completion",
            {
                "completion_id": "c1",
                "language": "python",
                "segments": seg,
                "choices": [
                    {"index": 0, "text": "return n"},
                    {"index": 1, "text": "return n + 1"},
                    {"index": 2, "text": "pass"},
                ],
            },
        ),
        _line(t + 1, "view", {"completion_id": "c1", "choice_index": 0}),
        _line(t + 2, "view", {"completion_id": "c1", "choice_index": 1}),
        _line(t + 3, "select", {"completion_id": "c1", "choice_index": 1}),
        # at the same cursor: one completion dismissed, the next accepted
        _line(
            t + 10,
            "completion",
            {"completion_id": "c2", "segments": seg, "choices": [{"index": 0, "text": "n"}]},
        ),
        _line(t + 11, "view", {"completion_id": "c2", "choice_index": 0}),
        _line(t + 12, "dismiss", {"completion_id": "c2", "choice_index": 0}),
        _line(
            t + 20,
            "completion",
            {"completion_id": "c3", "segments": seg, "choices": [{"index": 0, "text": "n * 2"}]},
        ),
        _line(t + 21, "view", {"completion_id": "c3", "choice_index": 0}),
        _line(t + 22, "select", {"completion_id": "c3", "choice_index": 0}),
    ]
    day.write_text("".join(lines))
    events, bad = dry_run("tabby", day)
    assert bad == 0
    got = {e["id"]: (e["response"], e["label"], e["weight"]) for e in events}
    assert got == {
        "tabby:c1:1": ("return n + 1", 1, 1.0),
        "tabby:c1:0": ("return n", -1, 0.5),  # shown, not selected; choice 2 never shown
        "tabby:c2:0": ("n", -1, 0.5),
        "tabby:c3:0": ("n * 2", 1, 1.0),
    }
    examples = [x for e in events for x in to_examples(validate_event({**e, "source": "tabby"}))]
    derived = {(p.chosen, p.rejected) for p in derive_pairs(examples)}
    assert derived == {
        ("return n + 1", "return n"),
        ("return n + 1", "n"),
        ("n * 2", "return n"),
        ("n * 2", "n"),
    }
