"""The daemon's methods, as plain async functions over the store writer.

The socket server (``server.py``) is a thin transport over this class: it
decodes a request, calls ``Api.dispatch(method, params)`` and encodes what comes
back. Parameter checking lives here so every transport enforces the same rules.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from palate import API_LEVEL, __version__
from palate.errors import PalateError
from palate.events import MAX_BATCH, MAX_TEXT_CHARS, validate_event
from palate.model.ensemble import (
    Question,
    agreement,
    bounds_separate,
    pair_information,
    pick_question,
)
from palate.runtime.jobs import TrainingJobs
from palate.runtime.scheduler import Scheduler
from palate.runtime.serving import ScoringService, softmax
from palate.store.database import POLICY_KIND, IngestGroup, Store, export_jsonl
from palate.store.keys import KeyStatus
from palate.store.writer import StoreWriter
from palate.wire.protocol import LIMITS

MIN_API_LEVEL = 1
#: Scoring limits (docs/protocol.md): candidates per request, characters per text. Texts past
#: the model's token window are truncated (prompt from the left) and flagged, never refused.
MAX_CANDIDATES = 32
MAX_SCORE_TEXT = 50_000
DEFAULT_SCORE_TIMEOUT_S = 30.0
#: generate (docs/generation.md): new tokens per candidate, and the default deadline (a CPU
#: samples ~10-30 tokens/s per sequence); policy_register: held-out pairs a client may send.
MAX_GENERATE_TOKENS = 1024
DEFAULT_GENERATE_TIMEOUT_S = 300.0
MAX_EVAL_PAIRS = 1000
#: p(top > runner-up) needed to call a rerank "confident".
CONFIDENT_P = 0.75

#: How a handler sends notifications to the connection that called it (set per request by
#: the transport; a no-op elsewhere).
NOTIFY: contextvars.ContextVar[Callable[[str, Any], None]] = contextvars.ContextVar(
    "palate_notify", default=lambda method, params: None
)
MAX_CURSOR_BYTES = 64 * 1024
#: Browsing limits: events per `events_list` page, characters of a search.
MAX_PAGE_EVENTS = 200
MAX_QUERY_CHARS = 1000
DEFAULT_PREVIEW = 200
#: The longest timed pause (30 days), the ended pause windows kept, and their meta key.
MAX_PAUSE_S = 30 * 86_400
PAUSE_WINDOWS = 50
PAUSE_META = "collection_pause"
log = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]

#: The review queue (docs/protocol.md `review_list`): items per list, the answers, the source
#: of the pair event an answer becomes, and the largest lambda of a rerank's lower bound.
DEFAULT_REVIEW_LIST = 20
MAX_REVIEW_LIST = 100
REVIEW_ANSWERS = ("a", "b", "tie", "skip")
REVIEW_SOURCE = "review"
MAX_LOWER_BOUND = 100.0
#: Open questions re-scored after a deploy (most valuable first).
REVIEW_RESCORE_MAX = 200
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")


def _members(res: Any) -> np.ndarray:
    """Member scores (N, K) of a scored request; a model without members is one member."""
    members = getattr(res, "members", None)
    return np.asarray(members if members else [[r] for r in res.raw], dtype=np.float64)


def _uncertainty(res: Any) -> list[float]:
    unc = getattr(res, "uncertainty", None)
    return [float(u) for u in unc] if unc else [0.0] * len(res.raw)


def _clip(x: float) -> float:
    return max(min(x, 700.0), -700.0)


def _review_entry(source: str, prompt: str, a: str, b: str) -> dict[str, Any] | None:
    """A queue item for (prompt, a, b), or None when the answer could not become a valid
    pair event. The id is a hash of the question (either order), so it is asked once."""
    try:
        validate_event(
            {"kind": "pair", "source": REVIEW_SOURCE, "prompt": prompt, "chosen": a, "rejected": b}
        )
    except PalateError:
        return None
    x, y = sorted((a, b))
    digest = hashlib.sha256("\x1f".join((prompt, x, y)).encode("utf-8")).hexdigest()
    return {"id": "q-" + digest[:24], "source": source, "prompt": prompt, "a": a, "b": b}


def _param(
    params: Mapping[str, Any], name: str, types: type | tuple[type, ...], *, required: bool = False
) -> Any:
    if name not in params or params[name] is None:
        if required:
            raise PalateError("invalid_request", f"missing parameter {name!r}", {"param": name})
        return None
    value = params[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise PalateError(
            "invalid_request", f"parameter {name!r} has the wrong type", {"param": name}
        )
    if not isinstance(value, types):
        raise PalateError(
            "invalid_request",
            f"parameter {name!r} has the wrong type ({type(value).__name__})",
            {"param": name},
        )
    if isinstance(value, str) and not _utf8(value):
        # Invalid UTF-8 arrives as lone surrogates; the store cannot bind them (and a
        # failed bind inside a transaction would leave the store unusable).
        raise PalateError(
            "invalid_request", f"parameter {name!r} is not valid UTF-8", {"param": name}
        )
    return value


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _version(params: Mapping[str, Any], *, required: bool = False) -> Any:
    """A model version: an int; one outside SQLite's 64-bit range cannot exist."""
    version = _param(params, "version", int, required=required)
    if version is not None and not -(2**63) <= version < 2**63:
        raise PalateError("not_found", f"no model version {version}")
    return version


def _finite(params: Mapping[str, Any], name: str) -> float | None:
    value = _param(params, name, (int, float))
    if value is None:
        return None
    if not isinstance(value, float):
        if not -(2**63) <= value < 2**63:
            raise PalateError("invalid_request", f"{name} is out of range", {"param": name})
        value = float(value)
    if not math.isfinite(value):
        raise PalateError("invalid_request", f"{name} must be a finite number", {"param": name})
    return value


def _bounded(params: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = _param(params, name, int)
    if value is not None and not lo <= value <= hi:
        raise PalateError(
            "invalid_request", f"{name} must be in {lo}..{hi}, got {value}", {"param": name}
        )
    return value


def _recent(windows: list[list[float]], now: float) -> list[list[float]]:
    """Ended pause windows worth keeping: the last PAUSE_WINDOWS, none older than 90 days."""
    return [w for w in windows if w[1] > now - 90 * 86_400][-PAUSE_WINDOWS:]


def _no_extra(params: Mapping[str, Any], allowed: set[str]) -> None:
    extra = [str(k)[:64] for k in params if k not in allowed]
    if extra:
        raise PalateError(
            "invalid_request",
            f"unknown parameter(s): {', '.join(extra)}",
            {"unknown": extra, "allowed": sorted(allowed)},
        )


class Api:
    """Every wire method of api level 1. Stateless apart from the store writer."""

    def __init__(
        self, writer: StoreWriter, key_status: Callable[[], KeyStatus], socket_path: Path
    ) -> None:
        self.writer = writer
        self.key_status = key_status
        self.socket_path = socket_path
        self.started = time.time()
        self.methods: dict[str, Handler] = {
            "hello": self.hello,
            "ingest": self.ingest,
            "ingest_batch": self.ingest_batch,
            "status": self.status,
            "cursors": self.cursors,
            "forget": self.forget,
            "export": self.export,
            "models": self.models,
            "deploy": self.deploy,
            "rollback": self.rollback,
            "train": self.train,
            "review_list": self.review_list,
            "review_answer": self.review_answer,
            "review_add": self.review_add,
            "score": self.score,
            "rerank": self.rerank,
            "compare": self.compare,
            "generate": self.generate,
            "policy_register": self.policy_register,
            "events_list": self.events_list,
            "event_get": self.event_get,
            "events_stats": self.events_stats,
            "pause": self.pause,
            "resume": self.resume,
            "pause_state": self.pause_state,
        }
        #: Collection pause (docs/protocol.md `pause`): since when, until when (None: until
        #: resumed), and recent ended windows; kept in the store's meta, so it survives restarts.
        self._pause: dict[str, Any] | None = None
        self._pause_windows: list[list[float]] = []
        #: The nightly scheduler; set by the daemon.
        self.scheduler: Scheduler | None = None
        #: The scorer (one MLX thread); set by the daemon.
        self.serving: ScoringService | None = None
        #: Training runs (child processes); set by the daemon.
        self.jobs: TrainingJobs | None = None
        #: Adapter supervision snapshot, set by the daemon when it runs adapters.
        self.adapter_states: Callable[[], list[dict[str, Any]]] = list
        #: Policies and bases for generate/policy_register (docs/generation.md); on MLX thread.
        self.generation: Any = None
        #: Called with the new version after every deploy/rollback (the scorer hot-swaps).
        self.on_deploy: list[Callable[[int], Awaitable[None]]] = []
        #: The review queue is ordered by the deployed model's view: re-scored after a deploy.
        self.on_deploy.append(self._rescore_review)
        self._background: set[asyncio.Task[None]] = set()

    async def dispatch(self, method: str, params: Mapping[str, Any]) -> Any:
        handler = self.methods.get(method)
        if handler is None:
            raise PalateError(
                "unknown_method",
                f"unknown method {method[:64]!r}; this daemon speaks api level {API_LEVEL}",
                {"methods": sorted(self.methods)},
            )
        return await handler(params)

    async def hello(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Handshake: who we are, which api level, which methods, which limits."""
        _no_extra(params, {"client", "api_level"})
        _param(params, "client", str)
        wanted = _param(params, "api_level", int)
        if wanted is not None and wanted < MIN_API_LEVEL:
            raise PalateError(
                "invalid_request",
                f"api level {wanted} is no longer supported; "
                f"this daemon supports {MIN_API_LEVEL}..{API_LEVEL}",
            )
        return {
            "name": "palate",
            "version": __version__,
            "api_level": API_LEVEL,
            "min_api_level": MIN_API_LEVEL,
            "methods": sorted(self.methods),
            "limits": {**LIMITS, "max_batch_events": MAX_BATCH},
            "pid": os.getpid(),
        }

    async def ingest(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """One event; acknowledged only after its durable commit."""
        _no_extra(params, {"event"})
        event = validate_event(_param(params, "event", dict, required=True))
        (result,) = await self.writer.ingest(IngestGroup([event]))
        return result.to_wire()

    async def ingest_batch(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Many events (and an adapter cursor) committed atomically: all or none."""
        _no_extra(params, {"events", "cursor"})
        raw = _param(params, "events", (list, tuple), required=True)
        if not raw:
            raise PalateError("invalid_request", "events must not be empty")
        if len(raw) > MAX_BATCH:
            raise PalateError(
                "too_large",
                f"a batch holds at most {MAX_BATCH} events, got {len(raw)}; split it",
                {"max_batch_events": MAX_BATCH},
            )
        events, errors = [], []
        now = time.time()
        for i, obj in enumerate(raw):
            try:
                events.append(validate_event(obj, now=now, index=i))
            except PalateError as e:
                errors.extend(e.details.get("errors", []))
        if errors:
            raise PalateError(
                "invalid_event",
                f"batch rejected, nothing stored: {errors[0]['field']} {errors[0]['reason']}"
                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                {"errors": errors},
            )
        cursor = self._cursor(params.get("cursor"))
        results = await self.writer.ingest(IngestGroup(events, cursor))
        dup = sum(r.duplicate for r in results)
        return {
            "accepted": len(results) - dup,
            "duplicates": dup,
            "results": [r.to_wire() for r in results],
        }

    @staticmethod
    def _cursor(obj: Any) -> dict[str, Any] | None:
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise PalateError("invalid_request", "cursor must be a map {adapter, key, value}")
        _no_extra(obj, {"adapter", "key", "value"})
        adapter = _param(obj, "adapter", str, required=True)
        key = _param(obj, "key", str, required=True)
        if not adapter or len(adapter) > 64 or not key or len(key) > 1024:
            raise PalateError(
                "invalid_request",
                "cursor adapter (1-64 chars) and key (1-1024 chars) must be non-empty strings",
            )
        if "value" not in obj:
            raise PalateError("invalid_request", "cursor needs a value")
        from palate.wire.protocol import pack

        try:
            packed = pack(obj["value"])
        except UnicodeEncodeError:
            raise PalateError("invalid_request", "cursor value is not valid UTF-8") from None
        if len(packed) > MAX_CURSOR_BYTES:
            raise PalateError("too_large", f"cursor value exceeds {MAX_CURSOR_BYTES} bytes")
        return {"adapter": adapter, "key": key, "value": obj["value"]}

    async def cursors(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The cursors an adapter committed, so it resumes where its last batch ended."""
        _no_extra(params, {"adapter"})
        adapter = _param(params, "adapter", str, required=True)
        return {
            "adapter": adapter,
            "cursors": await self.writer.call(lambda s: s.get_cursors(adapter)),
        }

    async def status(self, params: Mapping[str, Any]) -> dict[str, Any]:
        _no_extra(params, set())

        def read(s: Store) -> dict[str, Any]:
            return {
                "events": s.counts(),
                "db": {
                    "path": str(s.path),
                    "size_bytes": s.size_bytes(),
                    "schema_version": s.schema_version(),
                },
                "review": s.review_counts(),
            }

        info = await self.writer.call(read)
        key = self.key_status()  # read fresh: `palate key rotate` may have run since start
        return {
            **info,
            "adapters": self.adapter_states(),
            "schedule": await self.scheduler.snapshot() if self.scheduler else None,
            "scorer": self.serving.status() if self.serving else None,
            "training": {
                "current": self.jobs.current.to_wire() if self.jobs and self.jobs.current else None,
                "last": self.jobs.last.to_wire() if self.jobs and self.jobs.last else None,
            },
            "key_backend": key.backend,
            "key": {k: v for k, v in key.to_dict().items() if k != "key_id"},
            "paused": self.paused(),
            "daemon": {
                "version": __version__,
                "api_level": API_LEVEL,
                "pid": os.getpid(),
                "started": self.started,
                "uptime_s": round(time.time() - self.started, 3),
                "socket": str(self.socket_path),
                "commits": self.writer.commits,
            },
        }

    async def forget(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Delete events for real (see Store.forget). Needs an explicit selector."""
        _no_extra(params, {"ids", "source", "since", "until", "all"})
        ids = _param(params, "ids", (list, tuple))
        if ids is not None and (not ids or not all(isinstance(i, str) and _utf8(i) for i in ids)):
            raise PalateError("invalid_request", "ids must be a non-empty array of (UTF-8) strings")
        source = _param(params, "source", str)
        since = _param(params, "since", (int, float))
        until = _param(params, "until", (int, float))
        everything = bool(_param(params, "all", bool))
        if everything and any(x is not None for x in (ids, source, since, until)):
            raise PalateError("invalid_request", "all cannot be combined with other selectors")
        if not everything and all(x is None for x in (ids, source, since, until)):
            raise PalateError(
                "invalid_request", "forget needs a selector: ids, source, since/until, or all=true"
            )
        selector = {
            "ids": list(ids) if ids is not None else None,
            "source": source,
            "since": None if since is None else float(since),
            "until": None if until is None else float(until),
            "everything": everything,
        }
        # Review questions hold user text too: they go first, so forget's VACUUM wipes them.
        await self.writer.call(lambda s: s.forget_review(**selector))
        try:
            n = await self.writer.call(
                lambda s: s.forget(
                    ids=list(ids) if ids is not None else None,
                    source=source,
                    since=None if since is None else float(since),
                    until=None if until is None else float(until),
                    everything=everything,
                )
            )
        finally:
            # Forget may have replaced a deployed model trained on the forgotten events with
            # an earlier one (Store.forget): serve that one now, even if the purge failed.
            loaded = self.serving.status()["version"] if self.serving else None
            deployed = await self.writer.call(lambda s: s.deployed_version())
            if loaded is not None and deployed is not None and deployed != loaded:
                await self._deployed(deployed)
        return {"deleted": n}

    async def export(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Write every event as JSONL to an absolute path the user named."""
        _no_extra(params, {"path", "overwrite"})
        raw = _param(params, "path", str, required=True)
        if "\x00" in raw:
            raise PalateError("invalid_request", "export path must not contain NUL")
        try:
            path = Path(raw).expanduser()
        except RuntimeError:  # ~user of a user that does not exist
            raise PalateError("not_found", f"cannot expand {raw[:200]!r}: no such user") from None
        if path.is_absolute() and not path.name:
            raise PalateError("invalid_request", "export path must name a file, got '/'")
        overwrite = bool(_param(params, "overwrite", bool))
        try:
            n = await self.writer.call(
                lambda s: export_jsonl(s.iter_events(), path, overwrite=overwrite)
            )
        except OSError as e:  # from checking the path (writing maps its own errors)
            code = "invalid_request" if e.errno == errno.ENAMETOOLONG else "storage_error"
            raise PalateError(code, f"export to {str(path)[:200]} failed: {e.strerror}") from e
        return {"path": str(path), "count": n}

    # -- browsing (read only) ----------------------------------------------------------
    async def events_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A page of stored events, newest first, filtered and searched (the web UI)."""
        _no_extra(
            params,
            {"source", "kind", "since", "until", "q", "before", "limit", "preview", "full"},
        )
        source = _param(params, "source", str)
        kind = _param(params, "kind", str)
        since = _finite(params, "since")
        until = _finite(params, "until")
        q = _param(params, "q", str)
        if q is not None and len(q) > MAX_QUERY_CHARS:
            raise PalateError("too_large", f"q is longer than {MAX_QUERY_CHARS} characters")
        before = _bounded(params, "before", 0, 2**63 - 1)
        limit = _bounded(params, "limit", 1, MAX_PAGE_EVENTS)
        preview = _bounded(params, "preview", 1, MAX_TEXT_CHARS)
        full = bool(_param(params, "full", bool))
        return await self.writer.call(
            lambda s: s.list_events(
                source=source,
                kind=kind,
                since=since,
                until=until,
                q=q or None,
                before=before,
                limit=50 if limit is None else limit,
                preview=None if full else (preview or DEFAULT_PREVIEW),
            )
        )

    async def event_get(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """One stored event, whole."""
        _no_extra(params, {"id"})
        event_id = _param(params, "id", str, required=True)
        return {"event": await self.writer.call(lambda s: s.get_event(event_id))}

    async def events_stats(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """What the data covers: per day by source, by kind, hour of day, context values."""
        _no_extra(params, {"days", "tz_offset_s"})
        days = _bounded(params, "days", 1, 366)
        tz = _bounded(params, "tz_offset_s", -14 * 3600, 14 * 3600)
        return await self.writer.call(
            lambda s: s.event_stats(days=days or 30, tz_offset_s=tz or 0)
        )

    # -- collection pause ----------------------------------------------------------------
    async def load_pause(self) -> None:
        """Read the pause state kept in the store (the daemon calls this at start)."""
        saved = await self.writer.call(lambda s: s.get_meta(PAUSE_META))
        if isinstance(saved, dict):
            self._pause = saved.get("current")
            self._pause_windows = list(saved.get("windows") or [])
        if self.paused() is None:
            self._pause = None

    def paused(self) -> dict[str, Any] | None:
        """``{since, until, remaining_s}`` while collection is paused, else None."""
        p = self._pause
        if p is None:
            return None
        now = time.time()
        until = p.get("until")
        if until is not None and until <= now:
            self._pause = None
            self._pause_windows = _recent([*self._pause_windows, [p["since"], until]], now)
            return None
        return {
            "since": p["since"],
            "until": until,
            "remaining_s": None if until is None else round(until - now, 3),
        }

    async def _save_pause(self) -> None:
        state = {"current": self._pause, "windows": self._pause_windows}
        await self.writer.call(lambda s: s.set_meta(PAUSE_META, state))

    async def pause(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Pause collection by adapters and the browser for ``for_s`` seconds, or until
        ``resume``. Deliberate feedback (the CLI, the UI's review) is still accepted."""
        _no_extra(params, {"for_s"})
        for_s = _finite(params, "for_s")
        if for_s is not None and not 0 < for_s <= MAX_PAUSE_S:
            raise PalateError(
                "invalid_request",
                f"for_s must be in (0, {MAX_PAUSE_S}] seconds; leave it out to pause until resumed",
                {"param": "for_s"},
            )
        now = time.time()
        current = self.paused()
        since = current["since"] if current else now
        self._pause = {"since": since, "until": None if for_s is None else now + for_s}
        await self._save_pause()
        log.info("collection paused %s", "until resumed" if for_s is None else f"for {for_s:.0f} s")
        return {"paused": self.paused()}

    async def resume(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """End a pause now (a no-op when collection is not paused)."""
        _no_extra(params, set())
        current = self.paused()
        if current is not None:
            now = time.time()
            self._pause = None
            self._pause_windows = _recent([*self._pause_windows, [current["since"], now]], now)
            await self._save_pause()
            log.info("collection resumed")
        return {"paused": None, "was_paused": current is not None}

    async def pause_state(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Cheap: the pause (or None) and recent ended pause windows, for adapters to honour."""
        _no_extra(params, set())
        state = self.paused()
        return {"paused": state, "windows": self._pause_windows}

    # -- registry --------------------------------------------------------------------
    async def models(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """All versions (newest first) with their state and metrics, or one with ``version``."""
        _no_extra(params, {"version"})
        version = _version(params)

        def read(s: Store) -> dict[str, Any]:
            if version is not None:
                info, _ = s.get_model(version)
                return {"model": info}
            return {
                "models": s.list_models(),
                "deployed": s.deployed_version(),
                "policy_deployed": s.deployed_policy(),
                "rollback_target": s.rollback_target(),
                "deployments": s.deployments(),
            }

        return await self.writer.call(read)

    async def deploy(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Deploy a version by hand. Anything the gate did not pass needs ``override``."""
        _no_extra(params, {"version", "override", "reason"})
        version = _version(params, required=True)
        override = bool(_param(params, "override", bool))
        reason = _param(params, "reason", str) or "deployed by the user"

        def run(s: Store) -> tuple[int | None, bool]:
            info, _ = s.get_model(version)
            passed = info["meta"].get("decision") == "deploy"
            if not passed and not override:
                state = info["state"]
                raise PalateError(
                    "conflict",
                    f"version {version} is {state} and the gate did not approve it; deploy it "
                    f"anyway with override (`palate deploy {version} --override`)",
                    {"state": state, "decision": info["meta"].get("decision")},
                )
            how = "override" if not passed else "manual"
            if info["meta"].get("kind") == POLICY_KIND:  # generation's policy, not the scorer
                return s.deploy_policy(version, how=how, reason=reason), True
            return s.deploy_model(version, how=how, reason=reason), False

        previous, policy = await self.writer.call(run)
        if policy:
            return {"deployed": version, "previous": previous, "kind": POLICY_KIND}
        await self._deployed(version)
        return {"deployed": version, "previous": previous}

    async def rollback(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Return to the version that was deployed before the current one."""
        _no_extra(params, {"reason"})
        reason = _param(params, "reason", str) or "rollback by the user"

        def run(s: Store) -> tuple[int, int | None]:
            target = s.rollback_target()
            if target is None:
                raise PalateError(
                    "not_found", "there is no earlier deployed version to roll back to"
                )
            return target, s.deploy_model(target, how="rollback", reason=reason)

        target, previous = await self.writer.call(run)
        await self._deployed(target)
        return {"deployed": target, "previous": previous}

    async def _deployed(self, version: int) -> None:
        for hook in self.on_deploy:
            await hook(version)

    # -- training -------------------------------------------------------------------
    async def train(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Start a training run now (a child process); with ``wait``, stream ``progress``
        notifications on this connection and answer when it has finished."""
        _no_extra(params, {"wait", "reason"})
        wait = bool(_param(params, "wait", bool))
        reason = _param(params, "reason", str) or "requested by the user"
        if self.jobs is None:
            raise PalateError("unavailable", "this daemon does not run training jobs")
        job = self.jobs.start(reason)
        if not wait:
            return {"job": job.to_wire()}
        notify = NOTIFY.get()

        def relay(kind: str, payload: dict[str, Any]) -> None:
            if kind == "progress" and payload.get("job") == job.id:
                notify("progress", payload)

        self.jobs.listeners.add(relay)
        try:
            finished = await self.jobs.wait()
        finally:
            self.jobs.listeners.discard(relay)
        return {"job": (finished or job).to_wire()}

    # -- scoring ----------------------------------------------------------------------
    def _texts(self, params: Mapping[str, Any], name: str, lo: int) -> list[str]:
        items = _param(params, name, (list, tuple), required=True)
        if not lo <= len(items) <= MAX_CANDIDATES:
            raise PalateError(
                "too_large" if len(items) > MAX_CANDIDATES else "invalid_request",
                f"{name} must hold {lo}..{MAX_CANDIDATES} strings, got {len(items)}",
                {"max_candidates": MAX_CANDIDATES},
            )
        for i, t in enumerate(items):
            self._check_text(t, f"{name}[{i}]")
        return list(items)

    @staticmethod
    def _check_text(t: Any, name: str) -> str:
        if not isinstance(t, str):
            raise PalateError("invalid_request", f"{name} must be a string", {"param": name})
        if len(t) > MAX_SCORE_TEXT:
            raise PalateError(
                "too_large",
                f"{name} is {len(t)} characters; the limit is {MAX_SCORE_TEXT}",
                {"param": name},
            )
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise PalateError(
                "invalid_request", f"{name} is not valid UTF-8", {"param": name}
            ) from None
        return t

    @classmethod
    def _check_prompt(cls, params: Mapping[str, Any]) -> str:
        """The prompt of ``score``/``rerank``/``compare``: a text like any other, and not
        empty or blank, by exactly the rule event validation applies to feedback
        (``events._check_text``: ``not value.strip()``). A preference about no prompt could not
        be stored as feedback, so the model never learned one, and its score would mean nothing.
        """
        prompt = cls._check_text(_param(params, "prompt", str, required=True), "prompt")
        if not prompt.strip():
            raise PalateError(
                "invalid_request",
                "prompt must not be empty or blank: a preference is about an answer to a prompt "
                "(ingest rejects feedback without one for the same reason)",
                {"param": "prompt"},
            )
        return prompt

    async def _score(
        self, params: Mapping[str, Any], prompt: str, texts: list[str]
    ) -> tuple[Any, Any]:
        if self.serving is None:
            raise PalateError("unavailable", "this daemon does not serve scores")
        timeout_ms = _param(params, "timeout_ms", int)
        timeout = DEFAULT_SCORE_TIMEOUT_S if timeout_ms is None else max(timeout_ms, 1) / 1000
        return await self.serving.score(prompt, texts, timeout)

    async def score(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Raw and normalised scores of each response, with the version that scored them."""
        _no_extra(params, {"prompt", "responses", "timeout_ms"})
        prompt = self._check_prompt(params)
        responses = self._texts(params, "responses", 1)
        model, res = await self._score(params, prompt, responses)
        return {
            "version": model.version,
            "scores": res.raw,
            "z": res.z,
            "truncated": res.truncated,
            "temperature": model.temperature,
            "uncertainty": _uncertainty(res),
            "members": _members(res).shape[1],
        }

    async def rerank(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Candidates best-first (by score, or by the lower bound score - lambda * uncertainty),
        with p_best, the members' uncertainty and whether the winner is clear."""
        _no_extra(
            params, {"prompt", "candidates", "top_k", "timeout_ms", "lower_bound", "remember"}
        )
        prompt = self._check_prompt(params)
        cands = self._texts(params, "candidates", 1)
        top_k = _param(params, "top_k", int)
        if top_k is not None and top_k < 1:
            raise PalateError("invalid_request", "top_k must be at least 1")
        lam = _param(params, "lower_bound", (int, float))
        if lam is not None and not (math.isfinite(lam) and 0 <= lam <= MAX_LOWER_BOUND):
            raise PalateError(
                "invalid_request",
                f"lower_bound (lambda) must be a number in 0..{MAX_LOWER_BOUND:g}",
                {"param": "lower_bound"},
            )
        remember = bool(_param(params, "remember", bool))
        model, res = await self._score(params, prompt, cands)
        t = max(model.temperature, 1e-6)
        unc = _uncertainty(res)
        members = _members(res)
        key = res.raw if lam is None else [r - lam * u for r, u in zip(res.raw, unc, strict=True)]
        p_best = softmax([r / t for r in res.raw])
        order = sorted(range(len(cands)), key=lambda i: (-key[i], i))
        agree = 1.0
        # One candidate has no runner-up: no probability of beating one, and nothing to be
        # confident about (issue 20 item 8; `agreement` stays 1.0, there is nothing to split on).
        p_top: float | None = None
        separate = False
        if len(order) > 1:
            top, nxt = order[0], order[1]
            p_top = 1.0 / (1.0 + math.exp(-_clip((res.raw[top] - res.raw[nxt]) / t)))
            _, p_mean, votes = pair_information(members[top], members[nxt], t)
            agree = agreement(votes, p_mean)
            separate = bounds_separate(res.raw[top], unc[top], res.raw[nxt], unc[nxt])
        ranked = [
            {
                "index": i,
                "score": res.raw[i],
                "z": res.z[i],
                "p_best": p_best[i],
                "truncated": res.truncated[i],
                "uncertainty": unc[i],
            }
            for i in order[: top_k or len(order)]
        ]
        out = {
            "version": model.version,
            "order": order,
            "scores": res.raw,
            "z": res.z,
            "p_best": p_best,
            "p_top_over_next": p_top,
            "confident": p_top is not None and p_top >= CONFIDENT_P and separate,
            "ranked": ranked,
            "truncated": res.truncated,
            "uncertainty": unc,
            "members": members.shape[1],
            "agreement": agree,
            "ranked_by": "score" if lam is None else "lower_bound",
        }
        if lam is not None:
            out["lower_bounds"] = key
        if remember:
            out["review_id"], _ = await self._remember("rerank", prompt, cands, model, res)
        return out

    async def compare(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """p(a preferred over b) = sigmoid((r_a - r_b) / T), with the members' view of it."""
        _no_extra(params, {"prompt", "a", "b", "timeout_ms", "remember"})
        prompt = self._check_prompt(params)
        a = self._check_text(_param(params, "a", str, required=True), "a")
        b = self._check_text(_param(params, "b", str, required=True), "b")
        remember = bool(_param(params, "remember", bool))
        model, res = await self._score(params, prompt, [a, b])
        t = max(model.temperature, 1e-6)
        p = 1.0 / (1.0 + math.exp(-_clip((res.raw[0] - res.raw[1]) / t)))
        unc = _uncertainty(res)
        members = _members(res)
        _, p_mean, votes = pair_information(members[0], members[1], t)
        separate = bounds_separate(res.raw[0], unc[0], res.raw[1], unc[1])
        out = {
            "version": model.version,
            "p_a_over_b": p,
            "scores": res.raw,
            "z": res.z,
            "truncated": res.truncated,
            "uncertainty": unc,
            "members": members.shape[1],
            "agreement": agreement(votes, p_mean),
            "confident": max(p, 1 - p) >= CONFIDENT_P and separate,
        }
        if remember:
            out["review_id"], _ = await self._remember("compare", prompt, [a, b], model, res)
        return out

    # -- the review queue ------------------------------------------------------------------
    async def _remember(
        self, source: str, prompt: str, texts: list[str], model: Any, res: Any
    ) -> tuple[str | None, str]:
        """Queue the most informative pair of a scored request for the user's review.

        Returns (id, why); the id is None when nothing was queued (one candidate, a question
        already answered, or a pair that cannot become an event). Never fails the request."""
        q = pick_question(_members(res), model.temperature)
        if q is None:
            return None, "one candidate: nothing to compare"
        item = _review_entry(source, prompt, texts[q.a], texts[q.b])
        if item is None:
            return None, "the candidates cannot form a pair (blank or identical texts)"
        item.update(
            why=q.why(),
            info=q.info,
            p=q.p_a_over_b,
            version=model.version,
            extra={"votes_a": q.votes_a, "members": q.members},
        )
        return await self._queue(item), item["why"]

    async def _queue(self, item: dict[str, Any]) -> str | None:
        try:
            queued = await self.writer.call(lambda s: s.add_review_item(item))
        except PalateError as e:
            log.warning("could not queue a review item: %s", e.message)
            return None
        return str(item["id"]) if queued else None

    async def _rescore_review(self, version: int) -> None:
        """Start re-scoring the open questions with the newly deployed model, in the
        background (a deploy must not wait for it; live requests share the scorer)."""
        if self.serving is None:
            return
        task = asyncio.get_running_loop().create_task(self._rescore(version))
        self._background.add(task)
        task.add_done_callback(self._rescored)

    def _rescored(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("re-scoring the review queue failed: %s", task.exception())

    async def _rescore(self, version: int) -> None:
        items = await self.writer.call(lambda s: s.list_review(REVIEW_RESCORE_MAX))
        updates = []
        for it in items:
            if it.get("version") == version:
                continue
            try:
                assert self.serving is not None
                model, res = await self.serving.score(
                    it["prompt"], [it["a"], it["b"]], DEFAULT_SCORE_TIMEOUT_S
                )
            except PalateError as e:  # busy, or the model went away: try after the next deploy
                log.info("review queue not re-scored: %s", e.message)
                break
            members = _members(res)
            info, p, votes = pair_information(members[0], members[1], model.temperature)
            q = Question(0, 1, info, p, votes, members.shape[1])
            extra = {"votes_a": votes, "members": q.members}
            updates.append((it["id"], info, p, model.version, q.why(), extra))
        if updates:
            await self.writer.call(lambda s: s.rescore_review(updates))
            log.info("re-scored %d review items with version %d", len(updates), version)

    async def review_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Open review questions, the most valuable label first."""
        _no_extra(params, {"limit"})
        limit = _param(params, "limit", int)
        if limit is not None and not 1 <= limit <= MAX_REVIEW_LIST:
            raise PalateError(
                "invalid_request", f"limit must be in 1..{MAX_REVIEW_LIST}", {"param": "limit"}
            )

        def read(s: Store) -> dict[str, Any]:
            return {
                "items": s.list_review(limit or DEFAULT_REVIEW_LIST),
                "open": s.review_counts()["open"],
            }

        return await self.writer.call(read)

    async def review_answer(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one question: ``a`` or ``b`` becomes a pair event with source ``review``;
        ``tie`` and ``skip`` only close it. Either way it is never asked again."""
        _no_extra(params, {"id", "answer"})
        item_id = _param(params, "id", str, required=True)
        answer = _param(params, "answer", str, required=True)
        if answer not in REVIEW_ANSWERS:
            raise PalateError(
                "invalid_request",
                f"answer must be one of {', '.join(REVIEW_ANSWERS)}, got {answer[:16]!r}",
                {"param": "answer", "allowed": list(REVIEW_ANSWERS)},
            )
        now = time.time()

        def to_event(item: dict[str, Any]) -> dict[str, Any] | None:
            if answer not in ("a", "b"):
                return None  # a tie teaches Bradley-Terry nothing; a skip says nothing
            chosen, rejected = (item["a"], item["b"]) if answer == "a" else (item["b"], item["a"])
            return validate_event(
                {
                    "kind": "pair",
                    "source": REVIEW_SOURCE,
                    "prompt": item["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                },
                now=now,
            )

        def run(s: Store) -> dict[str, Any]:
            _, result = s.answer_review(item_id, answer, to_event, now=now)
            return {
                "id": item_id,
                "answer": answer,
                "event": None if result is None else result.to_wire(),
                "open": s.review_counts()["open"],
            }

        return await self.writer.call(run)

    async def review_add(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """An adapter's unlabelled candidates for one prompt: scored by the deployed model
        (when there is one) and queued as their most informative pair."""
        _no_extra(params, {"prompt", "candidates", "source", "timeout_ms"})
        prompt = self._check_text(_param(params, "prompt", str, required=True), "prompt")
        cands = self._texts(params, "candidates", 2)
        source = _param(params, "source", str) or "adapter"
        if not _SOURCE_NAME.match(source):
            raise PalateError(
                "invalid_request",
                "source must be 1-64 letters, digits or ._:/-, starting with a letter or digit",
                {"param": "source"},
            )
        try:
            model, res = await self._score(params, prompt, cands)
        except PalateError as e:
            if e.code not in ("no_model", "unavailable"):
                raise
            item = _review_entry(source, prompt, cands[0], cands[1])
            if item is None:
                return {"id": None, "queued": False, "why": "the candidates cannot form a pair"}
            item["why"] = "no model is deployed yet to say which is better"
            item_id = await self._queue(item)
            return {"id": item_id, "queued": item_id is not None, "why": item["why"]}
        item_id, why = await self._remember(source, prompt, cands, model, res)
        return {"id": item_id, "queued": item_id is not None, "why": why}

    # -- generation (docs/generation.md) ---------------------------------------------------
    def _mlx_work(self) -> tuple[ScoringService, Any]:
        if self.serving is None:
            raise PalateError("unavailable", "this daemon does not run models")
        if self.generation is None:
            from palate.generation.service import GenerationService

            self.generation = GenerationService()
        return self.serving, self.generation

    def _fetch_policy(self) -> Callable[[int], tuple[dict[str, Any], bytes]]:
        """A store read for the MLX thread (it blocks that thread, never the loop)."""
        loop = asyncio.get_running_loop()

        def fetch(version: int) -> tuple[dict[str, Any], bytes]:
            def read(s: Store) -> tuple[dict[str, Any], bytes]:
                info, blob = s.get_model(version)
                if info["meta"].get("kind") != POLICY_KIND:
                    raise PalateError("not_found", f"version {version} is not a policy adapter")
                return info, blob

            return asyncio.run_coroutine_threadsafe(self.writer.call(read), loop).result(60)

        return fetch

    @staticmethod
    def _abs_path(params: Mapping[str, Any], name: str) -> Path | None:
        raw = _param(params, name, str)
        if raw is None:
            return None
        if "\x00" in raw or not os.path.isabs(raw):
            raise PalateError(
                "invalid_request", f"{name} must be an absolute path", {"param": name}
            )
        return Path(raw)

    async def generate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """N candidates from the policy, scored by the reward model, one chosen."""
        from palate.generation.strategies import DEFAULT_KAPPA, DEFAULT_LAMBDA, STRATEGIES

        _no_extra(
            params,
            {
                "prompt",
                "n",
                "strategy",
                "lambda",
                "kappa",
                "max_tokens",
                "temperature",
                "top_p",
                "seed",
                "policy",
                "model",
                "reward_model",
                "timeout_ms",
            },
        )
        prompt = self._check_text(_param(params, "prompt", str, required=True), "prompt")
        n = _bounded(params, "n", 1, MAX_CANDIDATES) or 4
        strategy = _param(params, "strategy", str) or "best"
        if strategy not in STRATEGIES:
            raise PalateError(
                "invalid_request",
                f"strategy must be one of {', '.join(STRATEGIES)}",
                {"param": "strategy"},
            )
        lam = _finite(params, "lambda")
        kappa = _finite(params, "kappa")
        temperature = _finite(params, "temperature")
        top_p = _finite(params, "top_p")
        if (
            (lam is not None and not 0 < lam <= MAX_LOWER_BOUND)
            or (kappa is not None and not 0 <= kappa <= MAX_LOWER_BOUND)
            or (temperature is not None and not 0 <= temperature <= 5)
            or (top_p is not None and not 0 < top_p <= 1)
        ):
            raise PalateError(
                "invalid_request",
                "lambda must be in (0, 100], kappa in [0, 100], temperature in "
                "[0, 5] and top_p in (0, 1]",
            )
        max_tokens = _bounded(params, "max_tokens", 1, MAX_GENERATE_TOKENS) or 128
        seed = _bounded(params, "seed", 0, 2**32 - 1)
        policy = params.get("policy")
        if isinstance(policy, int) and not isinstance(policy, bool):
            policy = _version({"version": policy})
        elif policy is not None and policy != "base":
            policy = self._abs_path(params, "policy")
        model = _param(params, "model", str)
        reward_dir = self._abs_path(params, "reward_model")
        timeout_ms = _param(params, "timeout_ms", int)
        timeout = DEFAULT_GENERATE_TIMEOUT_S if timeout_ms is None else max(timeout_ms, 1) / 1000
        serving, gen = self._mlx_work()
        if policy is None:
            policy = await self.writer.call(lambda s: s.deployed_policy()) or "base"

        from palate.generation.engine import GenerateRequest
        from palate.generation.sampling import SampleConfig

        defaults = SampleConfig()
        req = GenerateRequest(
            prompt,
            n,
            strategy,
            DEFAULT_LAMBDA if lam is None else lam,
            DEFAULT_KAPPA if kappa is None else kappa,
            SampleConfig(
                max_tokens,
                defaults.temperature if temperature is None else temperature,
                defaults.top_p if top_p is None else top_p,
                seed,
            ),
        )
        fetch = self._fetch_policy()

        def job(ctx: Any) -> dict[str, Any]:
            from palate.generation.service import ScorerRef

            if reward_dir is not None:
                judge = gen.reward_dir(reward_dir, None)
            else:
                ls = ctx.scorer()
                judge = ScorerRef(ls.scorer, ls.version, ls.base)
            return gen.generate(
                judge, req, policy, model=model, fetch=fetch, between_steps=ctx.between_steps
            )

        return dict(await serving.run(job, timeout))

    async def policy_register(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Evaluate a policy adapter directory on held-out pairs, ask the policy gate, store
        it as a version of kind ``policy`` and, if the gate passed, deploy it."""
        _no_extra(params, {"path", "pairs", "deploy", "reason", "timeout_ms"})
        path = self._abs_path(params, "path")
        if path is None:
            raise PalateError("invalid_request", "missing parameter 'path'", {"param": "path"})
        deploy = _param(params, "deploy", bool)
        reason = _param(params, "reason", str) or "policy gate"
        pairs = self._pairs(params.get("pairs"))
        if pairs is None:
            pairs = await self.writer.call(_heldout_pairs)
        if not pairs:
            raise PalateError(
                "invalid_request",
                "no held-out pairs to judge the adapter on; send pairs, or give feedback first",
            )
        timeout_ms = _param(params, "timeout_ms", int)
        timeout = 3600.0 if timeout_ms is None else max(timeout_ms, 1) / 1000
        serving, gen = self._mlx_work()

        def job(ctx: Any) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
            from palate.generation.service import ScorerRef

            ls = ctx.scorer()
            return gen.evaluate(
                ScorerRef(ls.scorer, ls.version, ls.base),
                path,
                pairs,
                between_steps=ctx.between_steps,
            )

        blob, config, report = await serving.run(job, timeout)
        from palate.generation.gate import gate_entry

        decision, meta, state = gate_entry(report, config, kind=POLICY_KIND, source=str(path))
        deploy_it = decision.action == "deploy" and deploy is not False

        def store(s: Store) -> tuple[int, int | None]:
            v = s.add_model(
                base_model=config["base_model"]["id"], meta=meta, artifact=blob, state=state
            )
            prev = s.deploy_policy(v, how="gate", reason=reason) if deploy_it else None
            return v, prev

        version, previous = await self.writer.call(store)
        return {
            "version": version,
            "decision": decision.action,
            "reasons": decision.reasons,
            "checks": decision.checks,
            "metrics": report,
            "deployed": deploy_it,
            "previous": previous,
        }

    def _pairs(self, raw: Any) -> list[Any] | None:
        if raw is None:
            return None
        if not isinstance(raw, (list, tuple)) or not 0 < len(raw) <= MAX_EVAL_PAIRS:
            raise PalateError(
                "invalid_request", f"pairs must hold 1..{MAX_EVAL_PAIRS} pairs", {"param": "pairs"}
            )
        from palate.events import PairExample

        out = []
        for i, p in enumerate(raw):
            if not isinstance(p, dict):
                raise PalateError("invalid_request", f"pairs[{i}] must be a map")
            out.append(
                PairExample(
                    self._check_text(p.get("prompt"), f"pairs[{i}].prompt"),
                    self._check_text(p.get("chosen"), f"pairs[{i}].chosen"),
                    self._check_text(p.get("rejected"), f"pairs[{i}].rejected"),
                )
            )
        return out


def _heldout_pairs(s: Store) -> list[Any]:
    """The store's held-out pairs (the split the reward model's gate uses)."""
    from palate.evaluation.split import example_key, split_items
    from palate.events import PairExample, to_examples

    examples = [e for ev in s.iter_events() for e in to_examples(ev)]
    held = split_items(examples, key=example_key).heldout
    return [e for e in held if isinstance(e, PairExample)]
