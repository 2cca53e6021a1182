"""File tailing on real files: partial lines, restart from committed cursors, rotation,
truncation and inode reuse. The daemon is replaced by a DryRun sink that records
every batch and the cursor committed with it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from palate.adapters import AdapterContext, DryRun
from palate.adapters.jsonl import JsonlParser
from palate.adapters.tailing import Tailer


def rec(i: int) -> str:
    return json.dumps({"prompt": f"q{i}", "response": f"a{i}", "label": 1}) + "\n"


class Harness:
    """A tailer over ``root/*.jsonl``; ``restart()`` keeps only what was committed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sink = DryRun()
        self.committed: dict = {}
        self.restart()

    def restart(self) -> None:
        for c in self.sink.cursors:
            if c is not None:
                self.committed[c["key"]] = c["value"]
        ctx = AdapterContext("jsonl", sink=self.sink)
        self.t = Tailer(ctx, [self.root], ["*.jsonl"], JsonlParser(), watch=False)
        self.t.committed = dict(self.committed)

    def scan(self) -> list[str]:
        before = len(self.sink.events)
        self.t.scan()
        return [e["prompt"] for e in self.sink.events[before:]]


def test_half_written_line_is_held_back(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    f = tmp_path / "a.jsonl"
    f.write_text(rec(1) + rec(2)[:7])
    assert h.scan() == ["q1"]
    assert h.scan() == []
    with f.open("a") as fh:
        fh.write(rec(2)[7:])
    assert h.scan() == ["q2"]


def test_restart_resumes_from_the_committed_cursor(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    f = tmp_path / "a.jsonl"
    f.write_text(rec(1) + rec(2))
    assert h.scan() == ["q1", "q2"]
    cursor = h.sink.cursors[-1]
    assert cursor is not None and cursor["key"] == str(f)
    v = cursor["value"]
    st = f.stat()
    assert (v["dev"], v["ino"], v["off"], v["size"]) == (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_size,
    )
    h.restart()
    assert h.scan() == []
    with f.open("a") as fh:
        fh.write(rec(3))
    h.restart()
    assert h.scan() == ["q3"]


def test_rotation_continues_the_renamed_file_and_reads_the_new_one(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    f = tmp_path / "a.jsonl"
    f.write_text(rec(1))
    assert h.scan() == ["q1"]
    f.rename(tmp_path / "a-1.jsonl")
    with (tmp_path / "a-1.jsonl").open("a") as fh:
        fh.write(rec(2))  # written to the old file after the rename
    f.write_text(rec(3))
    h.restart()  # even across a restart the moved file is found by (dev, ino, head)
    assert sorted(h.scan()) == ["q2", "q3"]


def test_truncation_restarts_from_zero_and_ids_dedupe(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    f = tmp_path / "a.jsonl"
    f.write_text(rec(1) + rec(2) + rec(3))
    assert h.scan() == ["q1", "q2", "q3"]
    first_ids = [e["id"] for e in h.sink.events]
    f.write_text(rec(1))  # copytruncate-style: same inode, shorter
    assert h.scan() == ["q1"]
    assert h.sink.events[-1]["id"] == first_ids[0]  # same bytes, same place: same id


def test_inode_reuse_with_different_content_is_a_new_file(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    f = tmp_path / "a.jsonl"
    f.write_text(rec(1) + rec(2))
    assert h.scan() == ["q1", "q2"]
    ino = f.stat().st_ino
    with f.open("r+") as fh:  # rewritten in place, longer: same inode, new head
        fh.write(rec(7) + rec(8) + rec(9))
    assert f.stat().st_ino == ino
    h.restart()
    assert h.scan() == ["q7", "q8", "q9"]


def test_bad_lines_are_reported_and_skipped(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    (tmp_path / "a.jsonl").write_text(rec(1) + "{oops\n" + "\xff\n" + rec(2))
    assert h.scan() == ["q1", "q2"]
    assert h.t.ctx.bad_records == 2
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\n" + rec(3).encode())  # not UTF-8
    assert h.scan() == ["q3"]
    assert h.t.ctx.bad_records == 3


def test_lines_without_events_do_not_block_progress(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    f = tmp_path / "a.jsonl"
    f.write_text("{oops\n" * 3)
    assert h.scan() == []
    assert h.sink.cursors == []  # nothing to commit with: re-read after a restart
    with f.open("a") as fh:
        fh.write(rec(1))
    assert h.scan() == ["q1"]
    assert h.sink.cursors[-1]["value"]["off"] == os.path.getsize(f)
