"""The default layout on Linux: no PALATE_HOME, the socket in $XDG_RUNTIME_DIR.

Adapter children and the browser's launcher must reach the socket the daemon serves. They
inherit the daemon's resolution explicitly (``Paths.child_env``: PALATE_HOME *and*
PALATE_SOCKET); a pinned PALATE_HOME alone would send them to ``<home>/run/palate.sock``,
where nothing listens, and they would retry forever.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

from conftest import PALATE, DaemonProc, wait_for
from default_layout import default_layout_env, environ, paths_in
from palate.adapters.native_host import DEFAULT_CHROME_ID, install, read_launcher
from palate.paths import resolve
from palate.runtime.supervisor import Supervisor

ORIGIN = f"chrome-extension://{DEFAULT_CHROME_ID}/"
INGEST = {
    "id": 2,
    "method": "ingest",
    "params": {"event": {"kind": "rating", "prompt": "q", "response": "a", "label": 1}},
}


def frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("=I", len(body)) + body


def frames(data: bytes) -> list[dict[str, Any]]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("=I", data, pos)
        out.append(json.loads(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


def browser_env(env: dict[str, str]) -> dict[str, str]:
    """What a browser started from a desktop launcher may give its hosts: no XDG_RUNTIME_DIR,
    nothing of Palate's."""
    keep = ("PATH", "HOME", "LANG")
    return {k: env[k] for k in keep if k in env}


def test_children_and_the_launcher_resolve_the_daemons_socket(tmp_path: Path) -> None:
    env = default_layout_env(tmp_path)
    paths = paths_in(env)
    assert paths.socket == tmp_path / "run" / "palate" / "palate.sock"
    assert paths.home == tmp_path / "user" / ".local" / "share" / "palate"

    # The bug this guards: PALATE_HOME alone moves the socket out of the runtime dir.
    assert paths_in({**env, "PALATE_HOME": str(paths.home)}).socket != paths.socket

    sup = Supervisor(["jsonl"], paths=paths, env=env)
    child = paths_in(sup.env)
    assert (child.home, child.socket) == (paths.home, paths.socket)
    with environ(env):  # given only the home, the supervisor resolves it in the daemon's env
        from_home = Supervisor(["jsonl"], home=paths.home, env=env)
    assert paths_in(from_home.env).socket == paths.socket

    with environ(env):
        res = install(["chrome"], home=paths.home)
    assert read_launcher(Path(res["launcher"])) == paths.child_env()
    assert res["socket"] == str(paths.socket)
    # What the host resolves when the browser starts the launcher with a bare environment.
    pinned = {**browser_env(env), **read_launcher(Path(res["launcher"]))}
    assert paths_in(pinned).socket == paths.socket


def test_an_explicit_home_keeps_its_socket_inside_it(tmp_path: Path) -> None:
    env = default_layout_env(tmp_path)
    with environ(env):
        assert resolve(tmp_path / "elsewhere").socket == tmp_path / "elsewhere/run/palate.sock"
        assert resolve().socket.parent == tmp_path / "run" / "palate"
        os.environ["PALATE_SOCKET"] = str(tmp_path / "pinned.sock")
        assert resolve(tmp_path / "elsewhere").socket == tmp_path / "pinned.sock"


def test_default_layout_adapters_browser_and_doctor(tmp_path: Path) -> None:
    env = default_layout_env(tmp_path)
    paths = paths_in(env)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    paths.home.mkdir(parents=True)
    paths.config_file.write_text(
        f'[adapters.jsonl]\nenabled = true\ndirs = ["{inbox}"]\npoll_interval_s = 0.5\n'
    )
    d = DaemonProc(tmp_path, env)
    d.paths = paths
    d.start()
    try:
        (inbox / "a.jsonl").write_text(
            json.dumps({"prompt": "p1", "chosen": "good", "rejected": "bad"}) + "\n"
        )
        with d.client() as c:
            wait_for(lambda: c.status()["events"]["total"] >= 1, 60, "the adapter's event")
            (row,) = c.status()["adapters"]
        assert row["connected"] is True and row["socket"] == str(paths.socket), row

        r = d.cli("browser", "install", "--browser", "chrome", "--json")
        assert r.returncode == 0, r.stderr
        launcher = Path(json.loads(r.stdout)["launcher"])
        host = subprocess.run(
            [str(launcher), ORIGIN],
            input=frame({"id": 1, "method": "hello"}) + frame(INGEST),
            capture_output=True,
            env=browser_env(env),
            timeout=60,
            check=False,
        )
        replies = frames(host.stdout)
        assert [("result" in x) for x in replies] == [True, True], (replies, host.stderr[-2000:])

        checks = {c["name"]: c for c in json.loads(d.cli("doctor", "--json").stdout)}
        assert checks["adapter jsonl"]["status"] == "ok", checks["adapter jsonl"]
        assert "connected" in checks["adapter jsonl"]["detail"]
        assert checks["browser"]["status"] == "ok", checks["browser"]

        # A launcher from before socket pinning (PALATE_HOME only) is found out.
        launcher.write_text(
            "#!/bin/sh\n"
            f"PALATE_HOME={paths.home}\nexport PALATE_HOME\n"
            f'exec {PALATE[0]} -m palate.adapters.native_host "$@"\n'
        )
        checks = {c["name"]: c for c in json.loads(d.cli("doctor", "--json").stdout)}
        assert checks["browser"]["status"] == "fail"
        assert "PALATE_SOCKET" in checks["browser"]["detail"]
    finally:
        d.terminate()


def test_doctor_names_an_adapter_that_cannot_reach_the_daemon(tmp_path: Path) -> None:
    from palate.service.checks_adapters import adapter_checks

    env = default_layout_env(tmp_path)
    paths = paths_in(env)
    paths.home.mkdir(parents=True)
    inbox = tmp_path / "inbox"
    paths.config_file.write_text(f'[adapters.jsonl]\nenabled = true\ndirs = ["{inbox}"]\n')
    status = {
        "daemon": {"socket": str(paths.socket)},
        "adapters": [
            {
                "name": "jsonl",
                "state": "running",
                "events": 0,
                "connected": False,
                "last_error": f"cannot connect to {paths.home}/run/palate.sock",
            }
        ],
    }
    (missing,) = adapter_checks(paths, status)
    assert missing.status == "warn" and str(inbox) in missing.detail  # no folder yet
    inbox.mkdir()
    (check,) = adapter_checks(paths, status)
    assert check.status == "fail" and "cannot reach the daemon's socket" in check.detail
    assert str(paths.socket) in check.detail
    status["adapters"][0].update(connected=True, socket=str(paths.socket), events=3)
    (check,) = adapter_checks(paths, status)
    assert check.status == "ok" and "connected, 3 event(s)" in check.detail
    assert adapter_checks(paths, None)[0].status == "warn"  # no daemon: it cannot tell
