"""The supervisor: real adapter child processes next to a real daemon.

A crashing adapter is restarted with (capped, exponential) backoff while the
daemon keeps serving; one that cannot load is skipped with its error shown; one
that ignores SIGTERM is killed at stop.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from adapter_harness import adapter_env, write_config
from conftest import DaemonProc
from palate.runtime.supervisor import Supervisor


def _supervisor(home: Path, names: list[str], **kw: float) -> Supervisor:
    return Supervisor(
        names, home=home, log_dir=home / "logs" / "adapters", env=adapter_env(home), **kw
    )


async def _until(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_crashing_adapter_restarts_with_backoff_daemon_unaffected(
    palate_daemon: DaemonProc,
) -> None:
    home = palate_daemon.home
    write_config(
        home,
        {
            "crashy": {"enabled": True, "module": "palate_test_plugins:Crashy"},
            "nosuch": {"enabled": True},
            "oldspec": {"enabled": True, "module": "palate_test_plugins:OldSpec"},
            "jsonl": {"enabled": True, "no_such_option": 1},
            "tabby": {"enabled": False},
        },
    )
    from palate.config import load_config
    from palate.paths import resolve

    cfg = load_config(resolve(home))
    assert cfg.adapters.enabled() == ["crashy", "jsonl", "nosuch", "oldspec"]

    async def scenario() -> dict[str, dict]:
        sup = _supervisor(home, cfg.adapters.enabled(), backoff_initial=0.05, backoff_max=0.4)
        await sup.start()
        try:
            await _until(lambda: sup.states["crashy"].restarts >= 4)
            await _until(
                lambda: all(sup.states[n].state == "failed" for n in ("nosuch", "oldspec", "jsonl"))
            )
            with palate_daemon.client() as c:  # the daemon never noticed
                assert c.hello()["name"] == "palate"
        finally:
            await sup.stop(5.0)
        return {s["name"]: s for s in sup.snapshot()}

    snap = asyncio.run(scenario())
    crashy = snap["crashy"]
    assert crashy["restarts"] >= 4
    assert "boom" in crashy["last_error"]
    assert crashy["events"] >= 1 and crashy["last_event_ts"] is not None
    assert crashy["state"] == "stopped" and crashy["pid"] is None
    assert "no adapter named 'nosuch'" in snap["nosuch"]["last_error"]
    assert "hook api 0" in snap["oldspec"]["last_error"]
    assert "unknown option 'no_such_option'" in snap["jsonl"]["last_error"]
    for name in ("nosuch", "oldspec", "jsonl"):
        assert snap[name]["restarts"] == 0  # skipped, not retried
    assert palate_daemon.alive()
    with palate_daemon.client() as c:
        st = c.status()["events"]
    assert st["by_source"] == {"crashy": 1}  # the same id on every restart: stored once
    assert "boom" in (home / "logs" / "adapters" / "crashy.log").read_text()


def test_backoff_doubles_and_is_capped(palate_daemon: DaemonProc) -> None:
    write_config(
        palate_daemon.home, {"crashy": {"enabled": True, "module": "palate_test_plugins:Crashy"}}
    )
    delays: list[float] = []

    async def scenario() -> None:
        sup = _supervisor(palate_daemon.home, ["crashy"], backoff_initial=0.02, backoff_max=0.08)
        sup.on_backoff = delays.append  # observe the delays the supervisor chose
        await sup.start()
        await _until(lambda: len(delays) >= 5)
        await sup.stop(5.0)

    asyncio.run(scenario())
    assert delays[:5] == [0.02, 0.04, 0.08, 0.08, 0.08]


def test_stop_kills_an_adapter_that_ignores_sigterm(palate_daemon: DaemonProc) -> None:
    write_config(
        palate_daemon.home,
        {"stubborn": {"enabled": True, "module": "palate_test_plugins:Stubborn"}},
    )

    async def scenario() -> int:
        sup = _supervisor(palate_daemon.home, ["stubborn"])
        await sup.start()
        await _until(lambda: sup.states["stubborn"].state == "running")
        pid = sup.states["stubborn"].pid
        assert pid is not None
        await sup.stop(0.5)
        return pid

    pid = asyncio.run(scenario())
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_no_adapters_means_no_children(palate_daemon: DaemonProc) -> None:
    async def scenario() -> list[dict]:
        sup = _supervisor(palate_daemon.home, [])
        await sup.start()
        await sup.stop(1.0)
        return sup.snapshot()

    assert asyncio.run(scenario()) == []
