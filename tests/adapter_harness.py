"""Helpers for the adapter tests: real adapter processes against a real daemon.

``AdapterProc`` starts ``python -m palate.adapters.runner NAME`` exactly as the
supervisor does and reads its status lines (JSON on stdout) in a thread, so a
test can wait for "ready", "scan" or "bad" without sleeping for a fixed time.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from palate.wire.client import Client

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SUPPORT = Path(__file__).resolve().parent / "plugins_support"
DENY = ["/home/u/secret/*"]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_config(home: Path, tables: dict[str, dict[str, Any]], deny: list[str] = DENY) -> None:
    lines = ["[adapters]", f"redact_deny = {toml_value(deny)}", ""]
    for name, opts in tables.items():
        lines.append(f"[adapters.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in opts.items()]
        lines.append("")
    (home / "config.toml").write_text("\n".join(lines))


def scenario(name: str, tmp: Path) -> tuple[dict[str, Any], int, int]:
    """(options, distinct events expected, bad records expected) for a built-in adapter,
    with its fixtures copied into ``tmp``."""
    common = {"enabled": True, "poll_interval_s": 0.5}
    if name == "continue":
        shutil.copytree(FIXTURES / "continue", tmp / "continue")
        return {**common, "root": str(tmp / "continue")}, 13, 2
    if name == "tabby":
        shutil.copytree(FIXTURES / "tabby", tmp / "tabby")
        return {**common, "root": str(tmp / "tabby")}, 4, 2
    if name == "jsonl":
        shutil.copytree(FIXTURES / "jsonl", tmp / "inbox")
        return {**common, "dirs": [str(tmp / "inbox")]}, 4, 3
    if name == "voice":
        shutil.copytree(FIXTURES / "voice", tmp / "voice")
        return {**common, "dirs": [str(tmp / "voice")]}, 8, 3
    raise KeyError(f"no contract scenario for adapter {name!r}: add one")


def adapter_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PALATE_HOME": str(home),
            "PALATE_KEY_BACKEND": "file",
            "PALATE_THIRD_PARTY_ADAPTERS": "0",
            "PYTHONPATH": os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")]),
        }
    )
    env.update(extra)
    return env


class AdapterProc:
    """One real adapter process; status lines collected in a thread."""

    def __init__(self, name: str, home: Path, **env: str) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.log = home / f"adapter-{name}.log"
        self._log = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "palate.adapters.runner", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=adapter_env(home, **env),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                self.lines.put({"type": "garbage", "raw": raw.decode(errors="replace")})

    def wait_for(self, kind: str, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Block until ``count`` status lines of ``kind`` arrived (the timeout only fails)."""
        deadline = time.monotonic() + timeout
        while sum(1 for m in self.seen if m.get("type") == kind) < count:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                raise AssertionError(
                    f"no {count} {kind!r} lines; got {self.seen}; "
                    f"log: {self.log.read_text()[-2000:]}"
                )
            try:
                self.seen.append(self.lines.get(timeout=min(left, 0.5)))
            except queue.Empty:
                continue
        return [m for m in self.seen if m.get("type") == kind]

    def stop(self, timeout: float = 20.0) -> int:
        self.proc.terminate()
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc


def total(socket: Path) -> int:
    with Client(socket_path=socket, timeout=10) as c:
        return int(c.status()["events"]["total"])


def wait_total(socket: Path, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while total(socket) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"store has {total(socket)} events, expected {n}")
        time.sleep(0.1)


def exported(socket: Path, path: Path) -> list[dict[str, Any]]:
    with Client(socket_path=socket, timeout=30) as c:
        c.export(path, overwrite=True)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
