"""The collection pause the UI sets is honoured where collection happens: the adapters'
``emit`` (every adapter, in its runner process) and the browser's native messaging host."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import DaemonProc, wait_for
from palate.adapters import AdapterContext, DryRun, PauseGuard
from palate.adapters.native_host import install
from palate.errors import PalateError
from test_native_host import frame, talk


def rating(i: int, **kw: Any) -> dict[str, Any]:
    return {"kind": "rating", "prompt": f"p{i}", "response": f"r{i}", "label": 1, **kw}


def stored(d: DaemonProc) -> dict[str, int]:
    with d.client() as c:
        return dict(c.status()["events"]["by_source"])


def test_adapter_emit_holds_events_while_paused(palate_daemon: DaemonProc) -> None:
    d = palate_daemon
    ctx = AdapterContext("tool", home=d.home)
    try:
        with d.client() as c:
            c.call("pause", {"for_s": 3600})
        res = ctx.emit([rating(1), rating(2)], cursor=("log", {"off": 10}))
        assert res.paused == 2 and res.sent == 0 and not res.committed_cursor
        assert stored(d) == {}
        with d.client() as c:
            c.call("resume")
            window = c.call("pause_state")["windows"][-1]
        ctx.pause._checked = float("-inf")  # as after PAUSE_CHECK_S
        # Read later (a backlog, a restart): what happened during the pause stays out.
        inside = (window[0] + window[1]) / 2
        res = ctx.emit([rating(3, ts=inside), rating(4)], cursor=("log", {"off": 20}))
        assert res.paused == 1 and res.accepted == 1 and res.committed_cursor
        assert stored(d) == {"tool": 1}
        with d.client() as c:
            assert c.cursors("tool") == {"log": {"off": 20}}
    finally:
        ctx.close()


def test_pause_is_asked_at_most_every_few_seconds() -> None:
    asked: list[float] = []
    now = [100.0]

    def ask() -> dict[str, Any]:
        asked.append(now[0])
        return {"paused": {"since": 1.0, "until": None}, "windows": [[10.0, 20.0]]}

    guard = PauseGuard(ask, lambda: now[0])
    for _ in range(5):
        guard.refresh()
    assert asked == [100.0] and guard.holds({"ts": 50.0})
    now[0] += 2.5
    guard.refresh()
    assert len(asked) == 2


def test_older_daemon_without_pause_never_holds() -> None:
    def ask() -> dict[str, Any]:
        raise PalateError("unknown_method", "no such method")

    guard = PauseGuard(ask, time.monotonic)
    guard.refresh()
    assert not guard.holds({"ts": time.time()})


def test_dry_runs_ignore_the_pause(tmp_path: Path) -> None:
    sink = DryRun()
    ctx = AdapterContext("tool", home=tmp_path / "nowhere", sink=sink)
    assert ctx.emit([rating(1)]).sent == 1 and len(sink.events) == 1


def test_native_host_holds_browser_events_while_paused(
    palate_daemon: DaemonProc, tmp_path: Path
) -> None:
    d = palate_daemon
    install(["chrome"], home=d.home, user_home=tmp_path / "user")
    origin = "chrome-extension://gkobkcohibebaggboflafmmjndlfhfgj/"
    with d.client() as c:
        c.call("pause")
    replies = talk(
        d.home,
        [
            frame({"id": 1, "method": "hello", "params": {}}),
            frame({"id": 2, "method": "ingest", "params": {"event": rating(1)}}),
            frame(
                {"id": 3, "method": "ingest_batch", "params": {"events": [rating(2), rating(3)]}}
            ),
        ],
        origin,
    )
    assert replies[0]["result"]["collection_paused"]["until"] is None
    assert replies[1]["result"] == {"dropped": True, "reason": "paused"}
    assert replies[2]["result"]["paused"] == 2 and replies[2]["result"]["accepted"] == 0
    assert stored(d) == {}
    with d.client() as c:
        c.call("resume")
    replies = talk(
        d.home, [frame({"id": 4, "method": "ingest", "params": {"event": rating(4)}})], origin
    )
    assert replies[0]["result"]["duplicate"] is False
    wait_for(lambda: stored(d) == {"browser": 1}, 5, "the event after resume is stored")
