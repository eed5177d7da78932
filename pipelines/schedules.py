"""Cron schedules that start retrain jobs: the ``schedules`` table of ``<home>/jobs.db`` and crontab parsing.

A schedule is (adapter, 5-field crontab expression), in UTC. The stores only record them; the job runner
(`pipelines.runner`) mirrors the table into APScheduler whenever `ScheduleStore.generation()` changes and submits a
'schedule' job on each fire. `next_run_at` is the next fire still owed, so a runner that starts after a missed fire
fires it once.

Weekdays follow crontab (0 and 7 are Sunday), not APScheduler 3's Monday = 0: `cron_trigger` translates them.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from pipelines.jobs import JobError, JobsDatabase, iso_time, short_list

CRON_HELP = "use 5 fields: minute hour day month weekday, e.g. '0 3 * * *'"
CRON_TIMEZONE = UTC  # schedules are in UTC: servers rarely agree on a local zone
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter TEXT NOT NULL,
    cron TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_run_at REAL,
    next_run_at REAL,
    UNIQUE (adapter, cron)
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state (key, value) VALUES ('schedules_generation', 0)
"""
_SCHEDULE_COLUMNS = "id, adapter, cron, created_at, last_run_at, next_run_at"


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


# --------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Schedule:
    """A cron schedule that submits a 'schedule' job for its adapter; next_run_at is the next fire still owed."""

    id: int
    adapter: str
    cron: str
    created_at: float
    last_run_at: float | None
    next_run_at: float | None

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


class ScheduleStore(JobsDatabase):
    """Cron schedules (same jobs.db); the runner reloads them when ``generation()`` changes."""

    _schema = _SCHEMA

    def __repr__(self) -> str:
        return f"ScheduleStore(home={str(self.home)!r})"

    def _get(self, conn: sqlite3.Connection, schedule_id: int | str) -> Schedule:
        """Ids from a URL path arrive as strings: '3' finds schedule 3, anything that is not an integer finds none."""
        key = int(schedule_id) if isinstance(schedule_id, str) and schedule_id.strip().isdigit() else schedule_id
        row = None
        if isinstance(key, int) and not isinstance(key, bool) and 0 < key < 2**63:  # SQLite raises past 64 bits
            row = conn.execute(f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE id = ?", (key,)).fetchone()
        if row is None:
            ids = [i for (i,) in conn.execute("SELECT id FROM schedules ORDER BY id")]
            raise ScheduleNotFoundError(f"schedule {schedule_id!r} not found; existing schedules: {short_list(ids)}")
        return Schedule(*row)

    def add(self, adapter: str, cron: str) -> Schedule:
        """Validate the cron expression and the adapter, then store; next_run_at is its first fire time."""
        trigger = cron_trigger(cron)
        cron = " ".join(cron.split())
        self._check_adapter(adapter)
        now = time.time()
        with self._write() as conn:
            dup = conn.execute("SELECT id FROM schedules WHERE adapter = ? AND cron = ?", (adapter, cron)).fetchone()
            if dup is not None:
                raise DuplicateScheduleError(f"adapter {adapter!r} already has schedule {dup[0]} with cron '{cron}'")
            cur = conn.execute(
                "INSERT INTO schedules (adapter, cron, created_at, next_run_at) VALUES (?, ?, ?, ?)",
                (adapter, cron, now, _next_fire(trigger, now)),
            )
            conn.execute("UPDATE state SET value = value + 1 WHERE key = 'schedules_generation'")
            return self._get(conn, cur.lastrowid)

    def get(self, schedule_id: int | str) -> Schedule:
        with self._read() as conn:
            return self._get(conn, schedule_id)

    def list(self) -> list[Schedule]:
        with self._read() as conn:
            return [Schedule(*row) for row in conn.execute(f"SELECT {_SCHEDULE_COLUMNS} FROM schedules ORDER BY id")]

    def delete(self, schedule_id: int | str) -> Schedule:
        """Remove a schedule (ScheduleNotFoundError if unknown); returns what was removed."""
        with self._write() as conn:
            schedule = self._get(conn, schedule_id)
            conn.execute("DELETE FROM schedules WHERE id = ?", (schedule.id,))
            conn.execute("UPDATE state SET value = value + 1 WHERE key = 'schedules_generation'")
        return schedule

    def mark_run(self, schedule_id: int, at: float) -> None:
        """Record a fire at ``at`` and the next fire owed (not a generation change: the runner needs no reload)."""
        with self._write(durable=False) as conn:
            schedule = self._get(conn, schedule_id)
            conn.execute(
                "UPDATE schedules SET last_run_at = ?, next_run_at = ? WHERE id = ?",
                (at, _next_fire(cron_trigger(schedule.cron), at), schedule_id),
            )

    def generation(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT value FROM state WHERE key = 'schedules_generation'").fetchone()[0]
