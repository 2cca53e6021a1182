"""The daemon's scorer: one thread owns MLX, fed by a bounded queue.

Why one thread: MLX state (streams, caches, the loaded model) is not meant to be shared
across threads, and scoring must never block the socket loop, which keeps ingesting.
Requests arriving within a short window are micro-batched: candidates of several requests
go through one grouped forward (each prompt computed once, see scoring.py), which is where
the throughput under concurrent clients comes from. Scores are independent of batch
composition, so batching changes speed, never results.

Back-pressure: a full queue answers ``busy`` at once. A request past its deadline, or whose
client went away, is dropped before it costs any compute. The model is loaded lazily on the
first request, unloaded after an idle period to give the memory back, and swapped between
batches when a new version is deployed: a request is scored entirely by one version, and
the answer says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from palate.errors import PalateError

log = logging.getLogger(__name__)

#: Requests allowed to wait for the scoring thread; one more is answered ``busy``.
MAX_QUEUED = 64
#: How long the thread waits for more requests to batch with the first one.
BATCH_WINDOW_S = 0.004
#: Candidates scored in one batch across requests (bounds memory and latency).
MAX_BATCH_CANDIDATES = 64
#: Characters of text per batch (~4 per token). On a CPU a bigger batch buys no throughput
#: but makes every request in it wait for all of them, so batches stay small.
MAX_BATCH_CHARS = 12_000


@dataclass
class LoadedScorer:
    version: int
    scorer: Any  # palate.model.scoring.Scorer
    temperature: float
    mean: float
    std: float
    base: Any = None  # the loaded base model (generation samples from it)


Loader = Callable[[int | None], LoadedScorer | None]


@dataclass
class _Request:
    prompt: str
    responses: list[str]
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[LoadedScorer, Any]]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Call:
    """Work other than scoring that must run on the MLX thread (``generate``): ``fn`` gets
    a :class:`MlxContext`."""

    fn: Callable[[MlxContext], Any]
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)


class MlxContext:
    """What a :class:`_Call` may use on the MLX thread."""

    def __init__(self, service: ScoringService, call: _Call) -> None:
        self._service = service
        self._call = call

    def scorer(self) -> LoadedScorer:
        """The deployed reward model (loaded if needed); ``no_model`` when there is none."""
        return self._service._ensure_model()

    def between_steps(self) -> None:
        """Serve the scoring requests queued meanwhile, so a long call never starves them;
        stop the call (an exception nobody receives) once its caller is gone."""
        self._service._serve_queued()
        if self._call.cancelled.is_set():
            raise PalateError("busy", "the caller hung up or its deadline passed")


def _deliver(req: _Request | _Call, value: Any, error: BaseException | None) -> None:
    def set_it() -> None:
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
        req.loop.call_soon_threadsafe(set_it)


class ScoringService:
    """Owns the model and the MLX thread. ``load`` runs on that thread."""

    def __init__(
        self, load: Loader, *, idle_unload_s: float = 900.0, max_queued: int = MAX_QUEUED
    ) -> None:
        self._load = load
        self.idle_unload_s = idle_unload_s
        self._q: queue.Queue[_Request | _Call | None] = queue.Queue(maxsize=max_queued)
        self._deferred: list[_Call] = []  # calls met while batching or between steps
        self._thread = threading.Thread(target=self._run, name="palate-mlx", daemon=True)
        self._current: LoadedScorer | None = None
        self._want: int | None = None  # version to switch to before the next batch
        self._swap = threading.Event()
        self._last_used = time.monotonic()
        self.batches = 0
        self.scored = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(timeout)

    def deployed(self, version: int) -> None:
        """A new version was deployed: switch before the next batch (none is interrupted)."""
        self._want = version
        self._swap.set()

    def status(self) -> dict[str, Any]:
        cur = self._current
        return {
            "loaded": cur is not None,
            "version": cur.version if cur else None,
            "queued": self._q.qsize(),
            "batches": self.batches,
            "scored": self.scored,
        }

    async def score(
        self, prompt: str, responses: list[str], timeout_s: float
    ) -> tuple[LoadedScorer, Any]:
        """Queue one request and wait for (model used, palate.model.scoring.ScoreResult)."""
        loop = asyncio.get_running_loop()
        req = _Request(prompt, responses, time.monotonic() + timeout_s, loop, loop.create_future())
        # When full, the slots of requests already answered (deadline, hang-up) are freed first.
        if not (self._put(req) or (self._drop_cancelled() and self._put(req))):
            raise PalateError(
                "busy", "the scorer is saturated; retry shortly", {"queued": self._q.maxsize}
            )
        try:
            return await asyncio.wait_for(asyncio.shield(req.future), timeout_s + 1.0)
        except (asyncio.CancelledError, asyncio.TimeoutError) as e:
            req.cancelled.set()  # the thread skips it if it has not started yet
            if isinstance(e, asyncio.TimeoutError):
                raise PalateError("busy", f"no score within the {timeout_s:g} s deadline") from e
            raise

    async def run(self, fn: Callable[[MlxContext], Any], timeout_s: float) -> Any:
        """Run ``fn(context)`` on the MLX thread (after the batch in progress) and return
        its result; ``busy`` when the queue is full or the deadline passes first."""
        loop = asyncio.get_running_loop()
        call = _Call(fn, time.monotonic() + timeout_s, loop, loop.create_future())
        if not (self._put(call) or (self._drop_cancelled() and self._put(call))):
            raise PalateError(
                "busy", "the model thread is saturated; retry shortly", {"queued": self._q.maxsize}
            )
        try:
            return await asyncio.wait_for(asyncio.shield(call.future), timeout_s + 1.0)
        except (asyncio.CancelledError, asyncio.TimeoutError) as e:
            call.cancelled.set()
            if isinstance(e, asyncio.TimeoutError):
                raise PalateError("busy", f"no answer within the {timeout_s:g} s deadline") from e
            raise

    def _call(self, call: _Call) -> None:
        if call.cancelled.is_set():
            return
        if time.monotonic() > call.deadline:
            _deliver(call, None, PalateError("busy", "the request waited past its deadline"))
            return
        try:
            result = call.fn(MlxContext(self, call))
        except PalateError as e:
            if not call.cancelled.is_set():  # a stopped call's caller has been answered
                _deliver(call, None, e)
            return
        except Exception as e:
            log.exception("work on the model thread failed")
            _deliver(call, None, PalateError("model_error", f"{type(e).__name__}: {e}"))
            return
        self._last_used = time.monotonic()
        _deliver(call, result, None)

    def _serve_queued(self) -> None:
        """Score every request queued right now in one batch; calls wait their turn."""
        batch: list[_Request] = []
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._q.put(None)  # stop once the running call is done
                break
            if isinstance(item, _Call):
                self._deferred.append(item)
            else:
                batch.append(item)
        if batch:
            self._serve(batch)

    def _put(self, req: _Request | _Call) -> bool:
        try:
            self._q.put_nowait(req)
        except queue.Full:
            return False
        return True

    def _drop_cancelled(self) -> int:
        """Remove queued requests whose caller was already answered (deadline passed, or it
        hung up). Otherwise, while one long batch runs, they would hold every queue slot and
        a live request would be refused although nothing live is waiting."""
        q = self._q
        with q.mutex:
            keep = [r for r in q.queue if r is None or not r.cancelled.is_set()]
            dropped = len(q.queue) - len(keep)
            if dropped:
                q.queue.clear()
                q.queue.extend(keep)
                q.not_full.notify(dropped)
        return dropped

    # -- the MLX thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._deferred:
                self._call(self._deferred.pop(0))
                continue
            try:
                first = self._q.get(timeout=min(60.0, self.idle_unload_s))
            except queue.Empty:
                self._maybe_unload()
                continue
            if first is None:
                return
            if isinstance(first, _Call):
                self._call(first)
                continue
            batch = [first]
            n = len(first.responses)
            chars = _chars(first)
            window_end = time.monotonic() + BATCH_WINDOW_S
            while n < MAX_BATCH_CANDIDATES and chars < MAX_BATCH_CHARS:
                remaining = window_end - time.monotonic()
                try:
                    nxt = (
                        self._q.get(timeout=max(remaining, 0.0))
                        if remaining > 0
                        else self._q.get_nowait()
                    )
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)  # stop after this batch
                    break
                if isinstance(nxt, _Call):
                    self._deferred.append(nxt)  # runs right after this batch
                    break
                batch.append(nxt)
                n += len(nxt.responses)
                chars += _chars(nxt)
            self._serve(batch)

    def _serve(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for r in batch:
            if r.cancelled.is_set():
                continue
            if now > r.deadline:
                _deliver(r, None, PalateError("busy", "the request waited past its deadline"))
                continue
            live.append(r)
        if not live:
            return
        try:
            model = self._ensure_model()
        except PalateError as e:
            for r in live:
                _deliver(r, None, e)
            return
        except Exception as e:  # loading failed: report, stay up
            log.exception("loading the model failed")
            err = PalateError("model_error", f"the model could not be loaded: {e}")
            for r in live:
                _deliver(r, None, err)
            return
        try:
            results = model.scorer.score_many([(r.prompt, r.responses) for r in live])
        except Exception as e:
            log.exception("scoring failed")
            err = PalateError("model_error", f"scoring failed: {type(e).__name__}: {e}")
            for r in live:
                _deliver(r, None, err)
            return
        self.batches += 1
        self.scored += sum(len(r.responses) for r in live)
        self._last_used = time.monotonic()
        for r, res in zip(live, results, strict=True):
            _deliver(r, (model, res), None)

    def _ensure_model(self) -> LoadedScorer:
        if self._swap.is_set():
            self._swap.clear()
            want = self._want
            if self._current is None or self._current.version != want:
                log.info("switching the scorer to version %s", want)
                new = self._load(want)
                self._current = new
        if self._current is None:
            self._current = self._load(None)
            if self._current is not None:
                log.info("scorer loaded version %d", self._current.version)
        if self._current is None:
            raise PalateError(
                "no_model",
                "no model is deployed yet: give some feedback (`palate feedback`), then train "
                "one with `palate train --wait`",
            )
        return self._current

    def _maybe_unload(self) -> None:
        if self._current is not None and time.monotonic() - self._last_used > self.idle_unload_s:
            log.info("unloading idle model version %d", self._current.version)
            self._current = None
            gc.collect()
            with contextlib.suppress(Exception):
                import mlx.core as mx

                mx.clear_cache()


def _chars(req: _Request) -> int:
    return len(req.prompt) + sum(len(r) for r in req.responses)


def softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [x / s for x in e]


def store_loader(fetch: Callable[[int | None], tuple[dict[str, Any], bytes] | None]) -> Loader:
    """A loader reading artifacts from the encrypted store (via ``fetch``, which runs the
    read on the store thread) and keeping base models across swaps: a retrain on the same
    base reuses the loaded base instead of paying seconds and gigabytes again."""
    bases: dict[str, Any] = {}

    def load(version: int | None) -> LoadedScorer | None:
        got = fetch(version)
        if got is None:
            return None
        info, blob = got
        from palate.model import artifacts  # MLX is imported on the scoring thread, on first use

        art = artifacts.from_bytes(blob)
        want = art.config["base_model"]
        base = bases.get(want["content_hash"])
        loaded = artifacts.load_model(art, base)
        bases.clear()  # keep one base only: the one the deployed model needs
        bases[want["content_hash"]] = loaded.base
        cal = loaded.calibration
        return LoadedScorer(
            version=int(info["version"]),
            scorer=loaded.scorer(),
            temperature=float(cal.temperature),
            mean=float(cal.mean),
            std=float(cal.std),
            base=loaded.base,
        )

    return load
