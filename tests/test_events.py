"""Events v1: every rule rejects with the field and reason; canonical forms are stable."""

from __future__ import annotations

import time

import pytest

from palate.errors import PalateError
from palate.events import (
    MAX_TEXT_CHARS,
    PairExample,
    RatingExample,
    derive_id,
    from_simple,
    to_examples,
    validate_event,
)

NOW = 1_790_000_000.0


def pair(**kw: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "kind": "pair",
        "source": "test",
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
    }
    ev.update(kw)
    return ev


def errors_of(obj: object, **kw: object) -> list[dict[str, str]]:
    with pytest.raises(PalateError) as ei:
        validate_event(obj, now=NOW, **kw)  # type: ignore[arg-type]
    assert ei.value.code == "invalid_event"
    errs: list[dict[str, str]] = ei.value.details["errors"]
    assert errs, "a rejection must list at least one field"
    return errs


def fields(errs: list[dict[str, str]]) -> set[str]:
    return {e["field"] for e in errs}


def test_each_kind_validates_to_canonical_form() -> None:
    p = validate_event(pair(id="e1", ts=NOW - 5, margin=0.5, context={"app": "vim"}), now=NOW)
    assert p == {
        "v": 1,
        "kind": "pair",
        "source": "test",
        "ts": NOW - 5,
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
        "margin": 0.5,
        "context": {"app": "vim"},
        "id": "e1",
    }
    r = validate_event(
        {"kind": "rating", "source": "s", "prompt": "p", "response": "r", "label": -1}, now=NOW
    )
    assert r["label"] == -1 and r["ts"] == NOW and r["id"].startswith("d-")
    s = validate_event(
        {"kind": "rating", "source": "s", "prompt": "p", "response": "r", "score": 0.25}, now=NOW
    )
    assert s["score"] == 0.25
    e = validate_event(
        {"kind": "edit", "source": "s", "prompt": "p", "original": "x", "edited": "y"}, now=NOW
    )
    assert e["edited"] == "y"
    k = validate_event(
        {"kind": "ranking", "source": "s", "prompt": "p", "responses": ["a", "b", "c"]}, now=NOW
    )
    assert k["responses"] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("event", "field", "reason_part"),
    [
        (pair(chosen="same", rejected="same"), "rejected", "differ"),
        (pair(prompt=""), "prompt", "empty"),
        (pair(prompt="   \n"), "prompt", "blank"),
        (pair(chosen=5), "chosen", "string"),
        (pair(source=""), "source", "non-empty"),
        (pair(source="has space"), "source", "letters"),
        (pair(ts=NOW * 1000), "ts", "future"),
        (pair(ts=12345), "ts", "milliseconds"),
        (pair(ts="yesterday"), "ts", "number"),
        (pair(ts=float("nan")), "ts", "finite"),
        (pair(id=""), "id", "non-empty"),
        (pair(id="has space"), "id", "printable"),
        (pair(id="x" * 200), "id", "128"),
        (pair(margin=-1), "margin", "0.."),
        (pair(weight=0), "weight", "(0"),
        (pair(confidence=2), "confidence", "0..1"),
        (pair(context={"colour": "red"}), "context.colour", "unknown key"),
        (pair(context="vim"), "context", "map"),
        (pair(extra=1), "extra", "not a field"),
        (pair(v=2), "v", "not supported"),
        (pair(chosen="x" * (MAX_TEXT_CHARS + 1)), "chosen", "limit"),
        (pair(chosen="bad \udcff utf8"), "chosen", "UTF-8"),
        ({"kind": "rating", "source": "s", "prompt": "p", "response": "r"}, "label", "exactly one"),
        (
            {"kind": "rating", "source": "s", "prompt": "p", "response": "r", "label": 2},
            "label",
            "+1 or -1",
        ),
        (
            {"kind": "rating", "source": "s", "prompt": "p", "response": "r", "label": True},
            "label",
            "+1 or -1",
        ),
        (
            {"kind": "rating", "source": "s", "prompt": "p", "response": "r", "score": 1.5},
            "score",
            "0..1",
        ),
        (
            {"kind": "edit", "source": "s", "prompt": "p", "original": "x", "edited": "x"},
            "edited",
            "differ",
        ),
        ({"kind": "ranking", "source": "s", "prompt": "p", "responses": ["a"]}, "responses", "2.."),
        (
            {"kind": "ranking", "source": "s", "prompt": "p", "responses": ["a", "a"]},
            "responses",
            "twice",
        ),
        (
            {"kind": "ranking", "source": "s", "prompt": "p", "responses": ["a", 3]},
            "responses[1]",
            "string",
        ),
        (
            {"kind": "ranking", "source": "s", "prompt": "p", "responses": "ab"},
            "responses",
            "array",
        ),
        ({"kind": "vote", "source": "s"}, "kind", "one of"),
        ("not a map", "event", "map"),
    ],
)
def test_rejections_name_field_and_reason(event: object, field: str, reason_part: str) -> None:
    errs = errors_of(event)
    matching = [e for e in errs if e["field"] == field]
    assert matching, f"expected an error on {field}, got {errs}"
    assert reason_part in matching[0]["reason"]


def test_all_problems_are_reported_at_once_with_batch_prefix() -> None:
    errs = errors_of(pair(prompt="", chosen=1, weight=-3), index=7)
    assert fields(errs) == {"events[7].prompt", "events[7].chosen", "events[7].weight"}


def test_derived_id_depends_on_content_and_source_not_time() -> None:
    a = validate_event(pair(ts=NOW - 100), now=NOW)
    b = validate_event(pair(ts=NOW - 1), now=NOW)
    c = validate_event(pair(source="other"), now=NOW)
    d = validate_event(pair(chosen="a2"), now=NOW)
    assert a["id"] == b["id"]
    assert len({a["id"], c["id"], d["id"]}) == 3
    assert derive_id(a) == a["id"]


def test_default_ts_is_now() -> None:
    ev = validate_event(pair())
    assert abs(ev["ts"] - time.time()) < 5


def test_from_simple_recognises_short_forms() -> None:
    assert from_simple({"prompt": "p", "chosen": "a", "rejected": "b"}, "imp")["kind"] == "pair"
    r = from_simple({"prompt": "p", "response": "a", "label": 1}, "imp")
    assert r["kind"] == "rating" and r["source"] == "imp"
    full = from_simple(
        {"kind": "edit", "source": "mine", "prompt": "p", "original": "a", "edited": "b"}, "imp"
    )
    assert full["source"] == "mine"


def test_to_examples() -> None:
    ev = validate_event(
        pair(margin=1.0, weight=2.0, confidence=0.5, context={"domain": "code"}), now=NOW
    )
    (ex,) = to_examples(ev)
    assert isinstance(ex, PairExample)
    assert (ex.chosen, ex.rejected, ex.margin, ex.weight, ex.domain) == ("a", "b", 1.0, 1.0, "code")
    zero = validate_event(pair(confidence=0.0), now=NOW)
    assert to_examples(zero)[0].weight == 0.0, "confidence 0 means no weight, not full weight"
    edit = validate_event(
        {"kind": "edit", "source": "s", "prompt": "p", "original": "old", "edited": "new"}, now=NOW
    )
    (ex2,) = to_examples(edit)
    assert isinstance(ex2, PairExample) and (ex2.chosen, ex2.rejected) == ("new", "old")
    rating = validate_event(
        {"kind": "rating", "source": "s", "prompt": "p", "response": "r", "label": -1}, now=NOW
    )
    (ex3,) = to_examples(rating)
    assert isinstance(ex3, RatingExample) and ex3.label == 0.0
    ranking = validate_event(
        {"kind": "ranking", "source": "s", "prompt": "p", "responses": ["a", "b", "c", "d"]},
        now=NOW,
    )
    pairs = to_examples(ranking)
    assert [(p.chosen, p.rejected) for p in pairs if isinstance(p, PairExample)] == [
        ("a", "b"),
        ("b", "c"),
        ("c", "d"),
        ("a", "d"),
    ]
