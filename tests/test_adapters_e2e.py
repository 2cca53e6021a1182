"""End to end: a real daemon, the supervisor, a real adapter process, files appended over time.

Lines arrive in pieces (a half-written line), the file is rotated and truncated,
and the adapter process is killed -9 in the middle; every record must end up in
the store exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from adapter_harness import adapter_env, exported, total, write_config
from conftest import DaemonProc
from palate.runtime.supervisor import Supervisor


def line(i: int) -> str:
    return json.dumps(
        {"prompt": f"question {i}", "response": f"answer {i}", "accepted": i % 2 == 0}
    )


def test_appended_rotated_truncated_killed_exactly_once(
    palate_daemon: DaemonProc, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = inbox / "editor.jsonl"
    home, sock = palate_daemon.home, palate_daemon.paths.socket
    write_config(home, {"jsonl": {"enabled": True, "dirs": [str(inbox)], "poll_interval_s": 0.3}})

    async def until_total(n: int) -> None:
        deadline = time.monotonic() + 30
        while total(sock) < n:
            assert time.monotonic() < deadline, f"store has {total(sock)}, want {n}"
            await asyncio.sleep(0.1)

    def append(text: str, path: Path = log) -> None:
        with path.open("a") as fh:
            fh.write(text)

    async def scenario() -> Supervisor:
        sup = Supervisor(["jsonl"], home=home, env=adapter_env(home), backoff_initial=0.1)
        await sup.start()
        try:
            append(line(1) + "\n" + line(2) + "\n" + line(3)[:10])  # third line half-written
            await until_total(2)
            append(line(3)[10:] + "\n" + line(4) + "\n")
            await until_total(4)
            log.rename(inbox / "editor.jsonl.1")  # rotation: the old name gets a new file
            append(line(5) + "\n" + line(6) + "\n")
            await until_total(6)
            log.write_text(line(5) + "\n")  # truncation: same bytes at offset 0 dedupe
            append(line(7) + "\n")
            await until_total(7)
            pid = sup.states["jsonl"].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # crash; the supervisor restarts it
            append(line(8) + "\n")
            await until_total(8)
            deadline = time.monotonic() + 30
            while sup.states["jsonl"].state != "running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await sup.stop(5.0)
        return sup

    sup = asyncio.run(scenario())
    assert sup.states["jsonl"].restarts >= 1
    assert "SIGKILL" in (sup.states["jsonl"].last_error or "")
    events = exported(sock, tmp_path / "out.jsonl")
    prompts = sorted(e["prompt"] for e in events)
    assert prompts == sorted(f"question {i}" for i in range(1, 9))
    assert {e["source"] for e in events} == {"jsonl"}
    by_prompt = {e["prompt"]: e for e in events}
    assert by_prompt["question 2"]["label"] == 1 and by_prompt["question 3"]["label"] == -1
