"""Cron schedules that start retrain jobs: the ``schedules`` table of the state database and crontab parsing.

A schedule is (adapter, 5-field crontab expression), in UTC. The stores only record them; each job runner
(`pipelines.runner`) mirrors the table into APScheduler whenever `ScheduleStore.generation()` changes and, on each
fire, calls `ScheduleStore.fire`. `next_run_at` is the next fire still owed, so a runner that starts after a missed
fire fires it once.

Each cron tick fires once however many runners share the database: a fire is for the tick it belongs to (the
latest cron time at or before it, since the schedule was created; a fire moved by hand to a time with no cron time
since then is a tick of its own), and it queues a job only by moving the schedule's `last_tick` forward in a
conditional update (... WHERE last_tick < tick), in the same transaction as the job. The runners that lose find the
tick taken and queue nothing; a runner killed in between leaves neither.

Weekdays follow crontab (0 and 7 are Sunday), not APScheduler 3's Monday = 0: `cron_trigger` translates them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Connection, Row, delete, insert, or_, select, update

from pipelines.jobs import (
    DuplicateJobError,
    Job,
    JobError,
    JobsDatabase,
    JobStore,
    UnknownAdapterJobError,
    iso_time,
    short_list,
)
from pipelines.jobs_tables import GENERATION_KEY, JOBS_LOCK, bump_generation, jobs_state, schedules

CRON_HELP = "use 5 fields: minute hour day month weekday, e.g. '0 3 * * *'"
CRON_TIMEZONE = UTC  # schedules are in UTC: servers rarely agree on a local zone
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_SCHEDULE_COLUMNS = (schedules.c.id, schedules.c.adapter, schedules.c.cron, schedules.c.created_at,
                     schedules.c.last_run_at, schedules.c.next_run_at, schedules.c.last_tick)


# --------------------------------------------------------------------------------------------- errors


class ScheduleError(JobError, ValueError):
    """An invalid cron expression (HTTP 400 / 422)."""


class DuplicateScheduleError(JobError, ValueError):
    """The adapter already has a schedule with the same cron expression (HTTP 409; a ValueError for 400 handlers)."""

    status_code = 409


class ScheduleNotFoundError(JobError, LookupError):
    """No schedule with that id (HTTP 404)."""

    status_code = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------- cron


def _weekday_number(token: str, allow_seven: bool) -> int:
    low = token.lower()
    if low in _WEEKDAYS:
        return _WEEKDAYS.index(low)
    if not low.isdigit() or int(low) > (7 if allow_seven else 6):
        raise ValueError(f"weekday {token!r} is not 0-7 (0 and 7 are Sunday) or sun..sat")
    return int(low)


def _crontab_weekdays(field_: str) -> str:
    """Translate a crontab weekday field (0 or 7 = Sunday) into APScheduler 3 day names.

    APScheduler 3 numbers weekdays from Monday = 0 (its documented historical mistake), so '0 3 * * 1-5' passed
    through as-is would run Tuesday to Saturday. Expanding to names keeps standard crontab meaning.
    """
    if field_ == "*":
        return field_
    days: set[int] = set()
    for part in field_.split(","):
        rng, _, step_text = part.partition("/")
        if step_text and (not step_text.isdigit() or int(step_text) == 0):
            raise ValueError(f"weekday step {step_text!r} must be a positive integer")
        step = int(step_text or 1)
        if rng == "*":
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = _weekday_number(a, False), _weekday_number(b, True)
            if lo > hi:
                raise ValueError(f"weekday range {rng!r} runs backwards")
        else:
            lo = _weekday_number(rng, True)
            hi = 6 if step_text else lo
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_WEEKDAYS[d] for d in sorted(days))


def cron_trigger(expr: str) -> CronTrigger:
    """A UTC APScheduler CronTrigger from a 5-field crontab expression; ScheduleError saying what is wrong."""
    if not isinstance(expr, str):
        raise ScheduleError(f"invalid cron expression {expr!r}: not a string; {CRON_HELP}")
    fields = expr.split()
    try:
        if len(fields) != 5:
            raise ValueError(f"got {len(fields)} field(s), expected 5")
        minute, hour, day, month, weekday = fields
        trigger = CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_crontab_weekdays(weekday),
            timezone=CRON_TIMEZONE,
        )
    except ValueError as e:
        raise ScheduleError(f"invalid cron expression '{expr}': {e}; {CRON_HELP}") from None
    if trigger.get_next_fire_time(None, datetime.now(CRON_TIMEZONE)) is None:
        raise ScheduleError(f"invalid cron expression '{expr}': it never fires; {CRON_HELP}")
    return trigger


def _next_fire(trigger: CronTrigger, after: float) -> float | None:
    """The epoch time of `trigger`'s first fire after `after`; None when it never fires again."""
    nxt = trigger.get_next_fire_time(None, datetime.fromtimestamp(after, CRON_TIMEZONE))
    return None if nxt is None else nxt.timestamp()


# --------------------------------------------------------------------------------------------- ticks


def latest_fire(trigger: CronTrigger, at: float, not_before: float) -> float | None:
    """The latest fire time of `trigger` in [not_before, at]; None when it has none there.

    APScheduler 3 only looks forward, so this looks forward from ever earlier starts (a minute back, two, four, ...)
    until a window holds a fire, then walks to the last one: the work is bounded by the fires in that window."""
    span = 60.0
    while True:
        start = max(not_before, at - span)
        found = _next_fire(trigger, start)
        if found is not None and found <= at:
            # cron times are whole seconds, and _next_fire counts one at its start: +1 s is the one after `found`
            while (following := _next_fire(trigger, found + 1)) is not None and following <= at:
                found = following
            return found
        if start <= not_before:
            return None
        span *= 2


# --------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Schedule:
    """A cron schedule that submits a 'schedule' job for its adapter; next_run_at is the next fire still owed,
    last_tick the cron time of the last fire (both epoch seconds, UTC)."""

    id: int
    adapter: str
    cron: str
    created_at: float
    last_run_at: float | None
    next_run_at: float | None
    last_tick: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "adapter": self.adapter,
            "cron": self.cron,
            "timezone": "UTC",
            "created_at": iso_time(self.created_at),
            "last_run_at": iso_time(self.last_run_at),
            "next_run_at": iso_time(self.next_run_at),
        }


def _schedule(row: Row[Any]) -> Schedule:
    return Schedule(*row)


class ScheduleStore(JobsDatabase):
    """Cron schedules (the same state database as the jobs); runners reload them when ``generation()`` changes."""

    def __repr__(self) -> str:
        return f"ScheduleStore(home={str(self.home)!r})"

    @staticmethod
    def _get(conn: Connection, schedule_id: int | str, *, for_update: bool = False) -> Schedule:
        """Ids from a URL path arrive as strings: '3' finds schedule 3, anything that is not an integer finds none."""
        key = int(schedule_id) if isinstance(schedule_id, str) and schedule_id.strip().isdigit() else schedule_id
        row = None
        if isinstance(key, int) and not isinstance(key, bool) and 0 < key < 2**63:  # SQLite raises past 64 bits
            query = select(*_SCHEDULE_COLUMNS).where(schedules.c.id == key)
            row = conn.execute(query.with_for_update() if for_update else query).first()
        if row is None:
            ids = list(conn.scalars(select(schedules.c.id).order_by(schedules.c.id)))
            raise ScheduleNotFoundError(f"schedule {schedule_id!r} not found; existing schedules: {short_list(ids)}")
        return _schedule(row)

    def add(self, adapter: str, cron: str) -> Schedule:
        """Validate the cron expression and the adapter, then store; next_run_at is its first fire time."""
        trigger = cron_trigger(cron)
        cron = " ".join(cron.split())
        self._check_adapter(adapter)
        now = time.time()
        with self.database.write(lock=JOBS_LOCK) as conn:
            dup = conn.execute(select(schedules.c.id).where(schedules.c.adapter == adapter, schedules.c.cron == cron))
            if (found := dup.first()) is not None:
                raise DuplicateScheduleError(f"adapter {adapter!r} already has schedule {found.id} with cron '{cron}'")
            added = conn.execute(insert(schedules).values(
                adapter=adapter, cron=cron, created_at=now, next_run_at=_next_fire(trigger, now),
            ))
            bump_generation(conn)
            return self._get(conn, added.inserted_primary_key[0])

    def get(self, schedule_id: int | str) -> Schedule:
        with self.database.read() as conn:
            return self._get(conn, schedule_id)

    def list(self) -> list[Schedule]:
        with self.database.read() as conn:
            return [_schedule(row) for row in conn.execute(select(*_SCHEDULE_COLUMNS).order_by(schedules.c.id))]

    def delete(self, schedule_id: int | str) -> Schedule:
        """Remove a schedule (ScheduleNotFoundError if unknown); returns what was removed."""
        with self.database.write(lock=JOBS_LOCK) as conn:
            schedule = self._get(conn, schedule_id)
            conn.execute(delete(schedules).where(schedules.c.id == schedule.id))
            bump_generation(conn)
        return schedule

    def mark_run(self, schedule_id: int, at: float) -> None:
        """Record a fire at ``at`` and the next fire owed (not a generation change: the runner needs no reload)."""
        with self.database.write(lock=JOBS_LOCK, durable=False) as conn:
            schedule = self._get(conn, schedule_id)
            conn.execute(update(schedules).where(schedules.c.id == schedule_id).values(
                last_run_at=at, next_run_at=_next_fire(cron_trigger(schedule.cron), at),
            ))

    def fire(self, schedule_id: int, jobs: JobStore, now: float | None = None) -> Job | None:
        """A fire at `now` (default: now): take its tick and queue a 'schedule' job in one transaction.

        None when another runner took this tick already. Once the tick is taken (recorded as fired, next_run_at
        moved on) the job may still be refused, after the commit: UnknownAdapterJobError, DuplicateJobError.
        ScheduleNotFoundError if the schedule is gone."""
        now = time.time() if now is None else now
        refused: JobError | None = None
        try:  # the registry read stays outside the transaction
            self._check_adapter(self.get(schedule_id).adapter)
        except UnknownAdapterJobError as err:
            refused = err
        with self.database.write(lock=JOBS_LOCK) as conn:
            schedule = self._get(conn, schedule_id, for_update=True)
            trigger = cron_trigger(schedule.cron)
            tick = latest_fire(trigger, now, schedule.created_at)
            tick = now if tick is None else tick  # moved by hand to a time with no cron time since the schedule began
            taken = conn.execute(update(schedules).where(
                schedules.c.id == schedule.id, or_(schedules.c.last_tick.is_(None), schedules.c.last_tick < tick),
            ).values(last_tick=tick, last_run_at=now, next_run_at=_next_fire(trigger, now))).rowcount
            if not taken:
                return None
            job, reason = None, f"schedule {schedule.id} (cron '{schedule.cron}')"
            try:
                if refused is None:
                    job = jobs.submit_in(conn, schedule.adapter, "schedule", reason)
            except DuplicateJobError as err:
                refused = err  # raised after the commit: the tick stays taken
        if refused is not None:
            raise refused
        return job

    def generation(self) -> int:
        with self.database.read() as conn:
            value = conn.execute(select(jobs_state.c.value).where(jobs_state.c.key == GENERATION_KEY)).scalar()
        return int(value or 0)
