"""The one thread that owns the database, and group commit.

SQLite allows one writer at a time and every durable commit costs an fsync, so
the daemon funnels all store work through a single thread. Ingest requests that
arrive while a commit is in progress are gathered and committed together in the
next transaction: under load many clients share one fsync (throughput), at low
load a lone request commits immediately (latency). Everything else (status,
export, forget) runs on the same thread, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import sqlcipher3.dbapi2 as sqlite

from palate.errors import PalateError
from palate.store.database import IngestGroup, IngestResult, Store, storage_error

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Upper bound of events folded into one transaction; keeps commit latency bounded.
MAX_EVENTS_PER_COMMIT = 20_000
#: Jobs allowed to wait; beyond this the daemon answers ``busy`` instead of queueing.
MAX_QUEUED = 4_096


class _Ingest:
    """An ingest waiting for commit; its asyncio future is resolved from the store thread."""

    __slots__ = ("future", "group", "loop")

    def __init__(self, group: IngestGroup, loop: asyncio.AbstractEventLoop) -> None:
        self.group = group
        self.loop = loop
        self.future: asyncio.Future[list[IngestResult]] = loop.create_future()


def _resolve(pairs: list[tuple[_Ingest, Any]]) -> None:
    """On the event loop: answer every ingest of one commit in one callback."""
    for item, r in pairs:
        if item.future.done():
            continue
        if isinstance(r, BaseException):
            item.future.set_exception(r)
        else:
            item.future.set_result(r)


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[Store], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()


_STOP = object()


class StoreWriter:
    """Runs every store operation on one thread; batches ingests into shared commits."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="palate-store", daemon=True)
        self.commits = 0
        self.committed_events = 0

    def start(self) -> None:
        self._thread.start()

    def _put(self, item: Any) -> None:
        if self._q.qsize() < MAX_QUEUED:
            self._q.put(item)
        else:
            raise PalateError(
                "busy", "the store queue is full; retry shortly", {"queued": MAX_QUEUED}
            ) from None

    async def ingest(self, group: IngestGroup) -> list[IngestResult]:
        """Queue ``group`` and wait until it is durably committed."""
        item = _Ingest(group, asyncio.get_running_loop())
        self._put(item)
        return await item.future

    async def call(self, fn: Callable[[Store], T]) -> T:
        """Run ``fn(store)`` on the store thread and wait for its result."""
        item = _Call(fn)
        self._put(item)
        result: T = await asyncio.wrap_future(item.future)
        return result

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued work, checkpoint and close the database."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        pending: Any = None
        while True:
            item = pending if pending is not None else self._q.get()
            pending = None
            if item is _STOP:
                break
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            batch = [item]
            n = len(item.group.events)
            # Gather whatever else is already waiting: these share the commit.
            while n < MAX_EVENTS_PER_COMMIT:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, _Ingest):
                    pending = nxt
                    break
                batch.append(nxt)
                n += len(nxt.group.events)
            self._run_ingest(batch)
        try:
            self.store.close()
        except Exception:
            log.exception("closing the store failed")

    def _run_call(self, item: _Call) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        try:
            item.future.set_result(item.fn(self.store))
        except sqlite.Error as e:
            item.future.set_exception(storage_error(e, "reading the store", self.store.path))
        except BaseException as e:
            item.future.set_exception(e)

    def _run_ingest(self, batch: list[_Ingest]) -> None:
        try:
            results: list[Any] = list(self.store.ingest([b.group for b in batch]))
        except BaseException as e:  # a bug, not a storage error: fail these, keep running
            log.exception("ingest failed unexpectedly")
            results = [e] * len(batch)
        else:
            self.commits += 1
            self.committed_events += sum(len(r) for r in results if isinstance(r, list))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Ingest, Any]]] = {}
        for b, r in zip(batch, results, strict=True):
            by_loop.setdefault(b.loop, []).append((b, r))
        for loop, pairs in by_loop.items():
            # RuntimeError: the loop closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, pairs)
