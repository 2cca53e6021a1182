"""Clients that do not read, and refused ones, lose their connection and its socket
(issue 14 item 6).

* A client that keeps sending requests but never reads its answers used to be kept for ever:
  its answers piled up, its requests stayed "in flight" (so the idle timer never ran), and the
  connection slot and socket were held. Now a write that cannot drain within the send timeout
  drops the connection, and its socket is closed at once (``transport.abort``).
* Evicting such a client to make room (the connection limit) waited for it to read a farewell
  that it never read: the socket leaked. Now closing is bounded (``CLOSE_GRACE_S``).
* A refused connection of another uid could keep its socket by trickling a byte a second.

In-process, over a real Unix socket, with short timeouts (the daemon's own are 60 s and 2 s),
and counting the process's open sockets to see that none leaks; the other-uid case against
the real daemon as ``nobody``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProc
from palate.runtime import server as server_module
from palate.runtime.api import Api
from palate.runtime.server import Server
from palate.store.database import Store
from palate.store.keys import KeyStatus
from palate.store.writer import StoreWriter
from palate.wire import protocol

HELLO = protocol.pack([0, 1, "hello", {}])


def open_sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
    return n


@pytest.fixture
def api() -> Iterator[Api]:
    root = Path(tempfile.mkdtemp(prefix="slow-", dir="/tmp"))
    writer = StoreWriter(Store(root / "p.db", secrets.token_bytes(32)))
    writer.start()

    def key_status() -> KeyStatus:
        return KeyStatus("file", "", None, None, False, "none", None, None)

    yield Api(writer, key_status, root / "s.sock")
    writer.stop()
    shutil.rmtree(root, ignore_errors=True)


def client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(path)
    s.setblocking(False)
    return s


async def flood(s: socket.socket, seconds: float) -> int:
    """Send hello requests for ``seconds`` and read nothing; returns the bytes sent."""
    loop = asyncio.get_running_loop()
    sent, deadline = 0, loop.time() + seconds
    data = HELLO * 64
    while loop.time() < deadline:
        try:
            sent += s.send(data)
        except BlockingIOError:
            await asyncio.sleep(0.01)
        except OSError:
            break
        await asyncio.sleep(0)
    return sent


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_client_that_never_reads_is_dropped_and_its_socket_freed(api: Api) -> None:
    async def scenario() -> None:
        path = str(api.socket_path)
        srv = Server(api, path, idle_timeout_s=60.0, send_timeout_s=1.0, close_grace_s=0.5)
        await srv.start()
        base = open_sockets()
        s = client(path)
        try:
            sent = await flood(s, 2.0)
            assert sent > 50_000, "the client must have asked for many answers"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while srv.connections and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert not srv.connections, "a client that reads nothing was kept"
            print(f"\nnon-reading client: {sent} bytes of requests, dropped (send timeout 1 s)")
            assert srv.stalled == 1
            await asyncio.sleep(0.2)
            assert open_sockets() == base + 1, "the server's end of the socket leaked"
        finally:
            s.close()
            await srv.stop(1.0)

    asyncio.run(scenario())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_evicting_a_client_that_never_reads_frees_its_socket(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the connection limit, a hog's connection is evicted; if that client reads nothing,
    the farewell cannot be delivered, which must not keep the socket open."""
    monkeypatch.setattr(protocol, "MAX_CONNECTIONS", 2)
    pids = iter([101, 101, 202])
    monkeypatch.setattr(server_module, "peer_pid", lambda sock: next(pids))

    async def scenario() -> None:
        path = str(api.socket_path)
        # A send timeout far beyond the test: only the bounded close can free the socket.
        srv = Server(api, path, idle_timeout_s=60.0, send_timeout_s=300.0, close_grace_s=0.5)
        await srv.start()
        base = open_sockets()
        hogs = [client(path), client(path)]
        try:
            await asyncio.gather(*(flood(h, 1.5) for h in hogs))
            assert len(srv.connections) == 2
            newcomer = client(path)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while srv.evicted == 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            assert srv.evicted == 1
            # Three client sockets are ours; the server keeps exactly two of its ends.
            deadline = loop.time() + 15
            while open_sockets() > base + 3 + 2 and loop.time() < deadline:
                await asyncio.sleep(0.1)
            assert open_sockets() == base + 3 + 2, "the evicted connection's socket leaked"
            newcomer.close()
        finally:
            for h in hogs:
                h.close()
            await srv.stop(1.0)

    asyncio.run(scenario())


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")

# As `nobody`: connect, then trickle a byte every 0.3 s and never read; report when the
# daemon dropped the connection.
TRICKLER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
t0 = time.monotonic()
try:
    while time.monotonic() - t0 < 20:
        s.send(b"\x00")
        time.sleep(0.3)
    print("OPEN", round(time.monotonic() - t0, 1))
except OSError:
    print("CLOSED", round(time.monotonic() - t0, 1))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None,
    reason="switching to another uid needs root (CI is root) and a system python3",
)
def test_a_refused_other_uid_cannot_hold_its_connection(palate_daemon: DaemonProc) -> None:
    d = palate_daemon
    dirs = [d.paths.home, d.paths.run_dir, d.paths.socket.parent]
    for p in dirs:
        os.chmod(p, 0o777)
    os.chmod(d.paths.socket, 0o777)
    nobody = pwd.getpwnam("nobody")
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", TRICKLER, str(d.paths.socket)],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
    finally:
        for p in dirs:
            os.chmod(p, 0o700)
        os.chmod(d.paths.socket, 0o600)
    assert r.returncode == 0, r.stderr
    state, after = r.stdout.split()
    print(f"\nrefused other-uid connection, trickling: {state} after {after} s")
    assert state == "CLOSED" and float(after) < 5.0, r.stdout
    assert time.monotonic() - t0 < 30
    with d.client() as c:
        assert c.status()["events"]["total"] == 0
