"""One message, however it is built, decodes to a bounded size (issue 14 item 5).

A valid 4 MiB message of tiny nested containers (one byte each on the wire, ~70 bytes each
as Python objects) decoded to ~255 MiB, and four connections sending one each took the daemon
from 66 MiB to 1.15 GiB. Now the decoder counts the elements of every container of a message
(``protocol.MAX_DECODED_ELEMENTS``) and refuses with ``too_large`` past the cap.

Measured here against the real daemon (peak RSS, ``VmHWM``, of four such messages at once
must stay under 700 MB) and in-process under the fuzz harnesses' heap bound (item 11: that
bound, 400 bytes per input byte, let 255 MiB through for a 4 MiB input).
"""

from __future__ import annotations

import atexit
import socket
import sys
import threading
from typing import Any

import msgpack
import pytest

from conftest import REPO, DaemonProc
from palate.wire import protocol

sys.path.insert(0, str(REPO / "fuzz"))
import inproc

pytestmark = pytest.mark.slow

#: 4,000,000 empty arrays in 400 arrays of 10,000: every container within max_array_len,
#: the whole message within max_frame_bytes.
INNER = b"\xdc" + (10_000).to_bytes(2, "big") + b"\x90" * 10_000


def tiny_containers(msgid: int = 1) -> bytes:
    """``[0, msgid, "hello", {"client": [[[] x 10000] x 400]}]``, 4,000,030 bytes."""
    body = b"\xdc" + (400).to_bytes(2, "big") + INNER * 400
    msg = (
        b"\x94"
        + msgpack.packb(0)
        + msgpack.packb(msgid)
        + msgpack.packb("hello")
        + b"\x81"
        + msgpack.packb("client")
        + body
    )
    assert len(msg) <= protocol.MAX_FRAME_BYTES
    return msg


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _send_and_read(path: str, data: bytes, out: list[Any], i: int) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(path)
    try:
        s.sendall(data)
        u = msgpack.Unpacker(raw=False)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            u.feed(chunk)
            msgs = list(u)
            if msgs:
                out[i] = msgs
                break
    except OSError as e:
        out[i] = e
    finally:
        s.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_four_tiny_container_messages_keep_the_daemon_under_700_mb(
    palate_daemon: DaemonProc,
) -> None:
    d = palate_daemon
    pid = d.proc.pid  # type: ignore[union-attr]
    data = tiny_containers()
    before = _status(pid, "VmRSS:")
    out: list[Any] = [None] * 4
    threads = [
        threading.Thread(target=_send_and_read, args=(str(d.paths.socket), data, out, i))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    peak = _status(pid, "VmHWM:")
    print(
        f"\n4 x {len(data) / 2**20:.1f} MiB of tiny containers: RSS {before / 2**20:.0f} MiB, "
        f"peak {peak / 2**20:.0f} MiB"
    )
    for msgs in out:
        assert isinstance(msgs, list), msgs
        assert msgs[-1][:2] == [protocol.NOTIFICATION, "error"], msgs
        assert msgs[-1][2]["code"] == "too_large", msgs[-1]
    assert peak < 700 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB"
    with d.client() as c:
        assert c.hello()["limits"]["max_decoded_elements"] == protocol.MAX_DECODED_ELEMENTS


def test_a_full_batch_fits_the_decoded_budget() -> None:
    """The cap must never refuse a legitimate message: the largest ingest_batch there is."""
    from palate.events import MAX_BATCH, MAX_RANKING

    events = [
        {
            "kind": "ranking",
            "source": "s",
            "id": f"e{i}",
            "prompt": "p",
            "responses": [f"r{j}" for j in range(MAX_RANKING)],
            "context": {f"k{j}": "v" for j in range(8)},
        }
        for i in range(MAX_BATCH)
    ]
    budget = protocol.DecodeBudget()
    u = protocol.make_unpacker(budget)
    u.feed(protocol.pack([0, 1, "ingest_batch", {"events": events, "cursor": {"a": 1}}]))
    assert len(u.unpack()[3]["events"]) == MAX_BATCH
    assert budget.left > 0


def test_the_fuzz_heap_bound_sees_a_decoding_blow_up() -> None:
    """What the harnesses check per input, on the one input they never generate (4 MiB):
    heap growth must stay within inproc.MEM_BASE + inproc.MEM_PER_BYTE * size."""
    env = inproc.make_env()
    try:
        data = tiny_containers()
        with inproc.MemoryBound() as mem:
            chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
            msgs = inproc.serve_bytes(env, chunks)
            mem.check(len(data), env)
        assert msgs[-1][2]["code"] == "too_large"
        print(f"\none 4 MiB tiny-container message: heap peak {env.peak / 2**20:.1f} MiB")
    finally:
        # make_env registers an exit-time report for libFuzzer runs; pytest tears down here,
        # so nothing may print after pytest's summary (tests/test_fuzz_wire.py checks it)
        atexit.unregister(env.report)
        env.close()
