"""The one-time import of a legacy `<home>/jobs.db`: the SQLite file that held jobs and schedules before the state
database did.

On first open of a job or schedule store (`pipelines.jobs.JobsDatabase`) of a home that still has jobs.db, its rows
are copied into the state database in one write transaction (JOBS_LOCK), then the file is renamed
`jobs.db.imported` (its -wal and -shm too, if any are left). The copy skips what is already there (a job's id, a
schedule's adapter and cron), so two processes opening at once, or a process killed between the commit and the
rename, import nothing twice.

What is carried over:

* jobs keep their id, times, state, progress, log and result, in their old rowid order (`seq` continues after the
  jobs already in the database). A running job keeps its runner pid, is stamped with this home and host and gets no
  lease: the next runner of this home fails it as an orphan, as that runner would have before.
* an active job of an adapter that already has one (a database several homes share) cannot be active as well: it
  is imported failed, and its error says why.
* schedules keep their id unless another schedule has it (then the database numbers it); one whose adapter and cron
  already exist is skipped. The schedules generation moves, so running runners reload.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select, text

from models.db import Database, redact
from models.legacy import IMPORTED_SUFFIX, open_legacy, retire
from pipelines.jobs_tables import ACTIVE_STATES, JOBS_LOCK, bump_generation, jobs, schedules

log = logging.getLogger("adaptserve.jobs")

LEGACY_FILE = "jobs.db"
_CHUNK = 500  # ids per IN (...) query: well under SQLite's and PostgreSQL's bound-parameter limits
_JOB_FIELDS = ("id", "adapter", "trigger", "reason", "state", "progress", "message", "created_at", "started_at",
               "finished_at", "result", "error", "log", "runner_pid", "runner_id")
_SCHEDULE_FIELDS = ("adapter", "cron", "created_at", "last_run_at", "next_run_at")


def import_legacy(database: Database, home: Path, host: str) -> None:
    """Copy `<home>/jobs.db` into `database` once and rename it; a no-op (one stat) when the home has none."""
    path = home / LEGACY_FILE
    if not path.is_file():
        return
    with database.write(lock=JOBS_LOCK) as conn:
        if not path.is_file():  # another process imported it while this one waited for the lock
            return
        old_jobs, old_schedules = _read(path)
        copied_jobs = _copy_jobs(conn, old_jobs, path, host)
        copied_schedules = _copy_schedules(conn, old_schedules)
    retire(path)
    log.info("imported %d job(s) and %d schedule(s) from %s into %s; the file is now %s%s", copied_jobs,
             copied_schedules, path, redact(database.url), path.name, IMPORTED_SUFFIX)


def _read(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every job (rowid order) and schedule (id order) of the old file, as dicts of whatever columns it has."""
    with closing(open_legacy(path)) as old:
        old.row_factory = sqlite3.Row
        tables = {name for (name,) in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

        def rows(table: str, order: str) -> list[dict[str, Any]]:
            if table not in tables:
                return []
            return [dict(zip(row.keys(), row, strict=True)) for row in old.execute(f"SELECT * FROM {table} {order}")]

        return rows("jobs", "ORDER BY rowid"), rows("schedules", "ORDER BY id")


def _present_ids(conn: Connection, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        found.update(conn.scalars(select(jobs.c.id).where(jobs.c.id.in_(ids[start:start + _CHUNK]))))
    return found


def _copy_jobs(conn: Connection, rows: list[dict[str, Any]], source: Path, host: str) -> int:
    present = _present_ids(conn, [row["id"] for row in rows])
    active = set(conn.scalars(select(jobs.c.adapter).where(jobs.c.state.in_(ACTIVE_STATES))))
    seq = conn.execute(select(func.coalesce(func.max(jobs.c.seq), 0))).scalar_one()
    values = []
    for row in rows:
        if row["id"] in present:
            continue
        seq += 1
        # every record has the same keys: an executemany insert takes its columns from the first one
        record = {name: row.get(name) for name in _JOB_FIELDS} | {"seq": seq, "runner_host": None, "runner_home": None}
        for name, empty in (("reason", ""), ("progress", 0.0), ("message", ""), ("log", "")):
            record[name] = empty if record[name] is None else record[name]
        if record["state"] in ACTIVE_STATES and record["adapter"] in active:
            error = (f"not carried over as {record['state']} from {source}: the adapter already had an active job "
                     "in the state database")
            record |= {"state": "failed", "finished_at": time.time(), "error": error, "message": f"failed: {error}"}
        elif record["state"] in ACTIVE_STATES:
            active.add(record["adapter"])
        if record["state"] == "running":
            record |= {"runner_host": host, "runner_home": str(source.parent)}
        values.append(record)
    if values:
        conn.execute(insert(jobs), values)
    return len(values)


def _copy_schedules(conn: Connection, rows: list[dict[str, Any]]) -> int:
    existing = {(adapter, cron): sid for sid, adapter, cron in
                conn.execute(select(schedules.c.id, schedules.c.adapter, schedules.c.cron))}
    taken = set(existing.values())
    keep_id, renumber = [], []
    for row in rows:
        if (row["adapter"], row["cron"]) in existing:
            continue
        record = {name: row.get(name) for name in _SCHEDULE_FIELDS}
        if row["id"] in taken:
            renumber.append(record)
        else:
            taken.add(row["id"])
            keep_id.append(record | {"id": row["id"]})
    if keep_id:
        conn.execute(insert(schedules), keep_id)
        if conn.dialect.name == "postgresql":  # explicit ids do not move the id sequence; the next insert would clash
            conn.execute(text("SELECT setval(pg_get_serial_sequence('schedules', 'id'), "
                              "(SELECT max(id) FROM schedules))"))
    for record in renumber:
        conn.execute(insert(schedules).values(**record))
    if keep_id or renumber:
        bump_generation(conn)
    return len(keep_id) + len(renumber)

