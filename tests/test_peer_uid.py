"""Another user cannot talk to the daemon, even when the socket path is reachable."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import subprocess
from typing import Any

import msgpack
import pytest

from conftest import DaemonProc

# Runs as `nobody` under a system Python (the venv's interpreter lives under /root):
# stdlib only, it sends a msgpack `status` request and prints what comes back, hex-encoded.
CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-FAILED", e.errno); sys.exit(0)
s.sendall(bytes.fromhex(sys.argv[2]))
out = b""
while True:
    data = s.recv(65536)
    if not data:
        break
    out += data
print("REPLY", out.hex())
"""
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")


def run_as_nobody(sock: str) -> tuple[str, list[Any]]:
    nobody = pwd.getpwnam("nobody")
    request = msgpack.packb([0, 1, "status", {}]).hex()
    r = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", CLIENT, sock, request],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    if r.stdout.startswith("REPLY"):
        return "reply", list(
            msgpack.Unpacker(io.BytesIO(bytes.fromhex(r.stdout.split()[1])), raw=False)
        )
    return r.stdout.strip(), []


@pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None,
    reason="switching to another uid needs root (CI is root) and a system python3",
)
def test_other_uid_is_refused(palate_daemon: DaemonProc) -> None:
    sock = palate_daemon.paths.socket
    # First the normal protection: the 0700 directory keeps `nobody` from the path.
    outcome, _ = run_as_nobody(str(sock))
    assert outcome.startswith("CONNECT-FAILED")
    # Then make the path reachable (as a misconfiguration would): the peer-uid check
    # must still refuse before anything is decoded.
    os.chmod(sock.parent, 0o755)
    os.chmod(palate_daemon.paths.home, 0o755)
    os.chmod(sock, 0o666)
    try:
        outcome, msgs = run_as_nobody(str(sock))
    finally:
        os.chmod(sock.parent, 0o700)
        os.chmod(palate_daemon.paths.home, 0o700)
        os.chmod(sock, 0o600)
    assert outcome == "reply"
    assert msgs == [
        [
            2,
            "error",
            {
                "code": "unauthorized",
                "details": {},
                "message": "this Palate daemon belongs to another user",
            },
        ]
    ]
    with palate_daemon.client() as c:
        assert c.status()["events"]["total"] == 0
