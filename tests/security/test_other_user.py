"""Another uid gets nothing, even with every permission on the path opened up.

tests/test_peer_uid.py checks the plain refusal (0755 dirs, 0666 socket). This goes further:
home, run dir and socket all 0777, and the other user (``nobody``) sends, on each of 150
concurrent connections, an ``ingest`` and a ``forget {all: true}`` and holds the connection
open. Every connection must get exactly the ``unauthorized`` error and nothing else, nothing
may be stored or deleted, the refusals must not count against the owner's connection limit,
and the owner must be served throughout.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import subprocess
import time

import msgpack
import pytest

from conftest import DaemonProc

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
N = 150

# Runs as `nobody` under the system Python, stdlib only.
ATTACKER = r"""
import socket, sys, time
path, payload, n = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
conns, failed = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(path)
            s.sendall(payload)
        except BlockingIOError:  # listen backlog full: the daemon has not accepted yet
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            failed += 1
        except OSError:
            failed += 1
        else:
            conns.append(s)
        break
print("OPEN", len(conns), failed, flush=True)
time.sleep(1.0)  # hold them while the owner works
for s in conns:
    out = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            out += data
    except OSError:
        pass
    print("REPLY", out.hex(), flush=True)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None,
    reason="switching to another uid needs root (CI is root) and a system python3",
)
def test_other_uid_gets_nothing_even_with_0777(palate_daemon: DaemonProc) -> None:
    d = palate_daemon
    with d.client() as c:
        c.ingest({"kind": "pair", "source": "owner", "prompt": "p", "chosen": "a", "rejected": "b"})
    sock = d.paths.socket
    payload = msgpack.packb(
        [
            0,
            1,
            "ingest",
            {
                "event": {
                    "kind": "pair",
                    "source": "evil",
                    "prompt": "p",
                    "chosen": "x",
                    "rejected": "y",
                }
            },
        ]
    ) + msgpack.packb([0, 2, "forget", {"all": True}])
    dirs = [d.paths.home, d.paths.run_dir, sock.parent]
    for p in dirs:
        os.chmod(p, 0o777)
    os.chmod(sock, 0o777)
    nobody = pwd.getpwnam("nobody")
    try:
        attacker = subprocess.Popen(
            [str(SYSTEM_PYTHON), "-c", ATTACKER, str(sock), payload.hex(), str(N)],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert attacker.stdout is not None
        opened = attacker.stdout.readline().split()
        assert opened[0] == "OPEN" and int(opened[1]) == N, opened
        # The owner, while the other user's connections are open.
        lat = []
        for i in range(5):
            t0 = time.monotonic()
            with d.client(timeout=10) as c:
                c.ingest(
                    {
                        "kind": "pair",
                        "source": "owner",
                        "prompt": f"during {i}",
                        "chosen": "a",
                        "rejected": "b",
                    }
                )
                assert c.status()["events"]["total"] == 2 + i
            lat.append(time.monotonic() - t0)
        out, err = attacker.communicate(timeout=120)
    finally:
        for p in dirs:
            os.chmod(p, 0o700)
        os.chmod(sock, 0o600)
    assert attacker.returncode == 0, err
    replies = [
        bytes.fromhex(line.split()[1]) if len(line.split()) > 1 else b""
        for line in out.splitlines()
        if line.startswith("REPLY")
    ]
    assert len(replies) == N
    expected = [
        2,
        "error",
        {
            "code": "unauthorized",
            "message": "this Palate daemon belongs to another user",
            "details": {},
        },
    ]
    for r in replies:
        assert list(msgpack.Unpacker(io.BytesIO(r), raw=False)) == [expected]
    print(f"\nowner under {N} foreign connections: max {max(lat) * 1000:.0f} ms per call")
    assert max(lat) < 2.0
    with d.client() as c:
        st = c.status()
    assert st["events"]["total"] == 6 and st["events"]["by_source"] == {"owner": 6}
    log = (d.paths.log_dir / "daemon.log").read_text()
    assert log.count("refused a connection from uid") >= N
