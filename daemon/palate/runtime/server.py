"""The socket transport: accept, authenticate, frame, dispatch, answer.

Every connection is checked against the peer's uid (SO_PEERCRED on Linux,
LOCAL_PEERCRED on macOS) before a single byte is decoded: the 0700 socket
directory keeps other users out, and this check keeps them out even if that
directory is ever made reachable. Decoding is streaming and bounded by the
limits in ``protocol.py``. A malformed frame costs the offender its connection,
never the daemon or another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import msgpack

from palate.errors import PalateError
from palate.runtime.api import NOTIFY, Api
from palate.wire import protocol

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
#: Closing is bounded: after our last message, at most this long to let the peer read it and
#: to discard what it still sends; then the socket is dropped even with unsent data in it.
CLOSE_GRACE_S = 2.0
#: Methods whose work is pointless once the client hung up (reads, not writes: an ingest
#: that may have committed must still be answered if the peer is there).
CANCEL_ON_HANGUP = frozenset({"score", "rerank", "compare"})
SOL_LOCAL = 0  # macOS
LOCAL_PEERCRED = 0x001  # macOS
LOCAL_PEERPID = 0x002  # macOS


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    if sys.platform.startswith("linux"):
        so_peercred = getattr(socket, "SO_PEERCRED", 17)
        data = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", data)
        return int(uid)
    if sys.platform == "darwin" or "bsd" in sys.platform:
        # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
        data = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, struct.calcsize("2Ih16I"))
        _version, uid = struct.unpack_from("2I", data)
        return int(uid)
    raise OSError(f"peer credentials are not supported on {sys.platform}")


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that connected, or -1 where it cannot be read."""
    try:
        if sys.platform.startswith("linux"):
            so_peercred = getattr(socket, "SO_PEERCRED", 17)
            data = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
            return int(struct.unpack("3i", data)[0])
        if sys.platform == "darwin":
            return int(sock.getsockopt(SOL_LOCAL, LOCAL_PEERPID))
    except OSError:
        pass
    return -1


def abort(writer: asyncio.StreamWriter) -> None:
    """Drop the connection now: unsent data is discarded and the socket closed at once."""
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()
    else:  # a stand-in writer (fuzz/inproc.py)
        writer.close()


async def graceful_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, grace_s: float = CLOSE_GRACE_S
) -> None:
    """Close so that our last message (an error) reaches the peer, within ``grace_s``.

    Closing a Unix socket with unread input makes the kernel reset the connection,
    and the peer may then lose the error we just sent. So: half-close our side,
    discard what the peer still sends (bounded in bytes), then close. The whole of it is
    bounded in time too: a peer that trickles bytes, or never reads what we sent (so the
    close would wait for ever to flush), has its socket dropped when ``grace_s`` is up.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        discarded = 0
        while discarded < protocol.MAX_FRAME_BYTES:
            left = deadline - loop.time()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(reader.read(READ_CHUNK), min(1.0, left))
            if not chunk:
                break
            discarded += len(chunk)
    closed = False
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), max(deadline - loop.time(), 0.05))
        closed = True
    if not closed:
        abort(writer)


class Connection:
    """One client: its decoder, its in-flight requests and its write lock."""

    def __init__(
        self,
        server: Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pid: int = -1,
    ) -> None:
        self.server = server
        self.pid = pid  # the peer process, for the connection limit's fairness
        self.reader = reader
        self.writer = writer
        self.budget = protocol.DecodeBudget()
        self.unpacker = protocol.make_unpacker(self.budget)
        # Finds where each message ends without building anything, so the decoder above only
        # ever runs on complete messages. Decoding as bytes arrive would keep every object of
        # an unfinished message alive (msgpack preallocates each declared array: a 3-byte
        # array16 header holds 80 KB), and a message that never completes would keep it
        # for ever: 1000 nested headers (3 KB sent) held 81 MB per connection.
        self.scanner = protocol.make_unpacker()
        self.fed = 0  # bytes received on this connection
        self.msg_start = 0  # stream offset where the message being decoded began
        self.tasks: set[asyncio.Task[None]] = set()
        # Requests admitted whose answer has not yet been handed to the transport. Not
        # len(tasks): a task stays in that set until its done callback runs, after its
        # answer was written, so a client that sends its next request the moment an answer
        # arrives (as a client honouring max_in_flight does) could find the slot still
        # taken and be answered busy; and notifications are tasks too.
        self.unanswered = 0
        self.cancellable: set[asyncio.Task[None]] = set()
        self._write_lock = asyncio.Lock()
        self._last = 0.0  # loop time bytes last arrived
        self._evicted = False
        self._evict_reason = ""
        self._stalled = False
        self._task: asyncio.Task[Any] | None = None

    def evict(self, reason: str) -> None:
        """Close this connection to make room for another client (see Server._make_room)."""
        self._evicted = True
        self._evict_reason = reason
        if self._task is not None:
            self._task.cancel()

    async def send(
        self,
        data: bytes,
        timeout: float | None = None,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        """Write one message; a peer that does not read it within the send timeout
        (``timeout``, else the server's) is dropped, with everything queued for it.
        ``before_write`` runs under the write lock just before the bytes are handed over."""
        async with self._write_lock:
            if before_write is not None:
                before_write()
            if self.writer.is_closing():
                return
            self.writer.write(data)
            try:
                await asyncio.wait_for(
                    self.writer.drain(),
                    self.server.send_timeout_s if timeout is None else timeout,
                )
            except ConnectionError:
                pass
            except asyncio.TimeoutError:
                self.stall()

    def stall(self) -> None:
        """Drop a connection whose peer stopped reading its answers."""
        if self._stalled:
            return
        self._stalled = True
        self.server.stalled += 1
        log.info(
            "closing a connection that read none of its answers for %.0f s",
            self.server.send_timeout_s,
        )
        abort(self.writer)
        for task in list(self.tasks):
            task.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._idle = False
        me = self._task = asyncio.current_task()

        def watchdog() -> None:
            # A connection waiting on its own slow answer (a long forget) is not idle.
            if self.tasks:
                self._last = loop.time()
            if loop.time() - self._last >= idle_s:
                self._idle = True
                if me is not None:
                    me.cancel()
            else:
                self._timer = loop.call_at(self._last + idle_s, watchdog)

        idle_s = self.server.idle_timeout_s
        self._timer = loop.call_later(idle_s, watchdog)
        try:
            while True:
                try:
                    data = await self.reader.read(READ_CHUNK)
                except asyncio.CancelledError:
                    if self._stalled:
                        return
                    # The farewell gets a short send timeout: an evicted or idle peer may be
                    # one that does not read at all.
                    if self._evicted:
                        await self.send(
                            protocol.connection_error(PalateError("busy", self._evict_reason)),
                            self.server.close_grace_s,
                        )
                        return
                    if not self._idle:
                        raise
                    await self.send(
                        protocol.connection_error(
                            PalateError("invalid_request", "idle for too long; closing")
                        ),
                        self.server.close_grace_s,
                    )
                    return
                self._last = loop.time()
                if not data:
                    return
                self.fed += len(data)
                try:
                    self.unpacker.feed(data)
                    self.scanner.feed(data)
                    # msgpack frees the decoded parts of a message as they arrive, so
                    # max_buffer_size alone does not bound one message: count its bytes.
                    if self.fed - self.msg_start > protocol.MAX_FRAME_BYTES:
                        raise msgpack.BufferFull
                except msgpack.BufferFull:
                    await self._fatal(
                        "too_large",
                        f"a message exceeds the {protocol.MAX_FRAME_BYTES}-byte frame limit",
                    )
                    return
                if not await self._drain_messages():
                    return
        except ConnectionError:
            return
        finally:
            self._timer.cancel()
            await self._close()

    async def _drain_messages(self) -> bool:
        """Handle every complete message buffered so far. False: close the connection."""
        while True:
            try:
                try:
                    self.scanner.skip()
                except msgpack.OutOfData:
                    return True  # the next message is not complete yet
                self.budget.reset()
                obj = self.unpacker.unpack()
            except msgpack.StackError:
                await self._fatal("invalid_request", "message nested too deeply")
                return False
            except ValueError as e:
                # msgpack reports limit violations and malformed bytes as ValueError
                # subclasses; once it has failed the decoder cannot be trusted again.
                text = str(e) or type(e).__name__
                if "exceeds max" in text:
                    await self._fatal("too_large", f"message exceeds a size limit ({text})")
                else:
                    await self._fatal("invalid_request", f"undecodable msgpack ({text[:120]})")
                return False
            except Exception as e:
                await self._fatal("invalid_request", f"undecodable msgpack ({type(e).__name__})")
                return False
            self.msg_start = self.unpacker.tell()
            try:
                req = protocol.parse_message(obj)
            except PalateError as e:
                msgid = e.details.get("msgid")
                if msgid is None:
                    await self._fatal(e.code, e.message)
                    return False
                await self.send(protocol.response(msgid, e))
                continue
            if req.msgid is None:
                # Notifications get no answer by definition; none is defined yet.
                log.debug("ignored notification %s", req.method[:64])
                continue
            if self.unanswered >= protocol.MAX_IN_FLIGHT:
                await self.send(
                    protocol.response(
                        req.msgid,
                        PalateError(
                            "busy",
                            f"more than {protocol.MAX_IN_FLIGHT} requests in flight on this "
                            "connection; wait for answers before sending more",
                            {"max_in_flight": protocol.MAX_IN_FLIGHT},
                        ),
                    )
                )
                continue
            self.unanswered += 1
            task = asyncio.create_task(self._answer(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if req.method in CANCEL_ON_HANGUP:
                self.cancellable.add(task)
                task.add_done_callback(self.cancellable.discard)

    async def _answer(self, req: protocol.Request) -> None:
        assert req.msgid is not None
        # The slot is freed exactly once: just before the answer is written, or on the way
        # out if the task is cancelled (or fails) before that.
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self.unanswered -= 1

        try:
            await self._compute_and_send(req, free)
        finally:
            free()

    async def _compute_and_send(self, req: protocol.Request, free: Callable[[], None]) -> None:
        assert req.msgid is not None
        # Long-running methods (train with wait) stream progress back on this connection.
        NOTIFY.set(self._notify)
        try:
            try:
                result = await self.server.api.dispatch(req.method, req.params)
                payload = protocol.response(req.msgid, None, result)
            except PalateError as e:
                # Inside the outer try: an error that cannot be encoded must still be
                # answered (as internal), or the client would wait for ever.
                payload = protocol.response(req.msgid, e)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("method %s failed", req.method[:64])
            payload = protocol.response(
                req.msgid,
                PalateError(
                    "internal", "internal error; the daemon is still running (see its log)"
                ),
            )
        await self.send(payload, before_write=free)

    def _notify(self, method: str, params: Any) -> None:
        task = asyncio.create_task(self.send(protocol.notification(method, params)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _fatal(self, code: str, message: str) -> None:
        log.info("closing a connection: %s", message)
        await self.send(protocol.connection_error(PalateError(code, message)))

    async def _close(self) -> None:
        # Let already-dispatched work finish (an acknowledged event must be answered
        # if it committed), but do not wait forever on a client that went away.
        for task in list(self.cancellable):
            task.cancel()  # nobody is left to read the scores: free the scorer's queue
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=10)
        if self._stalled:
            abort(self.writer)
        else:
            await graceful_close(self.reader, self.writer, self.server.close_grace_s)


class Server:
    """The listening socket and the set of live connections."""

    def __init__(
        self,
        api: Api,
        path: str,
        *,
        idle_timeout_s: float = protocol.IDLE_TIMEOUT_S,
        send_timeout_s: float = protocol.SEND_TIMEOUT_S,
        close_grace_s: float = CLOSE_GRACE_S,
    ) -> None:
        self.api = api
        self.path = path
        self.idle_timeout_s = idle_timeout_s
        self.send_timeout_s = send_timeout_s
        self.close_grace_s = close_grace_s
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self.refused = 0
        self.evicted = 0
        self.stalled = 0

    async def start(self) -> None:
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, path=self.path, limit=READ_CHUNK
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            uid = peer_uid(sock)
        except OSError as e:
            log.warning("refusing a connection: cannot read peer credentials (%s)", e)
            uid = -1
        if uid != os.getuid():
            self.refused += 1
            log.warning(
                "refused a connection from uid %d (daemon runs as uid %d)", uid, os.getuid()
            )
            await self._reject(
                reader,
                writer,
                PalateError("unauthorized", "this Palate daemon belongs to another user"),
                self.close_grace_s,
            )
            return
        pid = peer_pid(sock)
        if len(self.connections) >= protocol.MAX_CONNECTIONS and not self._make_room(pid):
            await self._reject(
                reader,
                writer,
                PalateError("busy", f"too many connections (limit {protocol.MAX_CONNECTIONS})"),
                self.close_grace_s,
            )
            return
        conn = Connection(self, reader, writer, pid)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    def _make_room(self, pid: int) -> bool:
        """At the connection limit, one process must not lock every other one out (a leaky
        plugin, a flooder). If another process holds more connections than the one
        connecting, close that process's least recently active connection (idle ones first)
        and let the new one in. A process that already holds the most is refused."""
        by_pid: dict[int, list[Connection]] = {}
        for c in self.connections:
            if not c._evicted:
                by_pid.setdefault(c.pid, []).append(c)
        if not by_pid:
            return False
        hog = max(by_pid, key=lambda p: len(by_pid[p]))
        if len(by_pid[hog]) <= len(by_pid.get(pid, [])) or hog == pid:
            return False
        victim = min(by_pid[hog], key=lambda c: (bool(c.tasks), c._last))
        self.connections.discard(victim)
        self.evicted += 1
        log.info(
            "connection limit: closing the least recently active of %d connections "
            "held by pid %d to let pid %d in",
            len(by_pid[hog]),
            hog,
            pid,
        )
        victim.evict(
            f"too many connections (limit {protocol.MAX_CONNECTIONS}); this process holds "
            f"{len(by_pid[hog])} of them, so its least recently active one was closed"
        )
        return True

    @staticmethod
    async def _reject(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        err: PalateError,
        grace_s: float = CLOSE_GRACE_S,
    ) -> None:
        """Send ``err`` and close, all within ``grace_s``: a refused peer (another user, one
        over the limit) must not keep its socket by trickling bytes or by not reading."""
        with contextlib.suppress(Exception):
            writer.write(protocol.connection_error(err))
            await asyncio.wait_for(writer.drain(), grace_s)
        await graceful_close(reader, writer, grace_s)

    async def stop(self, timeout: float = 8.0) -> None:
        """Stop accepting, let in-flight requests finish, then drop connections."""
        if self._server is not None:
            self._server.close()
        tasks: set[Any] = set()
        for c in self.connections:
            tasks |= c.tasks
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for c in list(self.connections):
            with contextlib.suppress(Exception):
                c.writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
