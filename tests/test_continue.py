"""Continue dev-data files (fixtures written from packages/config-yaml/src/schemas/data/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adapter_dryrun import dry_run
from adapter_harness import FIXTURES
from palate.adapters import AdapterContext
from palate.adapters.code_context import CURSOR, file_conversation
from palate.adapters.continue_dev import ContinueAdapter, transcript

DEV = FIXTURES / "continue" / "dev_data"


def test_autocomplete_mapping() -> None:
    events, bad = dry_run("continue", DEV / "0.2.0" / "autocomplete.jsonl")
    assert bad == 2  # a truncated JSON line and accepted: "yes"
    by_id = {e["id"]: e for e in events}
    assert len(events) == 3  # no accepted -> no outcome; noCode line -> nothing to learn
    yes = by_id["continue:ac:6a1f0c2e-0000-4000-8000-000000000001"]
    assert (yes["label"], yes["weight"]) == (1, 1.0)
    assert yes["prompt"] == "def fib(n):\n    " + CURSOR + "\n\nprint(fib(10))\n"
    assert yes["response"].startswith("return n if n < 2")
    assert yes["context"] == {
        "app": "continue",
        "domain": "code",
        "task": "autocomplete",
        "language": "python",
        "conversation": file_conversation("/home/u/proj/fib.py"),
    }
    no = by_id["continue:ac:6a1f0c2e-0000-4000-8000-000000000002"]
    assert (no["label"], no["weight"]) == (-1, 0.5)  # rejected by 10 s timeout: weaker
    # The half-written last line (completion 7) is held back, not reported.
    assert not any(i.endswith("7") for i in by_id)


def test_secrets_in_code_context_are_stripped() -> None:
    events, _ = dry_run("continue", DEV / "0.2.0" / "autocomplete.jsonl")
    ts_event = next(e for e in events if e["context"].get("language") == "typescript")
    assert "sk-proj-" not in ts_event["prompt"]
    assert "[REDACTED:api_key]" in ts_event["prompt"]


def test_edit_outcome_and_chat_feedback() -> None:
    edits, _ = dry_run("continue", DEV / "0.2.0" / "editOutcome.jsonl")
    assert [(e["label"], e["weight"]) for e in edits] == [(1, 1.0), (-1, 1.0)]
    assert edits[0]["prompt"].startswith("Add type hints\n\ndef add(a, b)")
    assert edits[0]["response"].startswith("def add(a: int, b: int)")
    chats, _ = dry_run("continue", DEV / "0.2.0" / "chatFeedback.jsonl")
    assert [(e["prompt"], e["label"]) for e in chats] == [
        ("What does GIL stand for?", 1),
        ("Is Python compiled?", -1),
        # Continue's own rendering (<role>\n...): the turns without the system prompt.
        (
            "Human: How do I reverse a list in Python?\n\n"
            "Assistant: Use `xs[::-1]` or `xs.reverse()`.\n\nHuman: Which one copies?",
            1,
        ),
        ("Human: What is a monad?", -1),  # ChatML, generation prompt dropped
    ]  # the third line has no feedback: nothing sent
    assert all("important_rules" not in e["prompt"] for e in chats)
    assert chats[2]["context"]["conversation"] == "continue:7d9f2a10-1c2b-4d3e-8f40-5a6b7c8d9e0f"
    assert chats[0]["context"]["conversation"] == chats[1]["context"]["conversation"]


def test_chat_transcripts_from_each_template() -> None:
    llama3 = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert transcript(llama3) == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Name a prime."
    tool = "<user>\nls?\n\n<assistant>\nrunning\n\n<tool>\na.txt\n\n<user>\nand?\n\n"
    assert transcript(tool) == "Human: ls?\n\nAssistant: running\n\nHuman: and?"
    assert transcript("plain question") == "plain question"
    assert transcript("<system>\nonly a system prompt\n\n") == "<system>\nonly a system prompt\n\n"


def test_next_edit_outcomes_become_pairs() -> None:
    events, bad = dry_run("continue", DEV / "0.2.0" / "nextEditOutcome.jsonl")
    assert bad == 0
    assert [(e["kind"], e["weight"]) for e in events] == [("pair", 1.0), ("rating", 0.5)]
    took, left = events
    assert took["id"] == "continue:ne:ne-0001"
    assert (took["chosen"], took["rejected"]) == ("    return math.pi * r * r\n", "    return \n")
    assert took["prompt"] == f"import math\n\ndef area(r: float) -> float:\n    return {CURSOR}\n"
    # Shown and not taken, over a blank original (no text to prefer): a -1 rating at half
    # weight. Instinct's cursor marker becomes the editor prompt's.
    assert (left["response"], left["label"]) == ("    return 2 * r\n", -1)
    assert CURSOR in left["prompt"] and "user_cursor_is_here" not in left["prompt"]
    assert took["context"]["task"] == "next_edit"
    assert took["context"]["conversation"] == left["context"]["conversation"]  # one file


def test_legacy_0_1_0_files_and_dedupe_by_completion_id() -> None:
    new, _ = dry_run("continue", DEV / "0.2.0" / "autocomplete.jsonl")
    old, bad = dry_run(
        "continue", DEV / "0.1.0" / "autocomplete.jsonl", DEV / "0.1.0" / "chatFeedback.jsonl"
    )
    assert bad == 0
    assert len(old) == 3
    shared = {e["id"] for e in new} & {e["id"] for e in old}
    assert shared == {"continue:ac:6a1f0c2e-0000-4000-8000-000000000001"}
    legacy = next(e for e in old if e["id"] == "continue:ac:legacy-0001")
    assert legacy["ts"] == 1709280000.0


def test_root_follows_continue_global_dir(tmp_path: Path) -> None:
    ctx = AdapterContext("continue")
    os.environ["CONTINUE_GLOBAL_DIR"] = str(tmp_path)
    try:
        assert ContinueAdapter().roots(ctx) == [tmp_path]
    finally:
        del os.environ["CONTINUE_GLOBAL_DIR"]
    assert ContinueAdapter().roots(AdapterContext("continue", options={"root": "/x"})) == [
        Path("/x")
    ]
    t = ContinueAdapter().tailer(
        AdapterContext("continue", options={"root": str(FIXTURES / "continue")})
    )
    names = sorted(p.relative_to(FIXTURES / "continue").as_posix() for p in t.candidates())
    assert "dev_data/0.2.0/tokensGenerated.jsonl" not in names
    assert len(names) == 6


def test_cli_adapters_test_prints_events(tmp_path: Path) -> None:
    env = dict(os.environ, PALATE_HOME=str(tmp_path), PALATE_THIRD_PARTY_ADAPTERS="0")
    code = (
        "import sys; from palate.cli.adapters import adapters; "
        "adapters(['test', 'continue', sys.argv[1], '--json'])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(DEV / "0.2.0" / "chatFeedback.jsonl")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert len(out["events"]) == 4 and out["bad_records"] == 0
