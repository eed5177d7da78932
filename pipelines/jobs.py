"""Retrain jobs: a queue in SQLite, cron schedules, a drift policy, and a runner that runs each job in its own process.

Who does what:

* the service and the CLI only *submit*: ``JobStore.submit`` and ``ScheduleStore.add`` are small SQLite writes with
  no torch import, so serving workers never train and predictions keep their latency;
* one ``JobRunner`` per home (``adaptserve jobs runner``, holding an exclusive flock on ``<home>/runner.lock``)
  turns cron schedules (APScheduler) and flagged drift (``DriftPolicy``) into queued jobs, claims queued jobs and
  runs each in a child process (``python -m pipelines.jobs exec ID``), so a crash in training cannot take the runner
  down;
* the child reports progress, log lines and the outcome back through the same store.

Crash safety (kill -9 of the runner, its child, or both, at any point):

* every state change is one SQLite transaction (WAL; synchronous=FULL for state changes, NORMAL for progress and
  log lines, which is still safe against kill -9 and only risks the last progress lines on power loss);
* the job function (``pipelines.retrain.retrain``) publishes and promotes through the adapter registry, which stages
  and commits atomically, so a killed job leaves no visible partial adapter and the champion unchanged;
* the child asks the kernel to SIGKILL it when the runner dies (PR_SET_PDEATHSIG), so no training outlives it;
* a starting runner holds the lock, so every job still 'running' belongs to a dead runner: ``fail_orphans`` marks
  it failed (resubmit to retry). Queued jobs, schedules and labelled data are never touched by recovery.

One job runs at a time: training uses every core of the 2-core target machine, so jobs of different adapters run one
after another in submission order. At most one queued-or-running job per adapter (a partial UNIQUE index).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib
import json
import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.sqlite import connect, init_db, transaction

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

__all__ = [
    "ACTIVE_STATES",
    "COOLDOWN_ENV",
    "CRON_HELP",
    "DEFAULT_JOB_FN",
    "END_STATES",
    "LOG_MAX_CHARS",
    "MIN_LABELS_ENV",
    "ORPHAN_ERROR",
    "STATES",
    "STOPPED_ERROR",
    "TRIGGERS",
    "DriftPolicy",
    "DuplicateJobError",
    "DuplicateScheduleError",
    "Job",
    "JobError",
    "JobNotFoundError",
    "JobRunner",
    "JobStore",
    "RunnerLockedError",
    "Schedule",
    "ScheduleError",
    "ScheduleNotFoundError",
    "ScheduleStore",
    "UnknownAdapterJobError",
    "callable_path",
    "cron_trigger",
    "hold_runner_lock",
    "resolve_callable",
    "runner_pid",
]

log = logging.getLogger("adaptserve.jobs")

DB_FILE = "jobs.db"
LOCK_FILE = "runner.lock"
LOG_DIR = "job-logs"
TRIGGERS = ("manual", "schedule", "drift")
STATES = ("queued", "running", "succeeded", "rejected", "failed")
ACTIVE_STATES = ("queued", "running")
END_STATES = ("succeeded", "rejected", "failed")
DEFAULT_JOB_FN = "pipelines.retrain:retrain"
MIN_LABELS_ENV = "ADAPTSERVE_RETRAIN_MIN_LABELS"
COOLDOWN_ENV = "ADAPTSERVE_RETRAIN_COOLDOWN_S"
LOG_MAX_CHARS = 32_000
_KEPT = "; the champion was not changed"
ORPHAN_ERROR = f"job runner died (killed or crashed) while this job ran{_KEPT}"
STOPPED_ERROR = f"job runner was stopped while this job ran{_KEPT}"
CRON_HELP = "use 5 fields: minute hour day month weekday, e.g. '0 3 * * *'"
CRON_TIMEZONE = UTC  # schedules are in UTC: servers rarely agree on a local zone
_OUTCOMES = {"promoted": "succeeded", "rejected": "rejected"}
_FINISH_MESSAGES = {"succeeded": "challenger promoted", "rejected": "challenger rejected; champion kept"}
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_PR_SET_PDEATHSIG = 1
_MAX_LISTED = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    adapter TEXT NOT NULL,
    trigger TEXT NOT NULL CHECK (trigger IN ('manual', 'schedule', 'drift')),
    reason TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'rejected', 'failed')),
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result TEXT,
    error TEXT,
    log TEXT NOT NULL DEFAULT '',
    runner_pid INTEGER,
    runner_id TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active_per_adapter ON jobs (adapter) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_adapter ON jobs (adapter, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
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
_JOB_COLUMNS = (
    "id, adapter, trigger, reason, state, progress, message, created_at, started_at, finished_at, result, error, log, "
    "runner_pid, runner_id"
)
_SCHEDULE_COLUMNS = "id, adapter, cron, created_at, last_run_at, next_run_at"


# --------------------------------------------------------------------------------------------- errors


class JobError(Exception):
    """Base class so callers (HTTP routes, CLI) can catch every job/schedule refusal with one except clause.

    `status_code` is the HTTP status a service answers with (service/errors.py reads it)."""

    status_code = 400


class UnknownAdapterJobError(JobError, LookupError):
    """A job or schedule named an adapter the registry does not hold (HTTP 404)."""

    status_code = 404


class DuplicateJobError(JobError):
    """The adapter already has a queued or running job (HTTP 409); ``existing_id`` names it."""

    status_code = 409

    def __init__(self, existing: Job) -> None:
        self.existing_id = existing.id
        self.existing = existing
        super().__init__(
            f"adapter {existing.adapter!r} already has a {existing.state} retrain job {existing.id} "
            f"(created {_iso(existing.created_at)}); one job per adapter at a time: follow it with "
            f"GET /jobs/{existing.id} or `adaptserve jobs show {existing.id}`"
        )


class JobNotFoundError(JobError, LookupError):
    """No job with that id (HTTP 404)."""

    status_code = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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


class RunnerLockedError(JobError):
    """Another job runner already serves this home."""

    status_code = 409


# --------------------------------------------------------------------------------------------- helpers


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _shorten(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _bounded_log(text: str) -> str:
    """Keep the tail (where the error is) and say that the head was dropped."""
    if len(text) <= LOG_MAX_CHARS:
        return text
    tail = text[-LOG_MAX_CHARS:]
    tail = tail[tail.find("\n") + 1 :] if "\n" in tail[:-1] else tail
    return "[... earlier log lines dropped ...]\n" + tail


def _log_line(text: str) -> str:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    return f"{stamp} {text.rstrip()}\n"


def _env_number(name: str, default: float, cast: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return cast(default)
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not a valid {cast.__name__}; unset it or use e.g. {name}={default}"
        ) from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be >= 0")
    return value


def callable_path(fn: Callable[..., Any] | str) -> str:
    """'module:qualname' for a module-level function, so a child process can import the very same function."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise ValueError(f"job function {fn!r} must be given as 'module:function'")
        return fn
    path = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', '')}"
    try:
        importable = resolve_callable(path) is fn
    except (ImportError, AttributeError, ValueError):
        importable = False
    if not importable or path.startswith("__main__:"):
        raise ValueError(
            f"job function {fn!r} must be a module-level function the job process can import ('module:function')"
        )
    return path


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import 'module:qualname' (e.g. DEFAULT_JOB_FN)."""
    module, sep, qualname = path.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"job function {path!r} must be given as 'module:function'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


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
    from apscheduler.triggers.cron import CronTrigger

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
    nxt = trigger.get_next_fire_time(None, datetime.fromtimestamp(after, CRON_TIMEZONE))
    return None if nxt is None else nxt.timestamp()


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Job:
    """One retrain job; a snapshot as of the read that produced it. Times are epoch seconds (UTC)."""

    id: str
    adapter: str
    trigger: str
    reason: str
    state: str
    progress: float
    message: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: str | None
    log: str
    runner_pid: int | None
    runner_id: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self, *, include_log: bool = True, now: float | None = None) -> dict[str, Any]:
        """JSON-friendly: ISO times, plus queued_s / run_s durations (up to now while still waiting or running)."""
        now = time.time() if now is None else now
        end = self.finished_at if self.finished_at is not None else now
        waited_until = self.started_at if self.started_at is not None else end
        out: dict[str, Any] = {
            "id": self.id,
            "adapter": self.adapter,
            "trigger": self.trigger,
            "reason": self.reason,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "queued_s": round(max(0.0, waited_until - self.created_at), 3),
            "run_s": None if self.started_at is None else round(max(0.0, end - self.started_at), 3),
            "result": self.result,
            "error": self.error,
            "runner_pid": self.runner_pid,
        }
        if include_log:
            out["log"] = self.log
        return out


def _job(row: tuple[Any, ...]) -> Job:
    values = list(row)
    values[10] = None if values[10] is None else json.loads(values[10])
    return Job(*values)


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
            "created_at": _iso(self.created_at),
            "last_run_at": _iso(self.last_run_at),
            "next_run_at": _iso(self.next_run_at),
        }


# --------------------------------------------------------------------------------------------- database


KnownAdapters = Iterable[str] | Callable[[], Iterable[str]] | None


class _Database:
    """``<home>/jobs.db`` (WAL); a fresh connection per operation, so safe across threads and
    processes; writes use BEGIN IMMEDIATE so concurrent writers queue instead of failing on lock upgrade."""

    def __init__(self, home: str | Path, *, known_adapters: KnownAdapters = None, timeout: float = 30.0) -> None:
        self.home = Path(home).expanduser().absolute()
        self.db_path = self.home / DB_FILE
        self._known = known_adapters
        self._timeout = timeout
        init_db(self.db_path, _SCHEMA, timeout)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with closing(connect(self.db_path, self._timeout)) as conn:
            yield conn

    @contextmanager
    def _write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """durable=False for progress and heartbeats: FULL fsyncs every commit (~40 ms on a slow disk)."""
        with closing(connect(self.db_path, self._timeout, durable)) as conn, transaction(conn):
            yield conn

    def known_adapters(self) -> set[str]:
        """Adapter names jobs may target: the injected set, else every adapter in the registry at this home."""
        if self._known is None:
            from models.registry import open_registry

            return {info.name for info in open_registry(self.home).list_adapters()}
        return set(self._known() if callable(self._known) else self._known)

    def _check_adapter(self, adapter: str) -> None:
        known = self.known_adapters()
        if adapter not in known:
            raise UnknownAdapterJobError(
                f"unknown adapter {adapter!r}: it is not in the registry "
                f"(registered adapters: {_shorten(sorted(known))})"
            )


class JobStore(_Database):
    """The job queue and history; what HTTP routes and the CLI read and submit to."""

    def __repr__(self) -> str:
        return f"JobStore(home={str(self.home)!r})"

    def _get(self, conn: sqlite3.Connection, job_id: str) -> Job:
        row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"job {job_id!r} not found")
        return _job(row)

    def submit(self, adapter: str, trigger: str = "manual", reason: str = "") -> Job:
        """Queue a job; UnknownAdapterJobError, or DuplicateJobError if the adapter has a queued/running job."""
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}")
        self._check_adapter(adapter)
        job_id = uuid.uuid4().hex[:12]
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE adapter = ? AND state IN ('queued', 'running')", (adapter,)
            ).fetchone()
            if row is not None:
                raise DuplicateJobError(_job(row))
            conn.execute(
                "INSERT INTO jobs (id, adapter, trigger, reason, state, message, created_at, log) "
                "VALUES (?, ?, ?, ?, 'queued', 'waiting for the job runner', ?, ?)",
                (job_id, adapter, trigger, reason, time.time(), _log_line(f"queued ({trigger}) {reason}")),
            )
            job = self._get(conn, job_id)
        log.info("queued job %s for adapter %r (%s) %s", job_id, adapter, trigger, reason)
        return job

    def get(self, job_id: str) -> Job:
        with self._read() as conn:
            return self._get(conn, job_id)

    def list(self, adapter: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown job state {state!r}; expected one of {', '.join(STATES)}")
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be between 1 and 10000, got {limit}")
        where, args = [], []
        for column, value in (("adapter", adapter), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs {clause} ORDER BY created_at DESC, rowid DESC LIMIT ?"
        with self._read() as conn:
            return [_job(row) for row in conn.execute(sql, (*args, limit))]

    def claim_next(self, pid: int, runner_id: str | None = None) -> Job | None:
        """The oldest queued job, moved to running and stamped with the claiming runner; None if none is queued."""
        with self._write() as conn:
            sql = "SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1"
            row = conn.execute(sql).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, runner_pid = ?, runner_id = ?, message = ?, "
                "log = log || ? WHERE id = ?",
                (time.time(), pid, runner_id, "starting", _log_line(f"running (runner pid {pid})"), row[0]),
            )
            return self._get(conn, row[0])

    def progress(self, job_id: str, fraction: float, message: str = "", *, log_it: bool = False) -> bool:
        """Record progress of a running job (fraction clamped to 0..1); False if the job is no longer running."""
        if not math.isfinite(fraction):
            raise ValueError(f"progress fraction must be a finite number, got {fraction!r}")
        fraction = min(1.0, max(0.0, float(fraction)))
        with self._write(durable=False) as conn:
            cur = conn.execute(
                "UPDATE jobs SET progress = ?, message = ? WHERE id = ? AND state = 'running'",
                (fraction, message, job_id),
            )
            if log_it and cur.rowcount:
                self._append(conn, job_id, _log_line(f"{fraction:4.0%} {message}"))
            return cur.rowcount == 1

    def append_log(self, job_id: str, line: str) -> None:
        """Append a time-stamped line; the log keeps its last LOG_MAX_CHARS characters."""
        with self._write(durable=False) as conn:
            self._get(conn, job_id)
            self._append(conn, job_id, _log_line(line))

    @staticmethod
    def _append(conn: sqlite3.Connection, job_id: str, text: str) -> None:
        (current,) = conn.execute("SELECT log FROM jobs WHERE id = ?", (job_id,)).fetchone()
        conn.execute("UPDATE jobs SET log = ? WHERE id = ?", (_bounded_log(current + text), job_id))

    def finish(
        self, job_id: str, state: str, result: Mapping[str, Any] | None = None, error: str | None = None
    ) -> bool:
        """End a queued or running job; False (nothing changed) if it had already ended, e.g. failed as an orphan."""
        if state not in END_STATES:
            raise ValueError(f"a job ends {', '.join(END_STATES)}, not {state!r}")
        payload = None if result is None else json.dumps(dict(result), default=str, sort_keys=True)
        with self._write() as conn:
            self._get(conn, job_id)
            return self._finish(conn, job_id, state, payload, error)

    def _finish(
        self, conn: sqlite3.Connection, job_id: str, state: str, payload: str | None, error: str | None
    ) -> bool:
        first_line = (error or "").partition("\n")[0][:200]
        message = f"failed: {first_line}" if state == "failed" else _FINISH_MESSAGES[state]
        cur = conn.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, result = ?, error = ?, message = ?, "
            "progress = CASE WHEN ? = 'failed' THEN progress ELSE 1.0 END "
            "WHERE id = ? AND state IN ('queued', 'running')",
            (state, time.time(), payload, error, message, state, job_id),
        )
        if cur.rowcount:
            self._append(conn, job_id, _log_line(f"{state}" + (f": {error}" if error else "")))
        return cur.rowcount == 1

    def fail_orphans(self, runner_id: str | None = None) -> list[str]:
        """Fail running jobs whose runner is dead, or (given the id of the runner now holding the lock) that belong
        to any other runner; returns their ids. Safe to call while a live runner works: its jobs are kept."""
        with self._write() as conn:
            rows = conn.execute("SELECT id, runner_pid, runner_id FROM jobs WHERE state = 'running'").fetchall()
            orphans = [
                job_id
                for job_id, pid, owner in rows
                if (runner_id is not None and owner != runner_id) or not _pid_alive(pid)
            ]
            for job_id in orphans:
                self._finish(conn, job_id, "failed", None, ORPHAN_ERROR)
        for job_id in orphans:
            log.warning("job %s failed: %s", job_id, ORPHAN_ERROR)
        return orphans

    def counts(self) -> dict[tuple[str, str, str], int]:
        """{(adapter, trigger, state): number of jobs}, e.g. for a Prometheus collector."""
        with self._read() as conn:
            rows = conn.execute("SELECT adapter, trigger, state, COUNT(*) FROM jobs GROUP BY adapter, trigger, state")
            return {(a, t, s): n for a, t, s, n in rows}

    def latest(self, adapter: str, trigger: str | None = None) -> Job | None:
        """The most recently created job of the adapter (of that trigger, if given)."""
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE adapter = ? AND (? IS NULL OR trigger = ?)"
        with self._read() as conn:
            row = conn.execute(sql + " ORDER BY created_at DESC, rowid DESC LIMIT 1", (adapter, trigger, trigger))
            found = row.fetchone()
        return None if found is None else _job(found)

    def last_finished(self, adapter: str, states: Iterable[str] = END_STATES) -> Job | None:
        """The adapter's job that ended last, among those that ended in one of ``states``."""
        states = tuple(states)
        marks = ", ".join("?" * len(states))
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE adapter = ? AND finished_at IS NOT NULL AND state IN ({marks}) "
            "ORDER BY finished_at DESC LIMIT 1"
        )
        with self._read() as conn:
            row = conn.execute(sql, (adapter, *states)).fetchone()
        return None if row is None else _job(row)


class ScheduleStore(_Database):
    """Cron schedules (same jobs.db); the runner reloads them when ``generation()`` changes."""

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
            raise ScheduleNotFoundError(f"schedule {schedule_id!r} not found; existing schedules: {_shorten(ids)}")
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


# --------------------------------------------------------------------------------------------- drift policy


def _epoch(value: Any) -> float | None:
    """checked_at as epoch seconds, from an ISO string (naive = UTC) or a number."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    parsed = datetime.fromisoformat(str(value))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@dataclass
class DriftPolicy:
    """When drift starts a retrain job. ``evaluate`` returns the reason, or None to wait."""

    home: Path = field(metadata={"help": "ADAPTSERVE_HOME holding monitor.db, the labels and jobs.db"})
    min_labels: int = field(
        default_factory=lambda: _env_number(MIN_LABELS_ENV, 50, int),
        metadata={"help": f"new labels needed since the last finished retrain [env {MIN_LABELS_ENV}, default 50]"},
    )
    cooldown_s: float = field(
        default_factory=lambda: _env_number(COOLDOWN_ENV, 600.0, float),
        metadata={"help": f"seconds between two drift-started jobs of one adapter [env {COOLDOWN_ENV}, default 600]"},
    )
    latest_drift: Callable[[str], Mapping[str, Any] | None] | None = field(
        default=None, metadata={"help": "adapter -> latest drift check; default monitoring.monitor.DriftHistory"}
    )
    count_labels: Callable[[str, float | None], int] | None = field(
        default=None, metadata={"help": "(adapter, since) -> new labels; default pipelines.labels.LabelStore.count"}
    )
    jobs: JobStore | None = field(default=None, metadata={"help": "job history; default JobStore(home)"})
    clock: Callable[[], float] = field(default=time.time, metadata={"help": "epoch seconds now (tests fake it)"})

    def __post_init__(self) -> None:
        if self.min_labels < 0 or self.cooldown_s < 0:
            raise ValueError(
                f"min_labels and cooldown_s must be >= 0, got {self.min_labels} and {self.cooldown_s}; "
                "use 0 to start a job on every flagged drift check"
            )

    def _drift_reader(self) -> Callable[[str], Mapping[str, Any] | None]:
        if self.latest_drift is None:
            from monitoring.monitor import DriftHistory

            self.latest_drift = DriftHistory(self.home).latest
        return self.latest_drift

    def _label_counter(self) -> Callable[[str, float | None], int]:
        if self.count_labels is None:
            from pipelines.labels import LabelStore

            store = LabelStore(self.home)
            self.count_labels = lambda adapter, since: store.count(adapter, since=since)
        return self.count_labels

    def _job_store(self) -> JobStore:
        if self.jobs is None:
            self.jobs = JobStore(self.home)
        return self.jobs

    def evaluate(self, adapter: str) -> str | None:
        """Drift flagged by the latest check, AND >= min_labels labels since the last retrain that trained (succeeded
        or rejected; a failed one consumed nothing), AND cooldown_s since the last drift-started job. A check made
        before the last promotion judged the old champion, so it starts nothing."""
        check = self._drift_reader()(adapter)
        if not check or not check.get("drift"):
            return None
        jobs, now = self._job_store(), self.clock()
        last_drift_job = jobs.latest(adapter, trigger="drift")
        if last_drift_job is not None and now - last_drift_job.created_at < self.cooldown_s:
            return None
        trained = jobs.last_finished(adapter, states=("succeeded", "rejected"))
        since = None if trained is None else trained.finished_at
        checked_at = _epoch(check.get("checked_at"))
        if trained is not None and trained.state == "succeeded" and (checked_at or 0.0) < trained.finished_at:
            return None
        labels = self._label_counter()(adapter, since)
        if labels < self.min_labels:
            return None
        return (
            f"drift flagged by the check at {check.get('checked_at')} (score {check.get('score')}, threshold "
            f"{check.get('threshold')}); {labels} new labels (>= {self.min_labels})"
        )


# --------------------------------------------------------------------------------------------- runner lock


SUPERVISED_MARK = "supervised"


@dataclass(frozen=True)
class RunnerLockHolder:
    """What <home>/runner.lock says about the runner holding it: ``PID`` (started by hand) or
    ``PID supervised SUPERVISOR_PID`` (started by a serving worker's RunnerSupervisor, which was SUPERVISOR_PID)."""

    pid: int
    supervised: bool = False
    supervisor_pid: int | None = None

    def line(self) -> str:
        fields = [self.pid, SUPERVISED_MARK, self.supervisor_pid] if self.supervised else [self.pid]
        return " ".join(str(f) for f in fields if f is not None) + "\n"

    @classmethod
    def parse(cls, text: str) -> RunnerLockHolder | None:
        """The first line only (a reader may catch a rewrite halfway); None for anything but those two forms."""
        fields = text.partition("\n")[0].split()
        if not fields or not fields[0].isdigit():
            return None
        supervised = fields[1:2] == [SUPERVISED_MARK]
        supervisor = int(fields[2]) if supervised and len(fields) > 2 and fields[2].isdigit() else None
        return cls(int(fields[0]), supervised, supervisor)


def _read_holder(path: Path) -> RunnerLockHolder | None:
    try:
        return RunnerLockHolder.parse(path.read_text())
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    holder = _read_holder(path)
    return None if holder is None else holder.pid


@contextmanager
def hold_runner_lock(home: str | Path, wait_s: float = 2.0, supervised: bool = False) -> Iterator[Path]:
    """Exclusive flock on <home>/runner.lock for as long as the runner lives; the kernel drops it on kill -9.

    Waits up to ``wait_s`` so a momentary probe by ``runner_pid`` never makes a starting runner give up.
    ``supervised``: a RunnerSupervisor (our parent process) started this runner, and a service that adopts it may
    stop it; the lock file says so (see RunnerLockHolder)."""
    path = Path(home).expanduser().absolute() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(path)
                    raise RunnerLockedError(
                        f"another job runner (pid {holder if holder else 'unknown'}) is already running for "
                        f"{path.parent}: it holds {path}; run one runner per ADAPTSERVE_HOME"
                    ) from None
                time.sleep(0.05)
        holder = RunnerLockHolder(os.getpid(), supervised, os.getppid() if supervised else None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.line().encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def runner_pid(home: str | Path) -> int | None:
    """Pid of the job runner serving this home, or None if none runs (a shared-lock probe, held for microseconds)."""
    holder = runner_holder(home)
    return None if holder is None else holder.pid


def runner_holder(home: str | Path) -> RunnerLockHolder | None:
    """The job runner holding this home's lock (pid -1 while it has not written its line yet), or None."""
    path = Path(home).expanduser().absolute() / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path) or RunnerLockHolder(-1)
    else:
        return None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- runner


def _describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-rc).name}"
    return f"exited with status {rc}"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    """The parent's import path, so the child imports the same project and the same job function."""
    root = str(Path(__file__).resolve().parents[1])
    entries = dict.fromkeys([root, *(p for p in sys.path if p)])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(entries)}


class JobRunner:
    """Turns schedules and drift into jobs and runs queued jobs one at a time, each in a child process.

    ``job_fn`` ('module:function' or an importable module-level function) is called in the child as
    ``job_fn(home, adapter, base_dir=..., progress=callback)`` and returns something with ``status`` 'promoted' or
    'rejected' (and ``to_dict()``) or raises; default ``pipelines.retrain:retrain``. ``policy_interval_s=None``
    turns drift-started jobs off; ``known_adapters`` replaces the registry lookup (tests); ``lock_wait_s`` is how
    long a second runner waits for the lock before RunnerLockedError; ``supervised`` marks a runner started by a
    service's RunnerSupervisor in the lock file, so the service that finds it there stops it with itself.
    """

    def __init__(
        self,
        home: str | Path,
        base_dir: str | Path | None = None,
        poll_s: float = 1.0,
        job_fn: Callable[..., Any] | str | None = None,
        policy: DriftPolicy | None = None,
        policy_interval_s: float | None = 10.0,
        known_adapters: KnownAdapters = None,
        lock_wait_s: float = 2.0,
        supervised: bool = False,
    ) -> None:
        self.home = Path(home).expanduser().absolute()
        self.lock_wait_s = lock_wait_s
        self.supervised = supervised
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.poll_s = poll_s
        self.job_fn = DEFAULT_JOB_FN if job_fn is None else callable_path(job_fn)
        self.jobs = JobStore(self.home, known_adapters=known_adapters)
        self.schedules = ScheduleStore(self.home, known_adapters=known_adapters)
        self.policy = policy
        self.policy_interval_s = policy_interval_s
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.scheduler: BackgroundScheduler | None = None
        self._stop = threading.Event()
        self._schedules_gen: int | None = None
        self._next_policy_at = 0.0
        self._warned: set[str] = set()
        self._housekeeping = False  # schedules and drift checks run between and during jobs in run_forever only

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Ask run_forever to return; a job still running is terminated and marked failed (champion unchanged)."""
        self._stop.set()

    @contextmanager
    def _session(self, scheduler: bool) -> Iterator[None]:
        with hold_runner_lock(self.home, self.lock_wait_s, supervised=self.supervised):
            failed = self.jobs.fail_orphans(self.runner_id)
            if failed:
                log.warning("marked %d job(s) of a dead runner failed: %s", len(failed), ", ".join(failed))
            try:
                if scheduler:
                    self._start_scheduler()
                    self._housekeeping = True
                yield
            finally:
                self._housekeeping = False
                if self.scheduler is not None:
                    self.scheduler.shutdown(wait=False)
                    self.scheduler = None

    def run_forever(self) -> None:
        """Serve until stop(); RunnerLockedError (after lock_wait_s) if another runner holds this home."""
        with self._session(scheduler=True):
            log.info("job runner %s serving %s (job function %s)", self.runner_id, self.home, self.job_fn)
            while not self._stop.is_set():
                self._tick()
                if self.run_next() is None:
                    self._stop.wait(self.poll_s)

    def run_pending(self) -> list[Job]:
        """Run the queued jobs one after another, then return them (no schedules, no drift checks)."""
        done: list[Job] = []
        with self._session(scheduler=False):
            while not self._stop.is_set() and (job := self.run_next()) is not None:
                done.append(job)
        return done

    def _tick(self) -> None:
        """Between jobs and while one runs: pick up schedule changes, evaluate drift when due."""
        try:
            if self.scheduler is not None:
                self.sync_schedules()
            if self.policy_interval_s is not None and time.monotonic() >= self._next_policy_at:
                self._next_policy_at = time.monotonic() + self.policy_interval_s
                self.check_drift()
        except Exception:  # a locked DB or a broken registry must not end the runner
            log.exception("job runner housekeeping failed; retrying on the next tick")

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # ---------------------------------------------------------------- schedules

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(
            timezone=CRON_TIMEZONE, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300}
        )
        self.scheduler.start()
        self.sync_schedules(catch_up=True)

    def sync_schedules(self, catch_up: bool = False) -> bool:
        """Mirror the schedules table into APScheduler if it changed; True if reloaded.

        ``catch_up`` (runner start): a schedule whose owed fire passed while no runner ran fires once right away."""
        assert self.scheduler is not None, "sync_schedules needs the scheduler (run_forever starts it)"
        generation = self.schedules.generation()  # read first: a change during the reload bumps it again
        if generation == self._schedules_gen:
            return False
        self._schedules_gen = generation
        self.scheduler.remove_all_jobs()
        now = time.time()
        for s in self.schedules.list():
            overdue = catch_up and s.next_run_at is not None and s.next_run_at <= now
            extra = {"next_run_time": datetime.now(CRON_TIMEZONE)} if overdue else {}
            self.scheduler.add_job(
                self.fire_schedule, cron_trigger(s.cron), args=[s.id], id=f"schedule-{s.id}", name=s.cron, **extra
            )
            if overdue:
                log.info("schedule %s (%s) missed a fire while no runner ran: firing now", s.id, s.adapter)
        return True

    def fire_schedule(self, schedule_id: int) -> Job | None:
        """What APScheduler calls: submit a 'schedule' job; a duplicate or vanished adapter is logged and skipped."""
        try:
            s = self.schedules.get(schedule_id)
        except ScheduleNotFoundError:
            return None  # deleted since the last reload
        job = None
        try:
            job = self.jobs.submit(s.adapter, "schedule", f"schedule {s.id} (cron '{s.cron}')")
        except (DuplicateJobError, UnknownAdapterJobError) as e:
            log.warning("schedule %s skipped: %s", s.id, e)
        self.schedules.mark_run(s.id, time.time())
        return job

    # ---------------------------------------------------------------- drift

    def check_drift(self) -> list[Job]:
        """Evaluate the drift policy for every registered adapter; submit a 'drift' job where it says so."""
        if self.policy is None:
            self.policy = DriftPolicy(self.home, jobs=self.jobs)
        started: list[Job] = []
        for adapter in sorted(self.jobs.known_adapters()):
            try:
                reason = self.policy.evaluate(adapter)
                if reason:
                    started.append(self.jobs.submit(adapter, "drift", reason))
            except DuplicateJobError:
                continue
            except ImportError as e:
                self._warn_once("import", "drift-started retraining is off: %s is not available (%s)", e.name, e)
                self.policy_interval_s = None
                break
            except Exception as e:
                self._warn_once(f"{adapter}:{e}", "drift policy for %r failed: %s", adapter, e)
        return started

    # ---------------------------------------------------------------- jobs

    def run_next(self) -> Job | None:
        """Claim the oldest queued job and run it to its end in a child process; None if nothing was queued."""
        job = self.jobs.claim_next(os.getpid(), self.runner_id)
        if job is None:
            return None
        log.info("job %s: retraining %r (%s)", job.id, job.adapter, job.trigger)
        final = self._execute(job)
        log.info("job %s: %s %s", final.id, final.state, final.error or "")
        return final

    def _command(self, job: Job) -> list[str]:
        cmd = [sys.executable, "-m", "pipelines.jobs", "exec", job.id, "--home", str(self.home)]
        cmd += ["--job-fn", self.job_fn, "--parent-pid", str(os.getpid())]
        return cmd + (["--base-dir", str(self.base_dir)] if self.base_dir is not None else [])

    def _execute(self, job: Job) -> Job:
        out_path = self.home / LOG_DIR / f"{job.id}.log"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "ab") as out:
            proc = subprocess.Popen(
                self._command(job), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env()
            )
        self.jobs.append_log(job.id, f"job process pid {proc.pid}: {self.job_fn} (output in {out_path})")
        stopped = False
        while True:
            try:
                rc = proc.wait(timeout=self.poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if self._stop.is_set() and not stopped:
                stopped = True
                self._terminate(proc)
            elif not stopped and self._housekeeping:
                self._tick()
        return self._settle(job, rc, out_path, stopped)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()

    def _settle(self, job: Job, rc: int, out_path: Path, stopped: bool) -> Job:
        """A child that died without reporting (signal, OOM kill, crash) leaves the job running: fail it here."""
        final = self.jobs.get(job.id)
        if final.state != "running":
            return final
        tail = _tail(out_path)
        if tail:
            self.jobs.append_log(job.id, f"job process output (last lines):\n{tail}")
        reason = STOPPED_ERROR if stopped else f"job process {_describe_exit(rc)} before reporting a result{_KEPT}"
        self.jobs.finish(job.id, "failed", error=reason)
        return self.jobs.get(job.id)


# --------------------------------------------------------------------------------------------- job process


class _Progress:
    """The progress callback handed to the job function; throttled so a per-batch call costs no I/O."""

    def __init__(self, store: JobStore, job_id: str, min_interval_s: float = 0.5) -> None:
        self.store, self.job_id, self.min_interval_s = store, job_id, min_interval_s
        self._last_write = -math.inf
        self._logged: str | None = None
        self._pending: tuple[float, str] | None = None

    def __call__(self, fraction: float, message: str = "") -> None:
        self._pending = (fraction, message)
        if fraction >= 1.0 or time.monotonic() - self._last_write >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        fraction, message = self._pending
        self._pending = None
        self._last_write = time.monotonic()
        log_it = bool(message) and message != self._logged
        self._logged = message if log_it else self._logged
        self.store.progress(self.job_id, fraction, message, log_it=log_it)


def _outcome(result: Any) -> tuple[str, dict[str, Any]]:
    status = result.get("status") if isinstance(result, Mapping) else getattr(result, "status", None)
    if hasattr(result, "to_dict"):
        payload = dict(result.to_dict())
    else:
        payload = dict(result) if isinstance(result, Mapping) else {"status": status}
    if status not in _OUTCOMES:
        raise ValueError(f"job function returned status {status!r}; expected 'promoted' or 'rejected'")
    return _OUTCOMES[status], payload


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the runner dies, so a killed runner leaves no training (and no late promote)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the runner died before the signal was armed
        os._exit(4)


def execute_job(home: Path, job_id: str, job_fn: str, base_dir: Path | None = None) -> int:
    """Body of the job process: run job_fn and record the outcome; the exit status is for the runner's log only."""
    store = JobStore(home)
    job = store.get(job_id)
    if job.state != "running":
        print(f"job {job_id} is {job.state}, not running: nothing to do", file=sys.stderr)
        return 3
    progress = _Progress(store, job_id)
    try:
        fn = resolve_callable(job_fn)
        result = fn(store.home, job.adapter, base_dir=base_dir, progress=progress)
        state, payload = _outcome(result)
    except BaseException as e:  # anything, even SystemExit, ends the job failed with its traceback in the log
        with contextlib.suppress(Exception):
            progress.flush()
        store.append_log(job_id, "".join(traceback.format_exception(e))[-4000:])
        store.finish(job_id, "failed", error=f"{type(e).__name__}: {e}")
        return 1
    progress.flush()
    if not store.finish(job_id, state, result=payload):
        print(f"job {job_id} had already ended; its {state} result was not recorded", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.jobs", description="retrain job process (internal)")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("exec", help="run one claimed job; started by the job runner")
    ex.add_argument("job_id")
    ex.add_argument("--home", type=Path, required=True)
    ex.add_argument("--job-fn", default=DEFAULT_JOB_FN)
    ex.add_argument("--parent-pid", type=int, required=True)
    ex.add_argument("--base-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return execute_job(args.home, args.job_id, args.job_fn, args.base_dir)


if __name__ == "__main__":
    from pipelines.jobs import main as _main  # the importable copy, so classes are not duplicated under __main__

    raise SystemExit(_main())
