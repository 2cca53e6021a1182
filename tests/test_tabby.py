"""Tabby event logs: completions joined with view/select/dismiss, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

from adapter_dryrun import dry_run
from adapter_harness import FIXTURES
from palate.adapters import AdapterContext, DryRun
from palate.adapters.tabby import MAX_PENDING, TabbyParser
from palate.adapters.tailing import Tailer

DAY = FIXTURES / "tabby" / "events" / "2026-06-30.json"


def test_join_and_weights() -> None:
    events, bad = dry_run("tabby", DAY)
    assert bad == 2  # a cut-off JSON line and a ts that is not a number
    got = {e["id"]: (e["label"], e["weight"]) for e in events}
    assert got == {
        "tabby:cmpl-00000001:0": (1, 1.0),  # select
        "tabby:cmpl-00000002:0": (1, 0.5),  # select kind=line: partial accept
        "tabby:cmpl-00000003:0": (-1, 0.5),  # dismiss
        "tabby:cmpl-00000004:0": (-1, 0.25),  # viewed, then nothing for an hour
    }  # cmpl-5 was never viewed; cmpl-9 has no completion; cmpl-6 is still pending
    first = events[0]
    assert first["prompt"] == "def f(n):\n    <|cursor|>\n"
    assert first["response"] == "return n"
    assert first["ts"] == 1751270402.061  # the verdict's time, ms -> s
    assert first["context"]["language"] == "python"


def test_pending_join_survives_a_restart(tmp_path: Path) -> None:
    lines = DAY.read_text().splitlines(keepends=True)
    day = tmp_path / "events" / DAY.name
    day.parent.mkdir()
    day.write_text("".join(lines[:2]) + json.dumps(_filler(0)) + "\n")  # completion 1 + view
    sink = DryRun()
    committed: dict = {}

    def tailer() -> Tailer:
        t = Tailer(
            AdapterContext("tabby", sink=sink),
            [tmp_path],
            ["events/*.json"],
            TabbyParser(),
            watch=False,
        )
        t.committed = dict(committed)
        return t

    t = tailer()
    t.scan()
    assert sink.events == []  # nothing decided yet, nothing committed
    with day.open("a") as fh:  # another completion gets decided: a commit carrying state
        fh.write("".join(lines[3:6]))
    t.scan()
    assert [e["id"] for e in sink.events] == ["tabby:cmpl-00000002:0"]
    committed.update({c["key"]: c["value"] for c in sink.cursors if c})
    assert "cmpl-00000001" in committed[str(day)]["st"]["p"]
    with day.open("a") as fh:
        fh.write(lines[2])  # the select for completion 1, after a restart
    tailer().scan()
    assert sink.events[-1]["id"] == "tabby:cmpl-00000001:0"
    assert sink.events[-1]["label"] == 1


def _filler(i: int) -> dict:
    return {
        "user": None,
        "ts": 1751270400500 + i,
        "event": {"view": {"completion_id": "cmpl-x", "choice_index": 0}},
    }


def test_pending_set_is_bounded(tmp_path: Path) -> None:
    day = tmp_path / "events" / "2026-07-01.json"
    day.parent.mkdir()
    t0 = 1751328000000
    with day.open("w") as fh:
        for i in range(MAX_PENDING + 10):
            cid = f"cmpl-{i:08d}"
            fh.write(
                json.dumps(
                    {
                        "user": None,
                        "ts": t0 + i,
                        "event": {
                            "completion": {
                                "completion_id": cid,
                                "segments": {"prefix": "x = "},
                                "choices": [{"index": 0, "text": str(i)}],
                            }
                        },
                    }
                )
                + "\n"
            )
            fh.write(
                json.dumps(
                    {
                        "user": None,
                        "ts": t0 + i,
                        "event": {"view": {"completion_id": cid, "choice_index": 0}},
                    }
                )
                + "\n"
            )
    events, bad = dry_run("tabby", day)
    assert bad == 0
    assert len(events) == 10 and all(e["weight"] == 0.25 for e in events)  # the 10 oldest
