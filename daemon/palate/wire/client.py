"""Clients for the daemon's socket: :class:`Client` (blocking) and :class:`AsyncClient`.

Tests, the CLI and Python plugins all use these, so the protocol has one
reference implementation on each side. Errors from the daemon arrive as
:class:`palate.errors.PalateError` with the same code the wire carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack

from palate.errors import PalateError
from palate.paths import resolve
from palate.wire import protocol

Notify = Callable[[str, Any], None]


def _socket_path(home: Path | str | None, socket_path: Path | str | None) -> Path:
    if socket_path is not None:
        return Path(socket_path)
    return resolve(Path(home) if home is not None else None).socket


def _not_running(path: Path, e: OSError) -> PalateError:
    return PalateError(
        "unavailable",
        f"the Palate daemon is not running (cannot connect to {path}: {e.strerror or e}). "
        "Start it with `palate daemon` (or `make run`).",
        {"socket": str(path)},
    )


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=64 * 1024 * 1024)


class _Methods:
    """The typed method helpers, shared by both clients through ``call``."""

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def hello(self, client: str = "palate-python") -> dict[str, Any]:
        return dict(self.call("hello", {"client": client}))

    def ingest(self, event: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.call("ingest", {"event": dict(event)}))

    def ingest_batch(
        self, events: Iterable[Mapping[str, Any]], cursor: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"events": [dict(e) for e in events]}
        if cursor is not None:
            params["cursor"] = dict(cursor)
        return dict(self.call("ingest_batch", params))

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def cursors(self, adapter: str) -> dict[str, Any]:
        return dict(self.call("cursors", {"adapter": adapter})["cursors"])

    def forget(self, **selector: Any) -> int:
        return int(self.call("forget", selector)["deleted"])

    def score(self, prompt: str, responses: Sequence[str], **opts: Any) -> dict[str, Any]:
        """Raw and z scores of each response, and the model ``version`` that scored them."""
        return dict(self.call("score", {"prompt": prompt, "responses": list(responses), **opts}))

    def rerank(
        self, prompt: str, candidates: Sequence[str], top_k: int | None = None, **opts: Any
    ) -> dict[str, Any]:
        """``order`` (indices best-first), ``scores``, ``p_best``, ``confident``, ``version``."""
        params: dict[str, Any] = {"prompt": prompt, "candidates": list(candidates), **opts}
        if top_k is not None:
            params["top_k"] = top_k
        return dict(self.call("rerank", params))

    def compare(self, prompt: str, a: str, b: str, **opts: Any) -> dict[str, Any]:
        """``p_a_over_b``: the calibrated probability that this user prefers ``a``."""
        return dict(self.call("compare", {"prompt": prompt, "a": a, "b": b, **opts}))

    def review_list(self, limit: int | None = None) -> dict[str, Any]:
        """``{"items": [{id, prompt, a, b, why, ...}], "open": n}``, most valuable first."""
        return dict(self.call("review_list", {} if limit is None else {"limit": limit}))

    def review_answer(self, item_id: str, answer: str) -> dict[str, Any]:
        """``answer`` is ``a``, ``b``, ``tie`` or ``skip``; ``a``/``b`` store a pair event."""
        return dict(self.call("review_answer", {"id": item_id, "answer": answer}))

    def train(self, wait: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Start a training run in the daemon; with ``wait``, return when it has finished
        (progress arrives through ``on_notify``; use ``timeout=None`` on the client)."""
        params: dict[str, Any] = {"wait": wait}
        if reason:
            params["reason"] = reason
        return dict(self.call("train", params))

    def export(self, path: str | Path, overwrite: bool = False) -> int:
        return int(
            self.call("export", {"path": str(Path(path).absolute()), "overwrite": overwrite})[
                "count"
            ]
        )


class Client(_Methods):
    """A blocking client. One request at a time; safe to reuse, not to share across threads."""

    def __init__(
        self,
        home: Path | str | None = None,
        *,
        socket_path: Path | str | None = None,
        timeout: float | None = 60.0,
        on_notify: Notify | None = None,
    ) -> None:
        self.path = _socket_path(home, socket_path)
        self.timeout = timeout
        self.on_notify = on_notify
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError as e:
            self._sock.close()
            raise _not_running(self.path, e) from e
        self._unpacker = _unpacker()

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        msgid = next(self._ids) & 0xFFFFFFFF
        try:
            self._sock.sendall(protocol.pack([protocol.REQUEST, msgid, method, dict(params or {})]))
        except OSError as e:
            raise PalateError("unavailable", f"lost the connection to the daemon: {e}") from e
        while True:
            for msg in self._unpacker:
                result = self._handle(msg, msgid)
                if result is not _PENDING:
                    return result
            try:
                data = self._sock.recv(256 * 1024)
            except TimeoutError as e:
                raise PalateError(
                    "unavailable", f"no answer to {method} within {self.timeout} s"
                ) from e
            except OSError as e:
                raise PalateError("unavailable", f"lost the connection to the daemon: {e}") from e
            if not data:
                raise PalateError("unavailable", "the daemon closed the connection")
            self._unpacker.feed(data)

    def _handle(self, msg: Any, msgid: int) -> Any:
        if msg[0] == protocol.NOTIFICATION:
            if msg[1] == "error":
                raise PalateError.from_wire(msg[2])
            if self.on_notify is not None:
                self.on_notify(msg[1], msg[2])
            return _PENDING
        if msg[0] == protocol.RESPONSE and msg[1] == msgid:
            if msg[2] is not None:
                raise PalateError.from_wire(msg[2])
            return msg[3]
        return _PENDING

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_PENDING = object()


class AsyncClient:
    """An asyncio client that pipelines: many calls may be outstanding at once."""

    def __init__(
        self, home: Path | str | None = None, *, socket_path: Path | str | None = None
    ) -> None:
        self.path = _socket_path(home, socket_path)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> AsyncClient:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        except OSError as e:
            raise _not_running(self.path, e) from e
        self._task = asyncio.create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        assert self._reader is not None
        unpacker = _unpacker()
        err: PalateError = PalateError("unavailable", "the daemon closed the connection")
        try:
            while True:
                data = await self._reader.read(256 * 1024)
                if not data:
                    break
                unpacker.feed(data)
                for msg in unpacker:
                    if msg[0] == protocol.NOTIFICATION and msg[1] == "error":
                        err = PalateError.from_wire(msg[2])
                    elif msg[0] == protocol.RESPONSE:
                        fut = self._pending.pop(msg[1], None)
                        if fut is not None and not fut.done():
                            if msg[2] is not None:
                                fut.set_exception(PalateError.from_wire(msg[2]))
                            else:
                                fut.set_result(msg[3])
        except (OSError, asyncio.CancelledError):
            pass
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        if self._task is not None and self._task.done():
            raise PalateError("unavailable", "the connection to the daemon is closed")
        msgid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msgid] = fut
        self._writer.write(protocol.pack([protocol.REQUEST, msgid, method, dict(params or {})]))
        await self._writer.drain()
        return await fut

    async def ingest(self, event: Mapping[str, Any]) -> dict[str, Any]:
        return dict(await self.call("ingest", {"event": dict(event)}))

    async def ingest_batch(
        self, events: Iterable[Mapping[str, Any]], cursor: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"events": [dict(e) for e in events]}
        if cursor is not None:
            params["cursor"] = dict(cursor)
        return dict(await self.call("ingest_batch", params))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
