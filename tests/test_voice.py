"""Voice transcripts: each implicit/explicit rule on fixture transcripts and in isolation."""

from __future__ import annotations

import pytest

from adapter_dryrun import dry_run
from adapter_harness import FIXTURES
from palate.adapters.voice import Turn, judge, livekit_turns, rate_conversation, repeated

V = FIXTURES / "voice"


def t(role: str, text: str, **kw) -> Turn:  # type: ignore[no-untyped-def]
    return Turn(role=role, text=text, id=text[:8], **kw)


P = t("user", "What time does the pharmacy open tomorrow?")
A = t("assistant", "It opens at nine.")


@pytest.mark.parametrize(
    ("follow", "answer", "expected"),
    [
        (t("user", "Thumbs up!"), A, (1, 1.0, "explicit")),
        (t("user", "Thumbs down."), A, (-1, 1.0, "explicit")),
        (t("user", "That's wrong, it opens at ten."), A, (-1, 1.0, "explicit")),
        (t("user", "That\u2019s right."), A, (1, 1.0, "explicit")),
        (t("user", "", feedback=-1), A, (-1, 1.0, "feedback")),
        (
            t("user", "Okay. And on Sunday?"),
            t("assistant", "It opens at nine.", interrupted=True),
            (-1, 0.3, "interrupted"),
        ),
        (t("user", "No, I meant the one on Main Street."), A, (-1, 0.4, "correction")),
        (t("user", "Actually the other pharmacy."), A, (-1, 0.4, "correction")),
        (t("user", "What time does the pharmacy open tomorrow?"), A, (-1, 0.4, "repeated")),
        (t("user", "Thanks, great."), A, (1, 0.2, "thanks")),
        (t("user", "And on Sunday?"), A, None),
        (t("user", "No, thanks."), t("assistant", "Shall I set a reminder?"), None),
        (
            t("user", "No, I said tomorrow."),
            t("assistant", "Shall I set a reminder?"),
            (-1, 0.4, "correction"),
        ),
    ],
)
def test_rules(follow: Turn, answer: Turn, expected: tuple | None) -> None:
    v = judge(P, answer, follow)
    assert (None if v is None else (v.label, v.weight, v.rule)) == expected


def test_explicit_beats_implicit_and_implicit_takes_the_strongest() -> None:
    interrupted = t("assistant", "It opens at nine.", interrupted=True)
    v = judge(P, interrupted, t("user", "Thumbs up, perfect."))
    assert v is not None and (v.label, v.weight) == (1, 1.0)
    v = judge(P, interrupted, t("user", "No, what time does the pharmacy open tomorrow?"))
    assert v is not None and (v.label, v.weight) == (-1, 0.4)
    assert set(v.rule.split("+")) == {"interrupted", "correction", "repeated"}
    assert judge(P, A, None) is None  # no follow-up yet: not judged


def test_repeated_question_needs_real_overlap() -> None:
    assert repeated("How far is the moon from the earth?", "how far is the moon from earth")
    assert not repeated("How far is the moon?", "How far is the sun from Mars today?")
    assert not repeated("Why?", "Why?")  # too short to call a repeat


def test_generic_jsonl_transcript() -> None:
    events, bad = dry_run("voice", V / "calls.jsonl")
    assert bad == 2  # broken JSON, role "robot"
    got = {e["id"]: (e["label"], e["weight"]) for e in events}
    assert got == {
        "voice:s1:s1-2": (1, 0.2),  # "Thanks! And on Tuesday?"
        "voice:s2:s2-2": (-1, 0.4),  # interrupted + "No, I said two people."
        "voice:s1:s1-4": (-1, 1.0),  # "Thumbs down, that's wrong."
        "voice:s3:s3-3": (-1, 0.4),  # the question asked again
        "voice:s3:s3-5": (1, 1.0),  # a feedback button
    }  # s4: "No, thanks." answers a question; the last answer has no follow-up yet
    s2 = next(e for e in events if e["id"] == "voice:s2:s2-2")
    assert s2["confidence"] == 0.8 and s2["context"]["domain"] == "voice"


def test_livekit_history_and_report() -> None:
    events, bad = dry_run("voice", V / "livekit_history.json", V / "livekit_report.json")
    assert bad == 0
    got = {e["id"]: (e["label"], e["weight"], e["prompt"]) for e in events}
    assert got == {
        "livekit:item_9f2c": (-1, 0.4, "When is my dentist appointment?"),
        "livekit:item_d4f2": (1, 0.2, "No, I said the dentist, not the doctor."),
        "livekit:item_r2": (-1, 1.0, "Turn on the kitchen lights."),
    }
    report = next(e for e in events if e["id"] == "livekit:item_r2")
    assert report["ts"] == 1755851003.5


def test_incomplete_livekit_export_is_reported_not_fatal() -> None:
    events, bad = dry_run("voice", V / "incomplete.json")
    assert (events, bad) == ([], 1)


def test_livekit_turns_skip_system_and_tools() -> None:
    import json

    turns = livekit_turns(json.loads((V / "livekit_history.json").read_text()))
    assert [x.role for x in turns] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert len(rate_conversation(turns)) == 2
