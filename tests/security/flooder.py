"""A misbehaving local client, run as its own process by test_flood.py.

    python flooder.py MODE SOCKET [N]

Modes:

* ``idle``: open connections until refused (or N), send nothing, hold them.
* ``slowloris``: open N connections, each sends the start of a frame, then one more byte of
  it every 0.5 s (so the idle timer never fires), never completing it.
* ``inflight``: N connections, each keeps ``max_in_flight`` ``status`` requests outstanding
  (reads answers, sends a new request for each one).
* ``partial``: N connections, each sends all but the last byte of a frame of just under
  ``max_frame_bytes`` (the most the daemon buffers for one message).

Prints ``READY <connections>`` once the flood is in place, then keeps it up until stdin is
closed, and prints ``DONE <requests sent> <answers> <busy answers> <refused>``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import threading
import time

import msgpack

MAX_IN_FLIGHT = 64
FRAME = 4 * 1024 * 1024


def connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def refused(s: socket.socket) -> bool:
    """A connection the daemon answered with an error and closed straight away."""
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)
    return bool(data == b"" or data[:1] == b"\x93")


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    conns: list[socket.socket] = []
    stats = {"sent": 0, "answers": 0, "busy": 0, "refused": 0}
    for _ in range(n):
        s = connect(path)
        if s is None:
            stats["refused"] += 1
            break
        if mode == "idle":
            time.sleep(0.01)
            if refused(s):
                stats["refused"] += 1
                s.close()
                break
        conns.append(s)
    if mode == "slowloris":
        # [0, 1, "hello", {"client": <str of 1 MiB>...: the frame never completes.
        head = b"\x94\x00\x01\xa5hello\x81\xa6client\xdb" + (1 << 20).to_bytes(4, "big")
        for s in conns:
            s.sendall(head)
    elif mode == "partial":
        body = FRAME - 64
        frame = b"\x94\x00\x01\xa5hello\x81\xa6client\xc6" + body.to_bytes(4, "big")
        for s in conns:
            s.sendall(frame + b"x" * (body - 1))
    elif mode == "inflight":
        req = msgpack.packb([0, 1, "status", {}])
        for s in conns:
            s.sendall(req * MAX_IN_FLIGHT)
            stats["sent"] += MAX_IN_FLIGHT
    print(f"READY {len(conns)}", flush=True)
    sel = selectors.DefaultSelector()
    unpackers = {}
    if mode == "inflight":
        for s in conns:
            sel.register(s, selectors.EVENT_READ)
            unpackers[s] = msgpack.Unpacker(raw=False)
    while not stop.is_set():
        if mode == "slowloris":
            for s in conns:
                with contextlib.suppress(OSError):
                    s.send(b"x")
            stop.wait(0.5)
        elif mode == "inflight":
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                data = s.recv(1 << 16)
                if not data:
                    sel.unregister(s)
                    continue
                u = unpackers[s]
                u.feed(data)
                k = 0
                for m in u:
                    k += 1
                    if m[2] and m[2]["code"] == "busy":
                        stats["busy"] += 1
                stats["answers"] += k
                if k:
                    s.sendall(req * k)
                    stats["sent"] += k
        else:
            stop.wait(0.2)
    print("DONE {sent} {answers} {busy} {refused}".format(**stats), flush=True)
    for s in conns:
        s.close()
    os._exit(0)


if __name__ == "__main__":
    main()
