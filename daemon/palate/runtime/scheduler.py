"""When the nightly training run starts: a due-check over persisted state, woken by APScheduler.

Why not APScheduler alone: it is "pretty strict about being punctual" (agronholm/apscheduler
#292). A job whose time passed while the laptop slept is dropped once its misfire grace is
over, and every daemon start recomputes ``next_run_time`` from *now*, so a run missed while
the machine was off is erased, not caught up (tests/test_scheduler.py pins that). Resume
and clock-change detection is an open request there (#794).

So correctness lives here, in one idempotent **due-check** over Palate's own bookkeeping in
the store meta (``schedule.last_attempt``, ``schedule.last_success``...):

- the *slot* is the most recent ``[schedule] time`` (local wall clock) at or before now;
- a run is due when no attempt has been made since that slot (and the slot is within
  ``grace_h``); several missed nights collapse into one slot, so a catch-up runs once;
- catch-up is for nights the daemon missed, not for nights before this home had a
  scheduler: a slot before ``schedule.since`` (set when the scheduler first starts on a home)
  is never due, so a fresh install does not train minutes after its first import; the log
  and ``status`` say when the first run will be;
- before starting, the conditions are checked (enough new events since the last
  completed run, AC power, user idle); each one that blocks is reported with its reason
  and the check is repeated later, the slot stays due until it runs;
- the attempt is recorded the moment the child starts, so restarts, repeated triggers
  and clock jumps can never start a second run for the same slot.

APScheduler (3.x; 4.x is pre-release) only *wakes* the due-check: a cron trigger at the
configured time (``coalesce=True``, misfire grace in hours, ``max_instances=1``) for
punctuality, and an interval trigger every 5 minutes that also catches wake-from-sleep and
wall-clock jumps (the wall clock moving differently from the monotonic one). The daemon
also runs the check once at start. Every input (clock, store, jobs, power probes) is
injected so tests drive days of schedule in microseconds with no real sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any, Protocol

from palate.config import ScheduleConfig, parse_hhmm
from palate.errors import PalateError
from palate.runtime.power import IdleState, PowerState, Probes

log = logging.getLogger(__name__)

#: How often the due-check runs between cron triggers (and so how late a wake is noticed).
CHECK_EVERY_S = 300.0
#: Wall vs monotonic drift beyond this between two checks is reported as a sleep or clock jump.
JUMP_S = 120.0
#: A recorded attempt this far in the future means the clock was moved back by more than a
#: day: it is ignored (one run may repeat) rather than blocking runs until that date.
FUTURE_ATTEMPT_S = 26 * 3600.0

K_ATTEMPT = "schedule.last_attempt"
K_SUCCESS = "schedule.last_success"
K_RESULT = "schedule.last_result"
K_TRAINED_SEQ = "schedule.trained_seq"
#: When the scheduler first ran on this home: slots before it are not caught up.
K_SINCE = "schedule.since"


# --- the injected world -------------------------------------------------------------------


class Clock(Protocol):
    def time(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    """The real clocks."""

    def time(self) -> float:
        import time

        return time.time()

    def monotonic(self) -> float:
        import time

        return time.monotonic()


#: The scheduler's wall clock read from this file (Unix seconds as text) instead of the
#: system's: how tests and bench/month.py give a real daemon simulated nights. Never set in use.
CLOCK_FILE_ENV = "PALATE_CLOCK_FILE"
#: Seconds between periodic due-checks (default CHECK_EVERY_S); simulated nights pass faster.
CHECK_EVERY_ENV = "PALATE_SCHEDULE_CHECK_S"


class FileClock:
    """Wall time from a file (see :data:`CLOCK_FILE_ENV`); the system's while it is unreadable.

    The monotonic clock stays real, so a write that moves the time forward is seen as a wall
    clock jump, as a wake from sleep would be.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._real = SystemClock()

    def time(self) -> float:
        try:
            with open(self.path, encoding="ascii") as fh:
                return float(fh.read().strip())
        except (OSError, ValueError):
            return self._real.time()

    def monotonic(self) -> float:
        return self._real.monotonic()


def clock_from_env() -> Clock:
    """:class:`FileClock` when ``PALATE_CLOCK_FILE`` is set, else the system clock."""
    import os

    path = os.environ.get(CLOCK_FILE_ENV)
    if path:
        log.warning("the schedule runs on the clock in %s (%s), not the system's", path,
                    CLOCK_FILE_ENV)  # fmt: skip
        return FileClock(path)
    return SystemClock()


def check_every_from_env() -> float:
    import os

    raw = os.environ.get(CHECK_EVERY_ENV)
    try:
        return max(0.05, float(raw)) if raw else CHECK_EVERY_S
    except ValueError:
        return CHECK_EVERY_S


class State(Protocol):
    """The store meta and event watermark, as seen by the scheduler."""

    async def get(self, key: str) -> Any: ...
    async def set(self, key: str, value: Any) -> None: ...
    async def max_seq(self) -> int: ...


class WriterState:
    """``State`` over the daemon's store thread (``StoreWriter.call``)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    async def get(self, key: str) -> Any:
        return await self.writer.call(lambda s: s.get_meta(key))

    async def set(self, key: str, value: Any) -> None:
        await self.writer.call(lambda s: s.set_meta(key, value))

    async def max_seq(self) -> int:
        n: int = await self.writer.call(lambda s: s.max_seq())
        return n


class PowerProbes(Protocol):
    def power(self) -> PowerState: ...
    def idle(self) -> IdleState: ...


class Jobs(Protocol):
    """What the scheduler needs of ``jobs.TrainingJobs``."""

    current: Any
    listeners: set[Callable[[str, dict[str, Any]], None]]

    def start(self, reason: str) -> Any: ...


# --- time slots (pure) ----------------------------------------------------------------------


def _at(day: datetime, hour: int, minute: int, tz: tzinfo | None) -> float:
    """Timestamp of ``hour:minute`` local time on ``day``'s date.

    A time skipped by a DST change (02:30 on spring-forward night) resolves to the same
    instant an hour later; a repeated one to its first occurrence, so each date has
    exactly one slot.
    """
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz).timestamp()


def _local(ts: float, tz: tzinfo | None) -> datetime:
    return datetime.fromtimestamp(ts, tz) if tz is not None else datetime.fromtimestamp(ts)


def slot_at_or_before(now: float, hhmm: str, tz: tzinfo | None = None) -> float:
    """The most recent scheduled time that is not after ``now``."""
    h, m = parse_hhmm(hhmm)
    today = _local(now, tz)
    for back in range(3):
        ts = _at(today - timedelta(days=back), h, m, tz)
        if ts <= now:
            return ts
    raise AssertionError("unreachable: a slot exists every day")


def next_slot_after(now: float, hhmm: str, tz: tzinfo | None = None) -> float:
    """The first scheduled time strictly after ``now``."""
    h, m = parse_hhmm(hhmm)
    today = _local(now, tz)
    for fwd in range(3):
        ts = _at(today + timedelta(days=fwd), h, m, tz)
        if ts > now:
            return ts
    raise AssertionError("unreachable: a slot exists every day")


def iso(ts: float | None, tz: tzinfo | None = None) -> str | None:
    return None if ts is None else _local(ts, tz).isoformat(timespec="seconds")


# --- one evaluation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One precondition of a scheduled run; ``known=False`` means the probe could not tell."""

    name: str
    ok: bool
    detail: str
    known: bool = True


def power_condition(p: PowerState) -> Condition:
    """``require_ac``: battery blocks; an unknown source is allowed, and reported."""
    if p.on_ac is None:
        return Condition("ac_power", True, f"{p.detail}; allowed", known=False)
    if p.on_ac:
        return Condition("ac_power", True, p.detail)
    return Condition("ac_power", False, f"{p.detail}; waits for AC (require_ac)")


def idle_condition(i: IdleState, cfg: ScheduleConfig) -> Condition:
    """``require_idle_s``: recent input blocks; where idle time is unknown, skipped."""
    if i.seconds is None:
        return Condition("idle", True, i.detail, known=False)
    if i.seconds >= cfg.require_idle_s:
        return Condition("idle", True, f"user idle for {i.seconds:.0f} s")
    return Condition(
        "idle",
        False,
        f"user active {i.seconds:.0f} s ago; waits for {cfg.require_idle_s:g} s idle "
        "(require_idle_s)",
    )


@dataclass
class Evaluation:
    """What a due-check found: is a slot due, and if so, what (if anything) blocks it."""

    now: float
    slot: float | None
    due: bool
    why: str
    conditions: list[Condition] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return self.due and not self.blocked


@dataclass
class TickResult:
    trigger: str
    outcome: str  # "started" | "not_due" | "blocked" | "disabled" | "error"
    detail: str
    job: str | None = None
    jumped_s: float | None = None


class Scheduler:
    """Decides when a nightly run starts; starts it with ``jobs.start(reason=...)``.

    Also follows every training run (scheduled or ``palate train --now``) through
    ``jobs.listeners`` and persists its outcome, so ``last_success`` and the new-events
    watermark survive restarts and a manual run counts as the night's run.
    """

    def __init__(
        self,
        config: ScheduleConfig,
        jobs: Jobs,
        state: State,
        *,
        clock: Clock | None = None,
        probes: PowerProbes | None = None,
        tz: tzinfo | None = None,
        check_every_s: float | None = None,
    ) -> None:
        parse_hhmm(config.time)  # fail at construction, not at 03:00
        self.config = config
        self.jobs = jobs
        self.state = state
        self.clock: Clock = clock or clock_from_env()
        self.probes: PowerProbes = probes or Probes()
        self.tz = tz
        self.check_every_s = check_every_from_env() if check_every_s is None else check_every_s
        self.last_tick: TickResult | None = None
        self.clock_jumps = 0
        self._lock = asyncio.Lock()
        self._wall_mono: tuple[float, float] | None = None
        self._seq_at_start: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._aps: Any = None
        self._last_blocked: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, *, drive: bool = True) -> None:
        """Follow jobs, run the start-up due-check, then (``drive``) start APScheduler."""
        self.jobs.listeners.add(self._on_job_event)
        await self._first_start()
        await self.tick("start")
        if drive:
            self._start_apscheduler()

    async def _first_start(self) -> None:
        """Record when this home got a scheduler, and say when its first run will be.

        A home whose scheduler already ran before ``schedule.since`` existed (it has an
        attempt or a result) keeps catching up as before: ``since`` is 0 for it.
        """
        if await self.state.get(K_SINCE) is not None:
            return
        now = self.clock.time()
        seen = await self.state.get(K_ATTEMPT) or await self.state.get(K_RESULT)
        await self.state.set(K_SINCE, 0.0 if seen else now)
        if seen or not self.config.enabled:
            return
        first = next_slot_after(now, self.config.time, self.tz)
        log.info(
            "first scheduled training run: %s (then nightly at %s), once there are at least "
            "%d new events; `palate train --now` trains earlier",
            iso(first, self.tz),
            self.config.time,
            self.config.min_new_events,
        )

    async def stop(self) -> None:
        """Stop waking up and finish persisting outcomes; leaves a running child alone
        (the daemon stops jobs itself, after this)."""
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None
        await self.settle()
        self.jobs.listeners.discard(self._on_job_event)

    async def settle(self) -> None:
        """Wait until every job outcome seen so far is persisted."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _start_apscheduler(self) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        h, m = parse_hhmm(self.config.time)
        tz_kw: dict[str, Any] = {} if self.tz is None else {"timezone": self.tz}
        aps = AsyncIOScheduler(**tz_kw)
        grace = int(self.config.grace_h * 3600)
        aps.add_job(
            self.tick,
            CronTrigger(hour=h, minute=m, **tz_kw),
            args=["nightly"],
            id="palate-nightly",
            name="nightly training due-check",
            coalesce=True,
            misfire_grace_time=grace or 1,
            max_instances=1,
            replace_existing=True,
        )
        aps.add_job(
            self.tick,
            IntervalTrigger(seconds=self.check_every_s, **tz_kw),
            args=["periodic"],
            id="palate-due-check",
            name="periodic due-check (wake, clock jumps, blocked conditions)",
            coalesce=True,
            misfire_grace_time=None,
            max_instances=1,
            replace_existing=True,
        )
        aps.add_listener(self._on_aps_event, EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        aps.start()
        self._aps = aps

    def _on_aps_event(self, event: Any) -> None:
        # A missed cron fire is expected after sleep; the due-check covers it. Say so.
        if getattr(event, "exception", None) is not None:
            log.error("scheduler job %s failed: %r", event.job_id, event.exception)
        else:
            log.info("scheduler job %s missed its time; running the due-check", event.job_id)
            self._spawn(self._tick_quietly("missed"))

    async def _tick_quietly(self, trigger: str) -> None:
        await self.tick(trigger)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the due-check -----------------------------------------------------------------
    async def tick(self, trigger: str) -> TickResult:
        """One idempotent due-check; starts at most one run. Never raises."""
        async with self._lock:
            try:
                result = await self._tick(trigger)
            except Exception as e:  # a bug here must not stop future checks
                log.exception("due-check (%s) failed", trigger)
                result = TickResult(trigger, "error", f"{type(e).__name__}: {e}")
            self.last_tick = result
            return result

    def _jump(self, now: float) -> float | None:
        mono = self.clock.monotonic()
        prev, self._wall_mono = self._wall_mono, (now, mono)
        if prev is None:
            return None
        drift = (now - prev[0]) - (mono - prev[1])
        if abs(drift) <= JUMP_S:
            return None
        self.clock_jumps += 1
        log.info(
            "wall clock moved %+.0f s against the monotonic clock (sleep/wake or a clock "
            "change); checking whether a run is due",
            drift,
        )
        return drift

    async def _tick(self, trigger: str) -> TickResult:
        now = self.clock.time()
        jumped = self._jump(now)
        if not self.config.enabled:
            return TickResult(trigger, "disabled", "[schedule] enabled = false", jumped_s=jumped)
        ev = await self.evaluate(now)
        if not ev.due:
            return TickResult(trigger, "not_due", ev.why, jumped_s=jumped)
        if ev.blocked:
            # Log when *which* conditions block changes, not every 5 min as counts move.
            names = [c.name for c in ev.conditions if not c.ok] or ["running"]
            if names != self._last_blocked:
                log.info("training run due but waiting: %s", "; ".join(ev.blocked))
            self._last_blocked = names
            return TickResult(trigger, "blocked", "; ".join(ev.blocked), jumped_s=jumped)
        self._last_blocked = []
        assert ev.slot is not None
        seq = await self.state.max_seq()
        reason = f"scheduled run for {iso(ev.slot, self.tz)} ({trigger})"
        try:
            job = self.jobs.start(reason=reason)
        except PalateError as e:
            return TickResult(trigger, "blocked", e.message, jumped_s=jumped)
        self._seq_at_start[job.id] = seq
        await self.state.set(
            K_ATTEMPT,
            {"ts": now, "slot": ev.slot, "trigger": trigger, "job": job.id, "reason": reason},
        )
        log.info("started training run %s: %s", job.id, reason)
        return TickResult(trigger, "started", reason, job=job.id, jumped_s=jumped)

    async def evaluate(self, now: float) -> Evaluation:
        """Is a slot due at ``now``, and which conditions block it (no side effects)."""
        attempt = await self.state.get(K_ATTEMPT) or {}
        last = attempt.get("ts")
        if last is not None and last > now + FUTURE_ATTEMPT_S:
            log.warning(
                "the last attempt (%s) is in the future: the clock moved back; ignoring it",
                iso(last, self.tz),
            )
            last = None
        slot = slot_at_or_before(now, self.config.time, self.tz)
        if last is not None and last >= slot:
            nxt = next_slot_after(now, self.config.time, self.tz)
            why = f"already ran for this slot; next at {iso(nxt, self.tz)}"
            return Evaluation(now, slot, False, why)
        since = float(await self.state.get(K_SINCE) or 0.0)
        if slot < since:
            nxt = next_slot_after(now, self.config.time, self.tz)
            why = (
                f"first run at {iso(nxt, self.tz)}: the scheduler started on this home at "
                f"{iso(since, self.tz)}, after the {iso(slot, self.tz)} slot (catch-up is only "
                "for nights the daemon missed)"
            )
            return Evaluation(now, slot, False, why)
        late = now - slot
        if late > self.config.grace_h * 3600:
            nxt = next_slot_after(now, self.config.time, self.tz)
            why = (
                f"missed the run of {iso(slot, self.tz)} by {late / 3600:.1f} h, more than "
                f"grace_h = {self.config.grace_h:g}; next at {iso(nxt, self.tz)}"
            )
            return Evaluation(now, slot, False, why)
        ev = Evaluation(now, slot, True, f"due since {iso(slot, self.tz)}")
        if self.jobs.current is not None:
            ev.blocked.append(f"training run {self.jobs.current.id} is already running")
        ev.conditions = await self.conditions()
        ev.blocked.extend(c.detail for c in ev.conditions if not c.ok)
        return ev

    async def conditions(self) -> list[Condition]:
        """Every configured precondition, each with the reason it passes or blocks."""
        cfg = self.config
        out = [await self._new_events()]
        if cfg.require_ac:
            out.append(power_condition(await asyncio.to_thread(self.probes.power)))
        if cfg.require_idle_s > 0:
            out.append(idle_condition(await asyncio.to_thread(self.probes.idle), cfg))
        return out

    async def _new_events(self) -> Condition:
        need = self.config.min_new_events
        top = await self.state.max_seq()
        mark = int(await self.state.get(K_TRAINED_SEQ) or 0)
        new = top - mark if top >= mark else top  # the store was emptied since
        text = f"{new} new event(s) since the last completed run; needs {need}"
        if new >= need:
            return Condition("new_events", True, text)
        return Condition("new_events", False, f"{text} (min_new_events)")

    # -- following runs ------------------------------------------------------------------
    def _on_job_event(self, kind: str, payload: dict[str, Any]) -> None:
        """``jobs.listeners`` callback (synchronous): persist in a task."""
        if kind == "progress":
            job_id = str(payload.get("job"))
            if job_id not in self._seq_at_start:
                self._seq_at_start[job_id] = -1  # claimed; filled in by the task
                self._spawn(self._note_start(job_id))
        elif kind == "job":
            self._spawn(self._record(dict(payload)))

    async def _note_start(self, job_id: str) -> None:
        # A run started by `palate train`: its data cut is (about) now, at its first progress.
        self._seq_at_start[job_id] = await self.state.max_seq()

    async def _record(self, job: dict[str, Any]) -> None:
        try:
            await self._persist(job)
        except Exception:
            log.exception("could not record the outcome of training run %s", job.get("id"))

    async def _persist(self, job: dict[str, Any]) -> None:
        job_id = str(job.get("id"))
        seq = self._seq_at_start.pop(job_id, -1)
        if seq < 0:
            seq = await self.state.max_seq()  # never saw it start: the finish is the cut
        result = job.get("result") or {}
        finished = job.get("finished") or self.clock.time()
        summary = {
            "job": job_id,
            "ts": finished,
            "started": job.get("started"),
            "reason": job.get("reason"),
            "outcome": job.get("outcome"),
            "error": job.get("error"),
            "version": result.get("version"),
            "decision": result.get("decision"),
            "deployed": result.get("deployed"),
            "seq": seq,
        }
        if result.get("policy") is not None:  # the nightly policy run's outcome, when it ran
            summary["policy"] = result["policy"]
        await self.state.set(K_RESULT, summary)
        attempt = await self.state.get(K_ATTEMPT) or {}
        started = job.get("started")
        manual = attempt.get("job") != job_id
        if manual and isinstance(started, (int, float)) and started > attempt.get("ts", -1.0):
            # A manual run counts as an attempt: no second run for a slot it already covered.
            await self.state.set(
                K_ATTEMPT,
                {"ts": started, "trigger": "manual", "job": job_id, "reason": job.get("reason")},
            )
        if job.get("outcome") == "done":
            await self.state.set(K_SUCCESS, summary)
            await self.state.set(K_TRAINED_SEQ, seq)

    # -- reporting -----------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """The ``schedule`` part of ``status``: next run, history, what blocks right now."""
        now = self.clock.time()
        ev = await self.evaluate(now)
        nxt = next_slot_after(now, self.config.time, self.tz)
        if not self.config.enabled:
            next_run = None
        elif ev.due:
            next_run = now if ev.runnable else now + self.check_every_s
        else:
            next_run = nxt
        last_tick = asdict(self.last_tick) if self.last_tick else None
        return {
            "enabled": self.config.enabled,
            "config": asdict(self.config),
            "timezone": str(self.tz) if self.tz else "local",
            "now": now,
            "due": ev.due and self.config.enabled,
            "why": ev.why,
            "next_run": next_run,
            "next_run_local": iso(next_run, self.tz),
            "next_slot": nxt,
            "blocked": ev.blocked,
            "conditions": [asdict(c) for c in ev.conditions or await self.conditions()],
            "first_run": await self.state.get(K_ATTEMPT) is None,
            "since": await self.state.get(K_SINCE),
            "last_attempt": await self.state.get(K_ATTEMPT),
            "last_success": await self.state.get(K_SUCCESS),
            "last_result": await self.state.get(K_RESULT),
            "last_check": last_tick,
            "clock_jumps": self.clock_jumps,
            "check_every_s": self.check_every_s,
        }
