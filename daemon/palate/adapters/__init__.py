"""The adapter hook spec (api version 1): everything a plugin author needs, in one module.

An *adapter* turns feedback that some tool already writes (an editor's log, a
voice agent's transcript, ...) into v1 events. Each enabled adapter runs in its
own child process (``python -m palate.adapters.runner NAME``) supervised by the
daemon, so a crashing or hanging adapter never takes the daemon down, and talks
to the daemon only through the socket, like any third-party client.

Discovery: an adapter is an entry point in the group ``palate.adapters.v1``
whose object is a zero-argument callable (usually the class) returning an
:class:`Adapter`. The ``v1`` in the group name is the hook-spec version: a
breaking change of this module gets a new group, so old plugins are simply not
found instead of being loaded against a spec they do not speak. The built-in
adapters are registered in Palate's own ``pyproject.toml`` exactly like a
third-party package would register its own.

An adapter implements one method, ``run(ctx)``: loop until ``ctx.stop`` is set,
hand events to ``ctx.emit(events, cursor=(key, value))`` and resume from
``ctx.cursors()`` on start. Adapters that tail files should not write that loop
themselves: subclass :class:`palate.adapters.tailing.TailingAdapter` and
implement a record parser instead (see docs/plugins.md).

Guarantees ``emit`` gives an adapter (and asks of it):

* events are redacted (deny list, secrets) and validated *before* they leave the
  process; a bad one is reported with ``ctx.report_bad`` and skipped, never sent;
* the cursor is committed in the same transaction as the events, so an adapter
  that restarts from ``ctx.cursors()`` neither loses nor duplicates anything,
  provided event ids are deterministic (derived from the source record);
* ``emit`` retries while the daemon is unavailable or busy and returns only
  after the durable commit (or raises if the daemon rejects the batch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from palate.adapters.redaction import Redactor
from palate.errors import PalateError
from palate.events import MAX_BATCH, validate_event
from palate.wire.client import Client

#: Entry-point group; the suffix is the hook-spec version.
ENTRY_POINT_GROUP = "palate.adapters.v1"
#: The ``api_version`` an adapter must declare to be loaded by this Palate.
API_VERSION = 1
#: Env switch: "0" hides adapters from distributions other than palate itself.
#: Tests set it so nothing installed outside the repository changes results.
THIRD_PARTY_ENV = "PALATE_THIRD_PARTY_ADAPTERS"
#: Events per ``ingest_batch`` and text characters per batch (x4 worst-case UTF-8
#: stays under the 4 MiB frame limit), as in palate.adapters.file_import.
BATCH_EVENTS = 500
BATCH_CHARS = 800_000
#: Options every adapter accepts; an adapter's own ``options`` come on top.
COMMON_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "enabled": bool,
    "redact_deny": list,
    "module": str,
}


@dataclass(frozen=True)
class Candidate:
    """An event an adapter proposes, plus the *subjects* the deny list checks.

    Subjects are where the event came from: a file path or ``file://`` URI, a URL
    or host name, or ``app:<name>``. They are used for redaction only and never
    sent to the daemon.
    """

    event: Mapping[str, Any]
    subjects: tuple[str, ...] = ()
    #: Where the record came from (``path:offset``), for bad-record reports only.
    where: str = ""


@runtime_checkable
class Adapter(Protocol):
    """What an entry point must produce.

    ``name`` is the adapter's name (also its cursor namespace and the config
    table ``[adapters.<name>]``); ``api_version`` must equal :data:`API_VERSION`;
    ``options`` maps each adapter-specific config key to its type, so a typo in
    config.toml is an error instead of a silently ignored setting.
    """

    name: str
    api_version: int
    options: Mapping[str, type | tuple[type, ...]]

    def run(self, ctx: AdapterContext) -> None:
        """Deliver events until ``ctx.stop`` is set; return to exit cleanly."""


@runtime_checkable
class FileParsingAdapter(Adapter, Protocol):
    """An adapter that can also dry-run its parser on one file (`palate adapters test`)."""

    def parse_file(self, path: Path, ctx: AdapterContext) -> Iterator[Candidate]:
        """Every candidate event one file yields, read from its first byte."""


class AdapterError(Exception):
    """An adapter could not be found, loaded or configured (it is skipped, not retried)."""


# --- discovery ------------------------------------------------------------------------


def third_party_enabled() -> bool:
    return os.environ.get(THIRD_PARTY_ENV, "1") != "0"


def entry_points(*, third_party: bool | None = None) -> dict[str, metadata.EntryPoint]:
    """Adapter entry points by name. Palate's own win over a third party's of the same name."""
    if third_party is None:
        third_party = third_party_enabled()
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        own = dist is not None and dist.metadata["Name"] == "palate"
        if not own and not third_party:
            continue
        if ep.name in found and not own:
            continue
        found[ep.name] = ep
    return found


def _load_object(spec: str) -> Any:
    """``module:attr`` (config ``module = ...``): local adapters without packaging."""
    import importlib

    mod_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def load_adapter(name: str, module: str | None = None) -> Adapter:
    """Instantiate an adapter by entry-point name (or from ``module:attr``) and check it."""
    try:
        if module:
            factory = _load_object(module)
        else:
            eps = entry_points()
            if name not in eps:
                known = ", ".join(sorted(eps)) or "none"
                raise AdapterError(
                    f"no adapter named {name!r} in entry-point group {ENTRY_POINT_GROUP} "
                    f"(known: {known})"
                )
            factory = eps[name].load()
        adapter = factory() if callable(factory) else factory
    except AdapterError:
        raise
    except Exception as e:  # a broken plugin: report it, never crash the caller
        raise AdapterError(f"adapter {name!r} failed to load: {type(e).__name__}: {e}") from e
    version = getattr(adapter, "api_version", None)
    if version != API_VERSION:
        raise AdapterError(
            f"adapter {name!r} speaks hook api {version!r}; this Palate loads {API_VERSION}"
        )
    if not callable(getattr(adapter, "run", None)):
        raise AdapterError(f"adapter {name!r} has no run(ctx) method")
    return adapter


def check_options(adapter: Adapter, options: Mapping[str, Any]) -> dict[str, Any]:
    """Reject unknown or mistyped config keys for ``adapter`` (config strictness)."""
    allowed = {**COMMON_OPTIONS, **dict(getattr(adapter, "options", {}) or {})}
    errors = []
    for key, value in options.items():
        if key not in allowed:
            errors.append(f"unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        elif isinstance(value, bool) and allowed[key] is not bool:
            errors.append(f"option {key!r} has the wrong type")
        elif not isinstance(value, allowed[key]):
            errors.append(f"option {key!r} has the wrong type ({type(value).__name__})")
    if errors:
        raise AdapterError(f"[adapters.{adapter.name}]: " + "; ".join(errors))
    return dict(options)


# --- the context an adapter runs in --------------------------------------------------


@dataclass
class EmitResult:
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    dropped: int = 0
    invalid: int = 0
    committed_cursor: bool = False
    #: Events not sent because collection is paused (``palate ui``, the ``pause`` method).
    paused: int = 0


#: How long a pause answer from the daemon is trusted before it is asked again.
PAUSE_CHECK_S = 2.0


class PauseGuard:
    """Whether collection is paused, asked of the daemon (``pause_state``) at most every
    :data:`PAUSE_CHECK_S` seconds. An event is held back while a pause runs, and also when its
    ``ts`` falls inside a pause that has ended since: a log line written during the pause and
    read only later (a restart, a backlog) is not collected either. A daemon that predates
    the method never pauses anything."""

    def __init__(self, ask: Callable[[], Mapping[str, Any]], clock: Callable[[], float]) -> None:
        self._ask = ask
        self._clock = clock
        self._checked = -math.inf
        self.current: Mapping[str, Any] | None = None
        self.windows: list[tuple[float, float]] = []

    def refresh(self) -> None:
        now = self._clock()
        if now - self._checked < PAUSE_CHECK_S:
            return
        try:
            state = self._ask()
        except PalateError as e:
            if e.code != "unknown_method":
                raise
            state = {}
        self._checked = now
        self.current = state.get("paused")
        self.windows = [(float(a), float(b)) for a, b in state.get("windows") or []]

    def holds(self, event: Mapping[str, Any]) -> bool:
        """True if ``event`` must not be collected (call :meth:`refresh` first)."""
        if self.current is not None:
            return True
        ts = event.get("ts")
        return isinstance(ts, (int, float)) and any(a <= ts < b for a, b in self.windows)


Sink = Callable[[list[dict[str, Any]], dict[str, Any] | None], Mapping[str, Any]]


class AdapterContext:
    """What ``run(ctx)`` gets: socket access, emit, cursors, stop/wake, options, logger.

    ``sink`` replaces the daemon for dry runs (`palate adapters test`): it gets
    each batch and its cursor and returns an ``ingest_batch``-shaped result.
    ``status`` is the line-oriented channel to the supervisor (JSON per line).
    """

    def __init__(
        self,
        name: str,
        *,
        options: Mapping[str, Any] | None = None,
        home: Path | None = None,
        socket: Path | None = None,
        redactor: Redactor | None = None,
        sink: Sink | None = None,
        status: IO[str] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.options: dict[str, Any] = dict(options or {})
        self.home = home
        #: The daemon's socket as the supervisor pinned it (``PALATE_SOCKET``); None derives it.
        self.socket = socket
        self.redactor = redactor or Redactor()
        self.stop = threading.Event()
        #: Set to ask for an immediate reconcile (SIGUSR1, watchdog hint, tests).
        self.wake = threading.Event()
        self.log = logger or logging.getLogger(f"palate.adapters.{name}")
        self.bad_records = 0
        self._sink = sink
        self._status = status
        self._client: Client | None = None
        self._fault_countdown = _fault_countdown()
        self.pause = PauseGuard(self._pause_state, time.monotonic)

    # -- socket ------------------------------------------------------------------------

    def client(self) -> Client:
        """A connected client, reconnecting (with backoff, until stop) if needed.

        The supervisor hears ``connected`` (with the socket) once a connection stands and
        ``unavailable`` (with the reason) while it retries: ``palate status`` and
        ``palate doctor`` show an adapter that runs but cannot reach the daemon.
        """
        delay = 0.2
        while self._client is None:
            try:
                self._client = Client(self.home, socket_path=self.socket, timeout=60.0)
            except PalateError as e:
                if self.stop.is_set():
                    raise
                self.log.warning("daemon unavailable (%s); retrying in %.1f s", e.message, delay)
                self.notify("unavailable", message=e.message[:500])
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)
            else:
                self.notify("connected", socket=str(self._client.path))
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def cursors(self) -> dict[str, Any]:
        """Every cursor this adapter committed, ``{key: value}``."""
        if self._sink is not None:
            return {}
        while True:
            try:
                return self.client().cursors(self.name)
            except PalateError as e:
                self._retry_or_raise(e)

    def _pause_state(self) -> Mapping[str, Any]:
        while True:
            try:
                return dict(self.client().call("pause_state"))
            except PalateError as e:
                if e.code == "unknown_method":
                    raise
                self._retry_or_raise(e)

    def _retry_or_raise(self, e: PalateError) -> None:
        if e.code not in ("unavailable", "busy") or self.stop.is_set():
            raise e
        self._drop_client()
        self.stop.wait(0.5)

    # -- events ------------------------------------------------------------------------

    def prepare(self, item: Mapping[str, Any] | Candidate, where: str = "") -> dict | None:
        """Redact and validate one proposed event; report and return None if unusable."""
        cand = item if isinstance(item, Candidate) else Candidate(item)
        ev = self.redactor.apply(cand.event, cand.subjects)
        if ev is None:
            return None
        ev.setdefault("source", self.name)
        try:
            return validate_event(ev)
        except PalateError as e:
            reasons = "; ".join(f"{x['field']} {x['reason']}" for x in e.details.get("errors", []))
            self.report_bad(where or "event", reasons or e.message)
            return None

    def emit(
        self,
        items: Iterable[Mapping[str, Any] | Candidate],
        cursor: tuple[str, Any] | None = None,
    ) -> EmitResult:
        """Send events (redacted, validated, batched) with ``cursor`` on the last batch.

        ``cursor`` is ``(key, value)``; it commits atomically with the final batch.
        Earlier batches (a large backlog) commit without it: a crash between them
        replays those events, which the daemon deduplicates by id. When nothing
        is left to send the cursor cannot be committed (ingest_batch needs at
        least one event) and the caller simply re-reads that stretch next time.
        """
        res = EmitResult()
        events: list[dict[str, Any]] = []
        if self._sink is None:
            self.pause.refresh()
        for item in items:
            ev = self.prepare(item, item.where if isinstance(item, Candidate) else "")
            if ev is None:
                res.dropped += 1
                continue
            if self._sink is None and self.pause.holds(ev):
                res.paused += 1
                continue
            ev.pop("v", None)
            events.append(ev)
        if res.paused:
            self.log.info("collection is paused: %d event(s) not collected", res.paused)
            self.notify("paused", events=res.paused)
        batches = list(_batches(events))
        for i, batch in enumerate(batches):
            cur = None
            if cursor is not None and i == len(batches) - 1:
                cur = {"adapter": self.name, "key": cursor[0], "value": cursor[1]}
            out = self._send(batch, cur)
            res.sent += len(batch)
            res.accepted += int(out.get("accepted", 0))
            res.duplicates += int(out.get("duplicates", 0))
            res.committed_cursor = cur is not None
        if events:
            self.notify(
                "emitted", events=len(events), accepted=res.accepted, duplicates=res.duplicates
            )
        return res

    def _send(self, batch: list[dict[str, Any]], cursor: dict[str, Any] | None) -> Mapping:
        self._maybe_fault()
        if self._sink is not None:
            return self._sink(batch, cursor)
        while True:
            try:
                return self.client().ingest_batch(batch, cursor)
            except PalateError as e:
                self._retry_or_raise(e)

    def _maybe_fault(self) -> None:
        # Fault injection for the contract tests: kill -9 ourselves after reading
        # and parsing, just before the commit, to prove nothing is lost.
        if self._fault_countdown is None:
            return
        self._fault_countdown -= 1
        if self._fault_countdown <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def report_bad(self, where: str, reason: str) -> None:
        """Report a record that cannot become an event; it is skipped, not retried.

        Only the location and the reason are logged, never the record's text.
        """
        self.bad_records += 1
        self.log.warning("skipped bad record at %s: %s", where, reason[:300])
        self.notify("bad", where=where[-300:], reason=reason[:300])

    def notify(self, kind: str, **fields: Any) -> None:
        """One status line for the supervisor (no-op without a channel)."""
        if self._status is None:
            return
        try:
            self._status.write(json.dumps({"type": kind, "ts": time.time(), **fields}) + "\n")
            self._status.flush()
        except (OSError, ValueError):
            self._status = None  # the supervisor went away; keep running

    def close(self) -> None:
        self._drop_client()


def _fault_countdown() -> int | None:
    raw = os.environ.get("PALATE_ADAPTER_FAULT", "")
    if raw.startswith("kill_before_commit:"):
        return int(raw.split(":", 1)[1])
    return None


def _chars(ev: Mapping[str, Any]) -> int:
    n = 0
    for v in ev.values():
        if isinstance(v, str):
            n += len(v)
        elif isinstance(v, list):
            n += sum(len(x) for x in v if isinstance(x, str))
    return n


def _batches(events: Sequence[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    size = 0
    limit = min(BATCH_EVENTS, MAX_BATCH)
    for ev in events:
        n = _chars(ev)
        if batch and (len(batch) >= limit or size + n > BATCH_CHARS):
            yield batch
            batch, size = [], 0
        batch.append(ev)
        size += n
    if batch:
        yield batch


@dataclass
class DryRun:
    """A sink that records what would have been sent (for `adapters test` and tests)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    cursors: list[dict[str, Any] | None] = field(default_factory=list)

    def __call__(
        self, batch: list[dict[str, Any]], cursor: dict[str, Any] | None
    ) -> Mapping[str, Any]:
        self.events.extend(batch)
        self.cursors.append(cursor)
        return {"accepted": len(batch), "duplicates": 0}


def stderr_logger(name: str, level: str = "info") -> logging.Logger:
    """The adapter process logs to stderr; the supervisor sends that to logs/adapters/."""
    log = logging.getLogger(f"palate.adapters.{name}")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(level.upper())
    return log


__all__ = [
    "API_VERSION",
    "ENTRY_POINT_GROUP",
    "Adapter",
    "AdapterContext",
    "AdapterError",
    "Candidate",
    "DryRun",
    "EmitResult",
    "FileParsingAdapter",
    "PauseGuard",
    "check_options",
    "entry_points",
    "load_adapter",
]
