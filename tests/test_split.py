"""The held-out split: stable, disjoint, and unmoved by growing data."""

from __future__ import annotations

import random

import pytest

from palate.evaluation.split import (
    DEFAULT_FRACTION,
    HELDOUT_SALT,
    MIN_HELDOUT_PAIRS,
    heldout_status,
    is_heldout,
    split_items,
    split_key,
    split_value,
)


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"prompt {seed}-{i} {rng.random():.6f}" for i in range(n)]


def test_split_is_stable_across_repeated_runs_and_orderings() -> None:
    items = _prompts(2000, 1)
    first = split_items(items, split_key)
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    again = split_items(shuffled, split_key)
    assert set(first.heldout) == set(again.heldout)
    assert set(first.train) == set(again.train)


def test_split_is_disjoint_and_complete() -> None:
    items = _prompts(2000, 2)
    s = split_items(items, split_key)
    assert not set(s.train) & set(s.heldout)
    assert sorted(s.train + s.heldout) == sorted(items)


def test_membership_never_changes_as_data_grows() -> None:
    old = _prompts(500, 3)
    before = split_items(old, split_key)
    grown = old + _prompts(3000, 4)
    random.Random(0).shuffle(grown)
    after = split_items(grown, split_key)
    assert set(before.heldout) <= set(after.heldout)
    assert set(before.train) <= set(after.train)
    assert not set(before.heldout) & set(after.train)


def test_fraction_is_roughly_respected() -> None:
    s = split_items(_prompts(10000, 5), split_key)
    assert abs(len(s.heldout) / 10000 - DEFAULT_FRACTION) < 0.015


def test_items_sharing_a_prompt_share_a_side() -> None:
    """Every pair of one ranking and a trivially different spelling of its prompt land on
    the side of the original. Sides are compared per *item* (comparing split keys would be
    true of any key function, normalising or not)."""
    prompts = _prompts(300, 6)
    items = [(i, p, k) for i, p in enumerate(prompts) for k in range(3)]
    items += [(i, p.upper() + "  \n", 9) for i, p in enumerate(prompts)]
    s = split_items(items, lambda it: split_key(it[1]))
    sides: dict[int, set[bool]] = {}
    for side, group in ((True, s.heldout), (False, s.train)):
        for i, _, _ in group:
            sides.setdefault(i, set()).add(side)
    assert all(len(v) == 1 for v in sides.values())
    assert {True, False} == {next(iter(v)) for v in sides.values()}  # both sides used


def test_conversation_id_and_message_lists() -> None:
    turn1 = [{"role": "user", "content": "Plan a trip"}]
    turn2 = [
        *turn1,
        {"role": "assistant", "content": "Where?"},
        {"role": "user", "content": "Rome"},
    ]
    assert split_key(turn1) == split_key(turn2)  # every turn of a conversation on one side
    assert split_key("anything", conversation_id="c1") == split_key("other", conversation_id="c1")
    assert split_key("x", conversation_id="c1") != split_key("x")


def test_salt_gives_an_independent_split() -> None:
    keys = [split_key(p) for p in _prompts(2000, 8)]
    a = {k for k in keys if is_heldout(k)}
    b = {k for k in keys if is_heldout(k, salt="another-salt:")}
    # Independent splits overlap about fraction^2, far from identical.
    assert len(a & b) < 0.5 * len(a)
    assert 0.0 <= split_value("k", HELDOUT_SALT) < 1.0


def test_bad_fraction_is_refused() -> None:
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError):
            is_heldout("k", bad)


def test_not_enough_data_says_so() -> None:
    low = heldout_status(12)
    assert not low.enough and low.minimum == MIN_HELDOUT_PAIRS
    assert "Not enough data yet" in low.message and "12" in low.message
    assert "38 more held-out pairs" in low.message
    ok = heldout_status(MIN_HELDOUT_PAIRS)
    assert ok.enough and str(MIN_HELDOUT_PAIRS) in ok.message


def test_hh_transcripts_are_keyed_on_their_first_user_turn() -> None:
    first = "Human: How do I bake bread?\n\nAssistant:"
    later = (
        "Human: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\n"
        "Human: And how long?\n\nAssistant:"
    )
    assert split_key(first) == split_key(later) == split_key("how do I bake  bread?")
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    assert split_key(messages) == split_key(later)  # one conversation, in either form
    assert split_key("Human: Something else\n\nAssistant:") != split_key(first)


def test_editor_contexts_are_keyed_on_file_and_region() -> None:
    below = "\n\ndef main():\n    run()\n"
    # Keystroke by keystroke at one place: the prefix grows, the code below stays.
    typing = [f"def f(x):\n    return {'x + 1'[:k]}<|cursor|>){below}" for k in range(6)]
    keys = {split_key(p, "file:aa") for p in typing}
    assert len(keys) == 1
    # The same place in another file, and another place in this file, are other keys.
    assert split_key(typing[0], "file:bb") not in keys
    elsewhere = "def f(x):\n    return x\n\ndef main():\n    <|cursor|>\n    run()\n"
    assert split_key(elsewhere, "file:aa") not in keys
    # At the end of a file the region is the end of that file.
    eof = [f"print({'hello'[:k]}<|cursor|>" for k in range(5)]
    assert len({split_key(p, "file:aa") for p in eof}) == 1
    assert split_key(eof[0], "file:aa") != split_key(eof[0], "file:bb")


def test_conversation_reaches_examples_and_the_training_validation_split() -> None:
    from palate.evaluation.split import example_key
    from palate.events import to_examples, validate_event
    from palate.model.training import VAL_SALT, _split

    events = [
        validate_event(
            {
                "kind": "rating",
                "source": "voice",
                "prompt": f"turn {i} of call {i % 40}",
                "response": "ok",
                "label": 1,
                "context": {"conversation": f"call-{i % 40}"},
            }
        )
        for i in range(400)
    ]
    examples = [ex for ev in events for ex in to_examples(ev)]
    assert examples[3].conversation == "call-3"
    assert example_key(examples[3]) == example_key(examples[43]) == "conv:call-3"
    held = split_items(examples, example_key)
    calls = {ex.conversation for ex in held.heldout}
    assert calls and not calls & {ex.conversation for ex in held.train}
    # Training's validation split is the same function (other salt): calls stay whole there too.
    train, val = _split(examples, 0.2)
    val_calls = {ex.conversation for ex in val}
    assert val_calls and not val_calls & {ex.conversation for ex in train}
    assert {ex.conversation for ex in val} == {
        ex.conversation for ex in split_items(examples, example_key, 0.2, VAL_SALT).heldout
    }
