"""The nightly scheduler against an injected clock, store, job runner and power probes.

Nothing here sleeps: the fake clock moves days in microseconds, so each test walks the
schedule the way a laptop lives it (asleep across 03:00, restarted, clock changed).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from palate.config import ScheduleConfig, load_config
from palate.errors import PalateError
from palate.paths import resolve
from palate.runtime.api import Api
from palate.runtime.power import IdleState, PowerState
from palate.runtime.scheduler import (
    K_ATTEMPT,
    K_SINCE,
    K_SUCCESS,
    K_TRAINED_SEQ,
    Scheduler,
    next_slot_after,
    slot_at_or_before,
)

UTC = timezone.utc
PARIS = ZoneInfo("Europe/Paris")


def ts(y: int, mo: int, d: int, h: int = 0, mi: int = 0, tz: Any = UTC) -> float:
    return datetime(y, mo, d, h, mi, tzinfo=tz).timestamp()


class FakeClock:
    """Wall and monotonic clocks that move only when told; ``sleep`` freezes monotonic."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s

    def sleep_until(self, wall: float) -> None:
        """Suspend: the wall clock moves, the monotonic one (CLOCK_MONOTONIC) does not."""
        self.wall = wall

    def set_wall(self, wall: float) -> None:
        self.wall = wall


class FakeState:
    """The store meta and watermark, in a dict (survives a 'restart' of the scheduler)."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.seq = 0

    async def get(self, key: str) -> Any:
        return self.meta.get(key)

    async def set(self, key: str, value: Any) -> None:
        self.meta[key] = value

    async def max_seq(self) -> int:
        return self.seq


@dataclass
class FakeJob:
    id: str
    reason: str
    started: float

    def to_wire(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FakeJobs:
    """``TrainingJobs`` without a child: the test decides when and how a run ends."""

    clock: FakeClock
    started: list[FakeJob] = field(default_factory=list)
    current: FakeJob | None = None
    listeners: set[Callable[[str, dict[str, Any]], None]] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def start(self, reason: str) -> FakeJob:
        if self.current is not None:
            raise PalateError("conflict", f"training run {self.current.id} is already running")
        job = FakeJob(f"job{next(self._ids)}", reason, self.clock.time())
        self.current = job
        self.started.append(job)
        return job

    def finish(self, outcome: str = "done", version: int = 1) -> None:
        job = self.current
        assert job is not None
        self.current = None
        wire = {
            "id": job.id,
            "reason": job.reason,
            "started": job.started,
            "finished": self.clock.time(),
            "outcome": outcome,
            "result": {"version": version, "decision": "deploy", "deployed": True}
            if outcome == "done"
            else {},
            "error": None if outcome == "done" else "exited with 1",
        }
        for fn in list(self.listeners):
            fn("job", wire)


class FakeProbes:
    def __init__(self) -> None:
        self.on_ac: bool | None = True
        self.idle_s: float | None = 3600.0

    def power(self) -> PowerState:
        return PowerState(
            self.on_ac, {True: "on AC", False: "on battery", None: "unknown"}[self.on_ac]
        )

    def idle(self) -> IdleState:
        return IdleState(self.idle_s, "fake idle")


@dataclass
class World:
    clock: FakeClock
    state: FakeState
    jobs: FakeJobs
    probes: FakeProbes
    config: ScheduleConfig

    def scheduler(self, **cfg: Any) -> Scheduler:
        return Scheduler(
            replace(self.config, **cfg),
            self.jobs,
            self.state,
            clock=self.clock,
            probes=self.probes,
            tz=UTC,
        )


@pytest.fixture
def world() -> World:
    clock = FakeClock(ts(2026, 3, 1, 12, 0))
    state = FakeState()
    state.seq = 100  # plenty of feedback
    state.meta[K_SINCE] = ts(2026, 1, 1)  # the home (and its scheduler) exists since January
    return World(clock, state, FakeJobs(clock), FakeProbes(), ScheduleConfig())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def walk(s: Scheduler, clock: FakeClock, until: float, step: float = 300.0) -> list[str]:
    """Run the periodic due-check every ``step`` seconds until ``until``; outcomes."""
    out = []
    while clock.time() + step <= until:
        clock.advance(step)
        out.append((await s.tick("periodic")).outcome)
    return out


# --- slots ---------------------------------------------------------------------------------


def test_slots_are_the_local_time_of_day() -> None:
    now = ts(2026, 3, 2, 9, 30)
    assert slot_at_or_before(now, "03:00", UTC) == ts(2026, 3, 2, 3)
    assert next_slot_after(now, "03:00", UTC) == ts(2026, 3, 3, 3)
    assert slot_at_or_before(ts(2026, 3, 2, 2, 59), "03:00", UTC) == ts(2026, 3, 1, 3)
    assert slot_at_or_before(ts(2026, 3, 2, 3), "03:00", UTC) == ts(2026, 3, 2, 3)


# --- the nightly run -------------------------------------------------------------------------


def test_nightly_run_fires_once_per_night(world: World) -> None:
    async def main() -> None:
        s = world.scheduler()
        world.state.meta[K_ATTEMPT] = {"ts": ts(2026, 3, 1, 3, 0)}  # last night ran
        await s.start(drive=False)
        assert world.jobs.started == []
        outcomes = await walk(s, world.clock, ts(2026, 3, 2, 2, 55))
        assert set(outcomes) == {"not_due"}
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        assert (await s.tick("nightly")).outcome == "started"
        assert len(world.jobs.started) == 1
        assert "2026-03-02T03:00" in world.jobs.started[0].reason
        # the cron trigger and the periodic check firing again change nothing
        assert (await s.tick("nightly")).outcome == "not_due"  # this slot is spent
        world.clock.advance(1800)
        world.jobs.finish()
        await s.settle()
        assert world.state.meta[K_SUCCESS]["job"] == "job1"
        assert world.state.meta[K_TRAINED_SEQ] == 100
        world.state.seq = 200
        outcomes = await walk(s, world.clock, ts(2026, 3, 3, 2, 59))
        assert set(outcomes) == {"not_due"}
        assert len(world.jobs.started) == 1
        outcomes = await walk(s, world.clock, ts(2026, 3, 3, 3, 4))
        assert outcomes.count("started") == 1
        assert len(world.jobs.started) == 2
        await s.stop()

    run(main())


def test_missed_while_asleep_runs_once_at_next_check(world: World) -> None:
    async def main() -> None:
        s = world.scheduler()
        world.clock.set_wall(ts(2026, 3, 1, 23, 0))
        world.state.meta[K_ATTEMPT] = {"ts": ts(2026, 3, 1, 3, 0)}
        await s.start(drive=False)
        # lid closed at 23:00, opened at 07:30: wall clock jumped, monotonic did not
        world.clock.sleep_until(ts(2026, 3, 2, 7, 30))
        first = await s.tick("periodic")
        assert first.outcome == "started"
        assert first.jumped_s is not None and first.jumped_s > 8 * 3600 - 60
        assert s.clock_jumps == 1
        world.jobs.finish()
        await s.settle()
        outcomes = await walk(s, world.clock, ts(2026, 3, 3, 2, 55))
        assert "started" not in outcomes
        assert len(world.jobs.started) == 1

    run(main())


def test_daemon_restarted_after_a_missed_run_runs_it_exactly_once(world: World) -> None:
    async def main() -> None:
        world.state.meta[K_ATTEMPT] = {"ts": ts(2026, 3, 1, 3, 0)}
        # machine off across 2026-03-02 03:00; the daemon starts at 09:00
        world.clock.set_wall(ts(2026, 3, 2, 9, 0))
        s1 = world.scheduler()
        await s1.start(drive=False)
        assert len(world.jobs.started) == 1
        assert s1.last_tick is not None and s1.last_tick.trigger == "start"
        await s1.stop()
        # the daemon is restarted while the child runs, and again after it finished
        world.jobs.current = None
        for _ in range(2):
            world.clock.advance(600)
            s2 = world.scheduler()
            await s2.start(drive=False)
            await walk(s2, world.clock, world.clock.time() + 3600)
            await s2.stop()
        assert len(world.jobs.started) == 1

    run(main())


def test_several_missed_nights_collapse_into_one_run(world: World) -> None:
    async def main() -> None:
        world.state.meta[K_ATTEMPT] = {"ts": ts(2026, 3, 1, 3, 0)}
        world.clock.set_wall(ts(2026, 3, 6, 10, 0))  # away for five nights
        s = world.scheduler()
        await s.start(drive=False)
        await walk(s, world.clock, ts(2026, 3, 7, 2, 55))
        assert len(world.jobs.started) == 1

    run(main())


def test_apscheduler_restart_erases_an_overdue_run() -> None:
    """Why Palate keeps its own bookkeeping: APScheduler 3.x computes a (re)added job's
    next_run_time from now, so a run whose time passed while the daemon was down is not
    made up after a restart; it simply moves to tomorrow."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    async def main() -> datetime:
        now = datetime.now(UTC)
        just_missed = now.replace(second=0, microsecond=0)  # <= now: overdue already
        aps = AsyncIOScheduler(timezone=UTC)
        aps.start(paused=True)  # a fresh start, as after a daemon restart
        job = aps.add_job(
            lambda: None,
            CronTrigger(hour=just_missed.hour, minute=just_missed.minute, timezone=UTC),
            id="nightly",
            coalesce=True,
            misfire_grace_time=12 * 3600,
            replace_existing=True,
        )
        nrt: datetime = job.next_run_time
        aps.shutdown(wait=False)
        return nrt

    nrt = run(main())
    now = datetime.now(UTC)
    assert (nrt - now).total_seconds() > 23 * 3600  # tomorrow: the overdue run is gone


def test_apscheduler_wakes_the_due_check_with_the_right_options(world: World) -> None:
    async def main() -> None:
        s = world.scheduler(time="04:15", grace_h=6)
        world.state.meta[K_ATTEMPT] = {"ts": world.clock.time()}
        await s.start(drive=True)
        jobs = {j.id: j for j in s._aps.get_jobs()}
        nightly, periodic = jobs["palate-nightly"], jobs["palate-due-check"]
        assert nightly.coalesce is True and nightly.max_instances == 1
        assert nightly.misfire_grace_time == 6 * 3600
        assert (nightly.next_run_time.hour, nightly.next_run_time.minute) == (4, 15)
        assert periodic.trigger.interval.total_seconds() == 300
        assert nightly.args == ("nightly",)
        await s.stop()
        assert s._aps is None

    run(main())


# --- conditions -------------------------------------------------------------------------------


def test_conditions_block_with_their_reasons_then_the_run_happens(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        world.state.meta[K_TRAINED_SEQ] = 95  # 5 new events only
        world.probes.on_ac = False
        world.probes.idle_s = 12.0
        s = world.scheduler()
        await s.start(drive=False)
        r = s.last_tick
        assert r is not None and r.outcome == "blocked"
        assert "5 new event(s)" in r.detail and "needs 20" in r.detail
        assert "on battery" in r.detail and "require_ac" in r.detail
        assert "active 12 s ago" in r.detail and "require_idle_s" in r.detail
        snap = await s.snapshot()
        assert snap["due"] is True and len(snap["blocked"]) == 3
        assert {c["name"]: c["ok"] for c in snap["conditions"]} == {
            "new_events": False,
            "ac_power": False,
            "idle": False,
        }
        assert snap["next_run"] == world.clock.time() + 300
        assert world.jobs.started == [] and K_ATTEMPT not in world.state.meta
        world.state.seq = 130
        world.probes.on_ac = True
        world.clock.advance(300)
        r = await s.tick("periodic")
        assert r.outcome == "blocked" and r.detail.startswith("user active")
        world.probes.idle_s = 900.0
        world.clock.advance(300)
        assert (await s.tick("periodic")).outcome == "started"
        assert len(world.jobs.started) == 1

    run(main())


def test_unknown_power_and_idle_allow_the_run_and_say_so(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        world.probes.on_ac = None
        world.probes.idle_s = None
        s = world.scheduler()
        snap = await s.snapshot()
        cond = {c["name"]: c for c in snap["conditions"]}
        assert cond["ac_power"]["ok"] and not cond["ac_power"]["known"]
        assert "allowed" in cond["ac_power"]["detail"]
        assert cond["idle"]["ok"] and not cond["idle"]["known"]
        assert (await s.tick("start")).outcome == "started"

    run(main())


def test_conditions_can_be_turned_off(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        world.state.meta[K_TRAINED_SEQ] = 100
        world.probes.on_ac = False
        world.probes.idle_s = 0.0
        s = world.scheduler(min_new_events=0, require_ac=False, require_idle_s=0)
        assert (await s.tick("nightly")).outcome == "started"
        assert [c.name for c in await s.conditions()] == ["new_events"]

    run(main())


def test_disabled_schedule_never_starts(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        s = world.scheduler(enabled=False)
        assert (await s.tick("nightly")).outcome == "disabled"
        assert (await s.snapshot())["next_run"] is None
        assert world.jobs.started == []

    run(main())


def test_train_now_bypasses_the_conditions_and_counts_as_the_nights_run(world: World) -> None:
    """`palate train --now` is the `train` method: it starts a job without asking the
    scheduler; the scheduler then records its outcome like its own."""

    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 2, 0))
        world.probes.on_ac = False  # would block a scheduled run
        s = world.scheduler()
        await s.start(drive=False)
        api = Api(writer=None, key_status=None, socket_path=Path("/nonexistent"))  # type: ignore[arg-type]
        api.jobs = world.jobs  # type: ignore[assignment]
        reply = await api.train({"reason": "requested by the user"})
        assert reply["job"]["id"] == "job1"
        world.clock.set_wall(ts(2026, 3, 2, 3, 30))  # runs across 03:00
        world.jobs.finish()
        await s.settle()
        assert world.state.meta[K_SUCCESS]["job"] == "job1"
        assert world.state.meta[K_TRAINED_SEQ] == 100
        world.probes.on_ac = True
        r = await s.tick("periodic")
        assert r.outcome == "blocked" and "0 new event(s)" in r.detail

    run(main())


def test_a_run_already_going_blocks_without_spending_the_slot(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        s = world.scheduler()
        world.jobs.current = FakeJob("manual", "user", ts(2026, 3, 2, 3, 30))  # started later
        r = await s.tick("nightly")
        assert r.outcome == "blocked" and "manual is already running" in r.detail
        assert K_ATTEMPT not in world.state.meta
        world.jobs.current = None
        world.clock.advance(300)
        assert (await s.tick("periodic")).outcome == "started"

    run(main())


def test_a_failed_run_is_not_retried_until_the_next_night(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        s = world.scheduler()
        await s.start(drive=False)
        world.clock.advance(60)
        world.jobs.finish("failed")
        await s.settle()
        assert K_SUCCESS not in world.state.meta
        assert world.state.meta["schedule.last_result"]["outcome"] == "failed"
        assert K_TRAINED_SEQ not in world.state.meta  # the watermark did not move
        outcomes = await walk(s, world.clock, ts(2026, 3, 3, 3, 5))
        assert outcomes.count("started") == 1  # at 03:00 the next night
        assert len(world.jobs.started) == 2

    run(main())


def test_grace_limits_how_late_a_missed_run_starts(world: World) -> None:
    async def main() -> None:
        world.state.meta[K_ATTEMPT] = {"ts": ts(2026, 3, 1, 3, 0)}
        world.clock.set_wall(ts(2026, 3, 2, 10, 0))
        s = world.scheduler(grace_h=6)
        r = await s.tick("start")
        assert r.outcome == "not_due" and "grace_h = 6" in r.detail
        world.clock.set_wall(ts(2026, 3, 2, 8, 59))
        assert (await s.tick("periodic")).outcome == "started"

    run(main())


# --- the clock ----------------------------------------------------------------------------


def test_clock_set_back_after_a_run_does_not_run_twice(world: World) -> None:
    async def main() -> None:
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        s = world.scheduler()
        await s.start(drive=False)
        world.jobs.finish()
        await s.settle()
        world.state.seq += 100
        world.clock.set_wall(ts(2026, 3, 2, 1, 0))  # NTP/user sets the clock back 2 h
        r = await s.tick("periodic")
        assert r.jumped_s is not None and r.jumped_s < 0
        outcomes = await walk(s, world.clock, ts(2026, 3, 2, 23, 0))
        assert "started" not in outcomes
        assert len(world.jobs.started) == 1

    run(main())


def test_an_attempt_far_in_the_future_does_not_block_forever(world: World) -> None:
    async def main() -> None:
        world.state.meta[K_ATTEMPT] = {"ts": ts(2031, 1, 1, 3, 0)}  # a clock once set to 2031
        world.clock.set_wall(ts(2026, 3, 2, 4, 0))
        s = world.scheduler()
        assert (await s.tick("start")).outcome == "started"
        assert world.state.meta[K_ATTEMPT]["ts"] == ts(2026, 3, 2, 4, 0)

    run(main())


def test_daylight_saving_nights_run_once(world: World) -> None:
    """02:30 does not exist on spring-forward night and happens twice in autumn."""

    async def main() -> None:
        for day in ((2026, 3, 28), (2026, 10, 24)):
            clock = FakeClock(ts(*day, 12, 0, tz=PARIS))
            state = FakeState()
            state.seq = 10_000
            jobs = FakeJobs(clock)
            cfg = ScheduleConfig(time="02:30")
            s = Scheduler(cfg, jobs, state, clock=clock, probes=FakeProbes(), tz=PARIS)
            state.meta[K_ATTEMPT] = {"ts": clock.time()}
            for _ in range(2 * 24 * 12):  # two days, every 5 min
                clock.advance(300)
                if (await s.tick("periodic")).outcome == "started":
                    state.seq += 100
                    jobs.finish()
                    await s.settle()
            assert len(jobs.started) == 2, day

    run(main())


# --- config --------------------------------------------------------------------------------


def test_schedule_config_is_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALATE_HOME", str(tmp_path))
    paths = resolve(tmp_path)
    paths.config_file.write_text(
        '[schedule]\ntime = "01:45"\nmin_new_events = 5\nrequire_ac = false\n'
        "require_idle_s = 0\ngrace_h = 8\n"
    )
    cfg = load_config(paths).schedule
    assert (cfg.time, cfg.min_new_events, cfg.require_ac, cfg.grace_h) == ("01:45", 5, False, 8)
    for bad, msg in (
        ('time = "3am"', "HH:MM"),
        ('time = "24:00"', "HH:MM"),
        ("min_new_events = -1", "negative"),
        ('require_ac = "yes"', "must be a bool"),
        ("min_new_event = 3", "unknown setting"),
    ):
        paths.config_file.write_text(f"[schedule]\n{bad}\n")
        with pytest.raises(PalateError, match=msg):
            load_config(paths)


# --- a fresh install ---------------------------------------------------------------------


def test_a_fresh_home_waits_for_its_first_night(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Catch-up is for nights the daemon missed: the 03:00 slot of the day a home is created
    (within grace_h) is not due, however much feedback the first import brought."""

    async def main() -> None:
        world.state.meta.clear()  # a brand-new home: the daemon starts for the first time
        world.clock.set_wall(ts(2026, 3, 1, 9, 0))
        s = world.scheduler()
        with caplog.at_level("INFO", logger="palate.runtime.scheduler"):
            await s.start(drive=False)
        assert world.state.meta[K_SINCE] == ts(2026, 3, 1, 9, 0)
        assert "first scheduled training run: 2026-03-02T03:00" in caplog.text
        world.state.seq = 1626  # the first import, minutes later
        outcomes = await walk(s, world.clock, ts(2026, 3, 2, 2, 55))
        assert set(outcomes) == {"not_due"}, "no run before the first night"
        assert world.jobs.started == []
        snap = await s.snapshot()
        assert snap["first_run"] and snap["next_run"] == ts(2026, 3, 2, 3, 0)
        assert "first run at 2026-03-02T03:00" in snap["why"]
        world.clock.set_wall(ts(2026, 3, 2, 3, 0))
        assert (await s.tick("nightly")).outcome == "started"
        assert not (await s.snapshot())["first_run"]

    run(main())


def test_a_home_that_missed_a_night_after_its_first_start_catches_up(world: World) -> None:
    async def main() -> None:
        world.state.meta.clear()
        world.clock.set_wall(ts(2026, 3, 1, 9, 0))
        s1 = world.scheduler()
        await s1.start(drive=False)
        await s1.stop()
        # the machine is off across 2026-03-02 03:00; back at 08:00: that night is caught up
        world.clock.set_wall(ts(2026, 3, 2, 8, 0))
        s2 = world.scheduler()
        await s2.start(drive=False)
        assert len(world.jobs.started) == 1

    run(main())


def test_a_scheduler_from_before_since_existed_keeps_catching_up(world: World) -> None:
    async def main() -> None:
        world.state.meta.clear()
        world.state.meta[K_ATTEMPT] = {"ts": ts(2026, 3, 1, 3, 0)}  # it ran before the upgrade
        world.clock.set_wall(ts(2026, 3, 2, 9, 0))  # missed 2026-03-02 03:00
        s = world.scheduler()
        await s.start(drive=False)
        assert world.state.meta[K_SINCE] == 0.0
        assert len(world.jobs.started) == 1

    run(main())


def test_a_clock_file_drives_a_real_daemons_schedule(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """PALATE_CLOCK_FILE: how tests/test_month_e2e.py gives a real daemon simulated nights."""
    import time as _time

    from palate.runtime.scheduler import (
        CHECK_EVERY_ENV,
        CHECK_EVERY_S,
        CLOCK_FILE_ENV,
        FileClock,
        SystemClock,
        check_every_from_env,
        clock_from_env,
    )

    path = tmp_path / "clock"
    clock = FileClock(str(path))
    assert abs(clock.time() - _time.time()) < 5  # unreadable: the system's time
    path.write_text("1700000000.5\n")
    assert clock.time() == 1700000000.5
    monkeypatch.delenv(CLOCK_FILE_ENV, raising=False)
    monkeypatch.delenv(CHECK_EVERY_ENV, raising=False)
    assert isinstance(clock_from_env(), SystemClock) and check_every_from_env() == CHECK_EVERY_S
    monkeypatch.setenv(CLOCK_FILE_ENV, str(path))
    monkeypatch.setenv(CHECK_EVERY_ENV, "0.5")
    assert clock_from_env().time() == 1700000000.5 and check_every_from_env() == 0.5
