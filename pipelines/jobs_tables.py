"""The tables of retrain jobs and cron schedules in the state database (`models.db.metadata`).

Revision 0002_jobs (models/migrations/versions) creates them exactly as declared here; tests/test_jobs_db.py checks
that the two agree on SQLite and PostgreSQL. Times are epoch seconds (UTC) as floats; `jobs.result` is JSON text.

Invariants the schema itself enforces, on both backends:

* at most one queued and one running job per adapter: the partial unique indexes `ix_jobs_one_queued_per_adapter`
  and `ix_jobs_one_running_per_adapter` (revision 0009_jobs_queue_behind; before it, one of either);
* `jobs.seq` numbers jobs in submission order (unique), the tie-break wherever jobs are ordered by time;
* one schedule per (adapter, cron); schedule ids are never reused (SQLite AUTOINCREMENT, a PostgreSQL sequence).
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    text,
    update,
)

from models.db import metadata

TRIGGERS = ("manual", "schedule", "drift")
STATES = ("queued", "running", "succeeded", "rejected", "failed")
ACTIVE_STATES = ("queued", "running")
END_STATES = ("succeeded", "rejected", "failed")
JOBS_LOCK = "jobs"  # the write lock (models.db) every job and schedule write takes, except claims (see jobs.py)
GENERATION_KEY = "schedules_generation"


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


_QUEUED, _RUNNING = text("state = 'queued'"), text("state = 'running'")

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("seq", Integer, nullable=False, unique=True),
    Column("adapter", Text, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("progress", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("result", Text),
    Column("error", Text),
    Column("log", Text, nullable=False),
    # who claimed a running job: its pid, id, host and home; the lease it must keep renewing (pipelines.runner)
    Column("runner_pid", Integer),
    Column("runner_id", Text),
    Column("runner_host", Text),
    Column("runner_home", Text),
    Column("lease_until", Float),
    CheckConstraint(_one_of("trigger", TRIGGERS), name="trigger"),
    CheckConstraint(_one_of("state", STATES), name="state"),
    Index("ix_jobs_one_queued_per_adapter", "adapter", unique=True, sqlite_where=_QUEUED, postgresql_where=_QUEUED),
    Index("ix_jobs_one_running_per_adapter", "adapter", unique=True, sqlite_where=_RUNNING,
          postgresql_where=_RUNNING),
    Index("ix_jobs_by_adapter", "adapter", "created_at"),
    Index("ix_jobs_by_state", "state", "created_at"),
)

schedules = Table(
    "schedules", metadata,
    Column("id", Integer, primary_key=True),
    Column("adapter", Text, nullable=False),
    Column("cron", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_run_at", Float),
    Column("next_run_at", Float),
    # the cron time of the last fire: a runner fires a tick only by moving this forward (pipelines.schedules)
    Column("last_tick", Float),
    UniqueConstraint("adapter", "cron"),
    sqlite_autoincrement=True,
)

# key -> integer; holds GENERATION_KEY, which every change of `schedules` bumps (runners reload on a change)
jobs_state = Table(
    "jobs_state", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Integer, nullable=False),
)

TABLES = (jobs, schedules, jobs_state)


def bump_generation(conn: Connection) -> None:
    """Move the schedules generation on, inside a write of JOBS_LOCK (which makes the read-then-insert safe)."""
    moved = conn.execute(update(jobs_state).where(jobs_state.c.key == GENERATION_KEY).values(
        value=jobs_state.c.value + 1))
    if not moved.rowcount:  # the revision inserts the row; a hand-made database may lack it
        conn.execute(insert(jobs_state).values(key=GENERATION_KEY, value=1))
