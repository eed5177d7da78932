"""The retrain job queue and history, in the state database (`models.state`), and the `Job` records it holds.

The service and the CLI only *submit* (`JobStore.submit`, a small write with no torch import), so serving workers
never train and predictions keep their latency; job runners (`pipelines.runner`: one per home, any number of homes
on one database) claim queued jobs, and the job process reports progress, log lines and the outcome back through
this store.

Invariants:

* every state change is one transaction (`models.db.Database.write`): durable for state changes, durable=False for
  progress, log lines and lease renewals, which is still safe against kill -9 and only risks the last of them on
  power loss;
* at most one queued and one running job per adapter (partial unique indexes, so the database refuses more too),
  and a queued job is claimed only once its adapter's running job ended: a manual retrain asked for while the
  policy's job runs waits behind it (`submit_in`);
* a claim is exclusive: on PostgreSQL `claim_next` takes the oldest queued row with SELECT ... FOR UPDATE SKIP
  LOCKED, so runners claiming at once neither wait for one another nor get the same job; on SQLite every write is
  serialized, which is enough;
* a running job stays its runner's while the runner renews its lease (`heartbeat`, every third of
  ADAPTSERVE_JOB_LEASE_S). A job whose runner died ends **failed**, never retried (resubmit to retry; a job that
  killed its runner, e.g. out of memory, would kill the next one too), and the champion is unchanged:
  at once (ORPHAN_ERROR) when its runner ran on this host and its pid is gone, or when the next runner of the same
  home takes that home's runner lock (`fail_orphans`); otherwise by any runner once the lease has run out
  (LEASE_ERROR: `claim_next` resolves expired leases before it claims);
* a job ends once: `finish` only moves a queued or running job, so a late result never overwrites an orphan's
  failure;
* the log keeps its last LOG_MAX_CHARS characters (the tail is where the error is).

`JobsDatabase` is what both stores of jobs share (`JobStore` here, `ScheduleStore` in `pipelines.schedules`): the
state database of a home, the one-time import of a legacy `<home>/jobs.db` (`pipelines.jobs_legacy`) and the check
that an adapter exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ColumnElement

from models import settings
from models.db import Database
from models.registry import open_registry
from models.state import open_state
from pipelines.jobs_legacy import import_legacy
from pipelines.jobs_tables import ACTIVE_STATES, END_STATES, JOBS_LOCK, STATES, TRIGGERS, jobs

log = logging.getLogger("adaptserve.jobs")

LOG_MAX_CHARS = 32_000
CHAMPION_KEPT = "; the champion was not changed"
ORPHAN_ERROR = f"job runner died (killed or crashed) while this job ran{CHAMPION_KEPT}"
LEASE_ERROR = (f"job runner stopped renewing its lease (killed, crashed or cut off from the database) while this job "
               f"ran{CHAMPION_KEPT}")
HOST = socket.gethostname()  # runners on one host share one pid namespace: a pid is checked only where it ran
_FINISH_MESSAGES = {"succeeded": "challenger promoted", "rejected": "challenger rejected; champion kept"}
_MAX_LISTED = 20


# --------------------------------------------------------------------------------------------- errors


class JobError(Exception):
    """Base class so callers (HTTP routes, CLI) can catch every job/schedule refusal with one except clause.

    `status_code` is the HTTP status a service answers with (service/errors.py reads it)."""

    status_code = 400


class UnknownAdapterJobError(JobError, LookupError):
    """A job or schedule named an adapter the registry does not hold (HTTP 404)."""

    status_code = 404


class DuplicateJobError(JobError):
    """The adapter's job cannot be added (HTTP 409; JobStore.submit_in says when); ``existing_id`` names the one
    there is."""

    status_code = 409

    def __init__(self, existing: Job) -> None:
        self.existing_id = existing.id
        self.existing = existing
        super().__init__(
            f"adapter {existing.adapter!r} already has a {existing.state} retrain job {existing.id} "
            f"(created {iso_time(existing.created_at)}, {existing.trigger}); it trains on every label there is when "
            f"it starts: follow it with GET /jobs/{existing.id} or `adaptserve jobs show {existing.id}`"
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
    """One retrain job; a snapshot as of the read that produced it. Times are epoch seconds (UTC).

    `lease_until` (running jobs: until when the claiming runner's lease holds) is not part of equality: heartbeats
    move it every few seconds while the job itself stays the same."""

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
    lease_until: float | None = field(default=None, compare=False)

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


_JOB_COLUMNS = (
    jobs.c.id, jobs.c.adapter, jobs.c.trigger, jobs.c.reason, jobs.c.state, jobs.c.progress, jobs.c.message,
    jobs.c.created_at, jobs.c.started_at, jobs.c.finished_at, jobs.c.result, jobs.c.error, jobs.c.log,
    jobs.c.runner_pid, jobs.c.runner_id, jobs.c.lease_until,
)


def _job(row: Row[Any]) -> Job:
    values = list(row)
    values[10] = None if values[10] is None else json.loads(values[10])
    return Job(*values)


# --------------------------------------------------------------------------------------------- database


KnownAdapters = Iterable[str] | Callable[[], Iterable[str]] | None


class JobsDatabase:
    """The state database of a home (`models.state.open_state`: ADAPTSERVE_DATABASE_URL, else <home>/state.db),
    shared by the job and schedule stores; its pooled connections are safe across threads, and every process opens
    its own. Opening imports a legacy `<home>/jobs.db` once."""

    def __init__(self, home: str | Path, *, known_adapters: KnownAdapters = None) -> None:
        self.home = Path(home).expanduser().absolute()
        self._known = known_adapters
        self.database: Database = open_state(self.home)
        import_legacy(self.database, self.home, HOST)

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
    """The job queue and history; what HTTP routes and the CLI read and submit to, and what runners claim from."""

    def __repr__(self) -> str:
        return f"JobStore(home={str(self.home)!r})"

    @staticmethod
    def _get(conn: Connection, job_id: str) -> Job:
        row = conn.execute(select(*_JOB_COLUMNS).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFoundError(f"job {job_id!r} not found")
        return _job(row)

    @staticmethod
    def _active(conn: Connection, adapter: str) -> list[Job]:
        """The adapter's queued and running jobs (at most one of each), running first."""
        rows = conn.execute(select(*_JOB_COLUMNS).where(jobs.c.adapter == adapter, jobs.c.state.in_(ACTIVE_STATES)))
        return sorted((_job(r) for r in rows), key=lambda j: j.state != "running")

    def submit(self, adapter: str, trigger: str = "manual", reason: str = "") -> Job:
        """Queue a job; UnknownAdapterJobError, or DuplicateJobError when the adapter's job can be neither queued
        nor taken over (see submit_in)."""
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}; expected one of {', '.join(TRIGGERS)}")
        self._check_adapter(adapter)
        try:
            with self.database.write(lock=JOBS_LOCK) as conn:
                job = self.submit_in(conn, adapter, trigger, reason)
        except IntegrityError:
            # a writer that skipped the JOBS_LOCK check raced us: the partial unique index refused the second job
            with self.database.read() as conn:
                existing = self._active(conn, adapter)
            if not existing:
                raise
            raise DuplicateJobError(existing[-1]) from None
        log.info("queued job %s for adapter %r (%s) %s", job.id, adapter, trigger, reason)
        return job

    def submit_in(self, conn: Connection, adapter: str, trigger: str, reason: str) -> Job:
        """Queue a job inside the caller's write of JOBS_LOCK (a schedule's fire commits its tick with it). The
        adapter is not checked here.

        The policy and schedules start a job only when the adapter has none (DuplicateJobError otherwise). A manual
        job is what somebody asked for, so it is never refused for the policy's: while a job runs it is queued
        behind it (claimed once that one ended, on every label there is then), and a drift or schedule job still
        waiting in the queue becomes the manual one (same id, it had not started). Only a manual job already
        queued refuses another (DuplicateJobError): it will run on the same labels."""
        active = self._active(conn, adapter)
        queued = next((j for j in active if j.state == "queued"), None)
        if active and (trigger != "manual" or (queued is not None and queued.trigger == "manual")):
            raise DuplicateJobError(queued or active[0])
        if queued is not None:  # a policy or schedule job not started yet: the manual request takes it over
            note = f"superseded by a manual request ({reason}); was {queued.trigger}: {queued.reason}"
            conn.execute(update(jobs).where(jobs.c.id == queued.id).values(
                trigger="manual", reason=reason, message=f"waiting for the job runner (took over the queued "
                f"{queued.trigger} job)", log=jobs.c.log + _log_line(note)))
            return self._get(conn, queued.id)
        behind = f"queued behind running job {active[0].id}" if active else "waiting for the job runner"
        job_id = uuid.uuid4().hex[:12]
        seq = conn.execute(select(func.coalesce(func.max(jobs.c.seq), 0))).scalar_one() + 1
        conn.execute(insert(jobs).values(
            id=job_id, seq=seq, adapter=adapter, trigger=trigger, reason=reason, state="queued", progress=0.0,
            message=behind, created_at=time.time(),
            log=_log_line(f"queued ({trigger}) {reason}"),
        ))
        return self._get(conn, job_id)

    def get(self, job_id: str) -> Job:
        with self.database.read() as conn:
            return self._get(conn, job_id)

    def list(self, adapter: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown job state {state!r}; expected one of {', '.join(STATES)}")
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be between 1 and 10000, got {limit}")
        query = select(*_JOB_COLUMNS).order_by(jobs.c.created_at.desc(), jobs.c.seq.desc()).limit(limit)
        for column, value in ((jobs.c.adapter, adapter), (jobs.c.state, state)):
            if value is not None:
                query = query.where(column == value)
        with self.database.read() as conn:
            return [_job(row) for row in conn.execute(query)]

    def claim_next(self, pid: int, runner_id: str | None = None,
                   lease_s: float = settings.default("job_lease_s")) -> Job | None:
        """The oldest queued job whose adapter has no running job, moved to running, stamped with the claiming
        runner and leased to it for `lease_s`; None if there is none. Jobs whose lease ran out are failed first
        (LEASE_ERROR).

        Claims do not take JOBS_LOCK: on PostgreSQL the row lock of FOR UPDATE SKIP LOCKED is what keeps two claims
        apart (each runner's write lock is its own), so runners claim in parallel and never the same job."""

        def claim(conn: Connection) -> tuple[Job | None, list[str]]:
            now = time.time()
            expired = self._fail_expired(conn, now)
            running = jobs.alias("running")
            busy = select(running.c.id).where(running.c.adapter == jobs.c.adapter, running.c.state == "running")
            oldest = (select(jobs.c.id).where(jobs.c.state == "queued", ~busy.exists())  # one at a time per adapter
                      .order_by(jobs.c.created_at, jobs.c.seq))
            row = conn.execute(oldest.limit(1).with_for_update(skip_locked=True)).first()
            if row is None:
                return None, expired
            conn.execute(update(jobs).where(jobs.c.id == row.id).values(
                state="running", started_at=now, runner_pid=pid, runner_id=runner_id, runner_host=HOST,
                runner_home=str(self.home), lease_until=now + lease_s, message="starting",
                log=jobs.c.log + _log_line(f"running (runner pid {pid})"),
            ))
            return self._get(conn, row.id), expired

        job, expired = self.database.transact(claim, lock=f"{JOBS_LOCK}.claim.{runner_id or pid}")
        for job_id in expired:
            log.warning("job %s failed: %s", job_id, LEASE_ERROR)
        return job

    def heartbeat(self, job_id: str, runner_id: str | None, lease_s: float) -> bool:
        """Renew the lease of `runner_id` on its running job for `lease_s` from now; False when the job is no longer
        that runner's (it ended, or another runner failed it after the lease ran out): stop working on it."""
        with self.database.write(lock=JOBS_LOCK, durable=False) as conn:
            renewed = conn.execute(update(jobs).where(
                jobs.c.id == job_id, jobs.c.state == "running", jobs.c.runner_id == runner_id,
            ).values(lease_until=time.time() + lease_s))
            return renewed.rowcount == 1

    def progress(self, job_id: str, fraction: float, message: str = "", *, log_it: bool = False) -> bool:
        """Record progress of a running job (fraction clamped to 0..1); False if the job is no longer running."""
        if not math.isfinite(fraction):
            raise ValueError(f"progress fraction must be a finite number, got {fraction!r}")
        fraction = min(1.0, max(0.0, float(fraction)))
        with self.database.write(lock=JOBS_LOCK, durable=False) as conn:
            moved = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running").values(
                progress=fraction, message=message,
            )).rowcount
            if log_it and moved:
                self._append(conn, job_id, _log_line(f"{fraction:4.0%} {message}"))
            return moved == 1

    def append_log(self, job_id: str, line: str) -> None:
        """Append a time-stamped line; the log keeps its last LOG_MAX_CHARS characters."""
        with self.database.write(lock=JOBS_LOCK, durable=False) as conn:
            self._get(conn, job_id)
            self._append(conn, job_id, _log_line(line))

    @staticmethod
    def _append(conn: Connection, job_id: str, text: str) -> None:
        # FOR UPDATE: a claim (which holds no JOBS_LOCK) appending to the same row waits instead of being lost
        current = conn.execute(select(jobs.c.log).where(jobs.c.id == job_id).with_for_update()).scalar_one()
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(log=_bounded_log(current + text)))

    def finish(
        self, job_id: str, state: str, result: Mapping[str, Any] | None = None, error: str | None = None
    ) -> bool:
        """End a queued or running job; False (nothing changed) if it had already ended, e.g. failed as an orphan."""
        if state not in END_STATES:
            raise ValueError(f"a job ends {', '.join(END_STATES)}, not {state!r}")
        payload = None if result is None else json.dumps(dict(result), default=str, sort_keys=True)
        with self.database.write(lock=JOBS_LOCK) as conn:
            self._get(conn, job_id)
            return self._finish(conn, job_id, state, payload, error)

    @staticmethod
    def _finish(conn: Connection, job_id: str, state: str, payload: str | None, error: str | None,
                *, only_if: ColumnElement[bool] | None = None) -> bool:
        """Move an active job (and, given `only_if`, one that still meets it) to `state`; True if it moved."""
        first_line = (error or "").partition("\n")[0][:200]
        message = f"failed: {first_line}" if state == "failed" else _FINISH_MESSAGES[state]
        where = [jobs.c.id == job_id, jobs.c.state.in_(ACTIVE_STATES)] + ([only_if] if only_if is not None else [])
        moved = conn.execute(update(jobs).where(*where).values(
            state=state, finished_at=time.time(), result=payload, error=error, message=message,
            progress=jobs.c.progress if state == "failed" else 1.0,
        )).rowcount
        if moved:
            JobStore._append(conn, job_id, _log_line(f"{state}" + (f": {error}" if error else "")))
        return moved == 1

    def _fail_expired(self, conn: Connection, now: float) -> list[str]:
        """Fail running jobs whose lease ran out before `now`; a heartbeat committed meanwhile wins (the update
        re-checks the lease)."""
        expired = jobs.c.lease_until < now
        rows = conn.execute(select(jobs.c.id).where(jobs.c.state == "running", expired).order_by(jobs.c.seq))
        return [job_id for (job_id,) in rows.all() if self._finish(conn, job_id, "failed", None, LEASE_ERROR,
                                                                    only_if=expired)]

    def fail_orphans(self, runner_id: str | None = None) -> list[str]:
        """Fail running jobs whose runner is gone; returns their ids. Safe to call while live runners work: their
        jobs are kept. Gone means: it ran on this host and its pid is dead, or (given the id of the runner now
        holding this home's runner lock) it is another runner of this home on this host, or its lease ran out."""
        now = time.time()
        columns = (jobs.c.id, jobs.c.runner_pid, jobs.c.runner_id, jobs.c.runner_host, jobs.c.runner_home)
        with self.database.write(lock=JOBS_LOCK) as conn:
            rows = conn.execute(select(*columns).where(jobs.c.state == "running").order_by(jobs.c.seq)).all()
            orphans = [job_id for job_id, pid, owner, host, home in rows if host == HOST and (
                not _pid_alive(pid) or (runner_id is not None and owner != runner_id and home == str(self.home))
            )]
            for job_id in orphans:
                self._finish(conn, job_id, "failed", None, ORPHAN_ERROR)
            expired = self._fail_expired(conn, now)
        for job_id in orphans:
            log.warning("job %s failed: %s", job_id, ORPHAN_ERROR)
        for job_id in expired:
            log.warning("job %s failed: %s", job_id, LEASE_ERROR)
        return orphans + expired

    def counts(self) -> dict[tuple[str, str, str], int]:
        """{(adapter, trigger, state): number of jobs}, e.g. for a Prometheus collector."""
        groups = (jobs.c.adapter, jobs.c.trigger, jobs.c.state)
        with self.database.read() as conn:
            rows = conn.execute(select(*groups, func.count()).group_by(*groups))
            return {(a, t, s): n for a, t, s, n in rows}

    def latest(self, adapter: str, trigger: str | None = None) -> Job | None:
        """The most recently created job of the adapter (of that trigger, if given)."""
        query = select(*_JOB_COLUMNS).where(jobs.c.adapter == adapter)
        if trigger is not None:
            query = query.where(jobs.c.trigger == trigger)
        with self.database.read() as conn:
            found = conn.execute(query.order_by(jobs.c.created_at.desc(), jobs.c.seq.desc()).limit(1)).first()
        return None if found is None else _job(found)

    def last_finished(self, adapter: str, states: Iterable[str] = END_STATES) -> Job | None:
        """The adapter's job that ended last, among those that ended in one of ``states``."""
        query = select(*_JOB_COLUMNS).where(
            jobs.c.adapter == adapter, jobs.c.finished_at.is_not(None), jobs.c.state.in_(tuple(states)),
        ).order_by(jobs.c.finished_at.desc(), jobs.c.seq.desc()).limit(1)
        with self.database.read() as conn:
            found = conn.execute(query).first()
        return None if found is None else _job(found)
