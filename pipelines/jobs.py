"""The retrain job queue and history: ``<home>/jobs.db`` and the `Job` records it holds.

The service and the CLI only *submit* (`JobStore.submit`, a small SQLite write with no torch import), so serving
workers never train and predictions keep their latency; the job runner (`pipelines.runner`) claims queued jobs,
and the job process reports progress, log lines and the outcome back through this store.

Invariants:

* every state change is one SQLite transaction (WAL; synchronous=FULL for state changes, NORMAL for progress and
  log lines, which is still safe against kill -9 and only risks the last progress lines on power loss);
* at most one queued-or-running job per adapter (a partial UNIQUE index, so the database refuses it too);
* a job ends once: `finish` only moves a queued or running job, so a late result never overwrites an orphan's
  failure;
* the log keeps its last LOG_MAX_CHARS characters (the tail is where the error is).

`JobsDatabase` is the connection handling both stores of jobs.db share (`JobStore` here, `ScheduleStore` in
`pipelines.schedules`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from models.registry import open_registry
from models.sqlite import connect, init_db, transaction

log = logging.getLogger("adaptserve.jobs")

DB_FILE = "jobs.db"
TRIGGERS = ("manual", "schedule", "drift")
STATES = ("queued", "running", "succeeded", "rejected", "failed")
ACTIVE_STATES = ("queued", "running")
END_STATES = ("succeeded", "rejected", "failed")
LOG_MAX_CHARS = 32_000
CHAMPION_KEPT = "; the champion was not changed"
ORPHAN_ERROR = f"job runner died (killed or crashed) while this job ran{CHAMPION_KEPT}"
_FINISH_MESSAGES = {"succeeded": "challenger promoted", "rejected": "challenger rejected; champion kept"}
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
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at)
"""
_JOB_COLUMNS = (
    "id, adapter, trigger, reason, state, progress, message, created_at, started_at, finished_at, result, error, log, "
    "runner_pid, runner_id"
)


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
            f"(created {iso_time(existing.created_at)}); one job per adapter at a time: follow it with "
            f"GET /jobs/{existing.id} or `adaptserve jobs show {existing.id}`"
        )


class JobNotFoundError(JobError, LookupError):
    """No job with that id (HTTP 404)."""

    status_code = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------- helpers


def iso_time(t: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC string with milliseconds (None stays None): how job times are shown."""
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def short_list(items: Iterable[Any]) -> str:
    """The first _MAX_LISTED items as a list literal, then how many more: error messages stay one readable line."""
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
            "created_at": iso_time(self.created_at),
            "started_at": iso_time(self.started_at),
            "finished_at": iso_time(self.finished_at),
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


# --------------------------------------------------------------------------------------------- database


KnownAdapters = Iterable[str] | Callable[[], Iterable[str]] | None


class JobsDatabase:
    """``<home>/jobs.db`` (WAL); a fresh connection per operation, so safe across threads and
    processes; writes use BEGIN IMMEDIATE so concurrent writers queue instead of failing on lock upgrade.

    Each store of jobs.db declares its own tables in `_schema`, created when it opens the file."""

    _schema: ClassVar[str]

    def __init__(self, home: str | Path, *, known_adapters: KnownAdapters = None, timeout: float = 30.0) -> None:
        self.home = Path(home).expanduser().absolute()
        self.db_path = self.home / DB_FILE
        self._known = known_adapters
        self._timeout = timeout
        init_db(self.db_path, self._schema, timeout)

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
            return {info.name for info in open_registry(self.home).list_adapters()}
        return set(self._known() if callable(self._known) else self._known)

    def _check_adapter(self, adapter: str) -> None:
        known = self.known_adapters()
        if adapter not in known:
            raise UnknownAdapterJobError(
                f"unknown adapter {adapter!r}: it is not in the registry "
                f"(registered adapters: {short_list(sorted(known))})"
            )


class JobStore(JobsDatabase):
    """The job queue and history; what HTTP routes and the CLI read and submit to."""

    _schema = _SCHEMA

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
