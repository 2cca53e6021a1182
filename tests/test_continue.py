"""Continue dev-data files (fixtures written from packages/config-yaml/src/schemas/data/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adapter_dryrun import dry_run
from adapter_harness import FIXTURES
from palate.adapters import AdapterContext
from palate.adapters.code_context import CURSOR
from palate.adapters.continue_dev import ContinueAdapter

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
    ]  # the third line has no feedback: nothing sent


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
    assert len(names) == 5


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
    assert len(out["events"]) == 2 and out["bad_records"] == 0
