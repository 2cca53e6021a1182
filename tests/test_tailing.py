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


def test_a_watched_tailer_idles_between_changes_and_wakes_on_one(tmp_path: Path) -> None:
    """The watchdog hint wakes a scan on a change, and only on a change. Reading a file is
    an inotify event too (opened, closed without writing): waking on those made every scan
    start the next, thousands of scans a second per adapter, most of two cores in a month
    of real use (and the month test's nightly runs starved in CI)."""
    import io
    import threading
    import time

    (tmp_path / "a.jsonl").write_text(rec(0) + rec(1))
    status = io.StringIO()
    sink = DryRun()
    ctx = AdapterContext("jsonl", sink=sink, status=status)
    # A long poll: any scan beyond the first two comes from a hint.
    t = Tailer(ctx, [tmp_path], ["*.jsonl"], JsonlParser(), poll_interval=30.0, watch=True)
    thread = threading.Thread(target=t.run, daemon=True)
    cpu0 = time.process_time()
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(sink.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # idle: nothing changes
        idle_scans = status.getvalue().count('"scan"')
        assert idle_scans <= 3, f"{idle_scans} scans in 2 s with nothing changing"
        with open(tmp_path / "a.jsonl", "a") as fh:
            fh.write(rec(2))
        deadline = time.monotonic() + 10
        while len(sink.events) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["prompt"] for e in sink.events] == ["q0", "q1", "q2"]  # woken, well before 30 s
        assert time.process_time() - cpu0 < 1.5
    finally:
        ctx.stop.set()
        ctx.wake.set()
        thread.join(10)
