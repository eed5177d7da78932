"""The job and schedule stores on the state database, on SQLite and PostgreSQL: revision 0002_jobs creates the tables
pipelines/jobs_tables.py declares; one active job per adapter holds under a race of two processes; claims are
exclusive (FOR UPDATE SKIP LOCKED) and leased; each cron tick fires once however many runners fire it; a legacy
<home>/jobs.db is imported once.

Run as a script, this file is the child process of the race test (it waits for a line on stdin first):
    python tests/test_jobs_db.py submit HOME ADAPTER   (JobStore.submit once: prints "queued ID" or "duplicate ID")
    python tests/test_jobs_db.py insert HOME ADAPTER   (an active row past submit's check: "inserted" or "refused")
    python tests/test_jobs_db.py die HOME ADAPTER      (queues a job inside a write, then SIGKILLs itself)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, inspect, select, update
from sqlalchemy.exc import IntegrityError

from models.db import metadata
from pipelines.jobs import LEASE_ERROR, ORPHAN_ERROR, DuplicateJobError, JobStore
from pipelines.jobs_tables import JOBS_LOCK, TABLES, jobs
from pipelines.runner import JobRunner
from pipelines.schedules import ScheduleStore, cron_trigger, latest_fire

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ("ok-a", "rej-b", "bad-c", "die-d", "slow-e")



@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home: Path, backend: str) -> JobStore:
    return JobStore(home, known_adapters=KNOWN)


def shared(store: JobStore) -> bool:
    return not store.database.is_sqlite


# ------------------------------------------------------------------------------------------------------ schema


def _mine(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return table is None or table.name in {t.name for t in TABLES}


def test_the_revision_creates_the_tables_as_declared(store: JobStore) -> None:
    with store.database.read() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _mine, "compare_type": True})
        assert compare_metadata(context, metadata) == []
        # alembic does not compare an index's WHERE: read the partial indexes back
        indexes = {i["name"]: i for i in inspect(conn).get_indexes("jobs")}
        dialect = conn.dialect.name
    assert "ix_jobs_one_active_per_adapter" not in indexes  # revision 0009 split it in two
    for state in ("queued", "running"):
        index = indexes[f"ix_jobs_one_{state}_per_adapter"]
        where = str(index["dialect_options"][f"{dialect}_where"])
        assert index["unique"] and index["column_names"] == ["adapter"]
        assert f"'{state}'" in where
        assert not any(f"'{s}'" in where for s in ("queued", "running", "succeeded", "rejected", "failed")
                       if s != state)


# ------------------------------------------------------------------------------------------ one active per adapter


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, *args], env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("role", ["submit", "insert"], ids=["through-submit", "past-submits-check"])
def test_one_active_job_per_adapter_holds_under_a_race_of_two_processes(store: JobStore, home: Path,
                                                                        role: str) -> None:
    children = [_child(role, str(home), "ok-a") for _ in range(2)]
    for child in children:  # both have opened the database: the two writes overlap
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outputs.append(out.strip())
    [job] = store.list()
    expected = [f"queued {job.id}", f"duplicate {job.id}"] if role == "submit" else ["inserted", "refused"]
    assert sorted(outputs) == sorted(expected)
    assert job.state == "queued"


def test_a_submit_killed_mid_write_leaves_nothing(store: JobStore, home: Path) -> None:
    child = _child("die", str(home), "ok-a")
    out, err = child.communicate("go\n", timeout=120)
    assert (child.returncode, out) == (-signal.SIGKILL, "ready\nqueued in the open transaction\n"), err
    assert store.list() == []
    began = time.monotonic()
    job = store.submit("ok-a")  # neither the dead writer's lock nor its uncommitted index entry is left
    assert store.list() == [job] and time.monotonic() - began < 5


# ------------------------------------------------------------------------------------------------- claims, leases


def test_claims_in_parallel_never_take_the_same_job(store: JobStore) -> None:
    submitted = [store.submit(adapter).id for adapter in KNOWN]
    claimed: list[tuple[str, str]] = []
    barrier = threading.Barrier(4)

    def claim(n: int) -> None:
        barrier.wait(10)
        while (job := store.claim_next(1000 + n, runner_id=f"r{n}")) is not None:
            claimed.append((job.id, f"r{n}"))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(job_id for job_id, _ in claimed) == sorted(submitted), "every job claimed exactly once"
    for job_id, owner in claimed:
        job = store.get(job_id)
        assert (job.state, job.runner_id, job.log.count("running (runner pid")) == ("running", owner, 1)


def test_a_claim_skips_the_job_another_claim_holds(store: JobStore) -> None:
    if not shared(store):
        pytest.skip("SQLite serializes every write: no claim runs beside another")
    first, second = store.submit("ok-a"), store.submit("rej-b")
    with store.database.write(lock="another-runner") as conn:
        conn.execute(select(jobs.c.id).where(jobs.c.id == first.id).with_for_update())  # that claim is mid-way
        began = time.monotonic()
        claimed = store.claim_next(7, runner_id="r2")
        took = time.monotonic() - began
    assert claimed is not None and claimed.id == second.id
    assert took < 5, f"the claim skipped the locked row instead of waiting for it ({took:.1f} s)"
    assert store.get(first.id).state == "queued"
    assert store.claim_next(7, runner_id="r2").id == first.id


def test_a_job_whose_lease_ran_out_ends_failed_on_the_next_claim(store: JobStore, caplog: pytest.LogCaptureFixture
                                                                 ) -> None:  # fmt: skip
    stale, kept = store.submit("ok-a"), store.submit("rej-b")
    stale_claim = store.claim_next(11, runner_id="gone", lease_s=1.0)
    kept_claim = store.claim_next(12, runner_id="alive", lease_s=1.0)
    assert (stale_claim.id, kept_claim.id) == (stale.id, kept.id)
    assert stale_claim.started_at + 1.0 == pytest.approx(stale_claim.lease_until)
    assert store.heartbeat(kept.id, "alive", 60) is True
    assert store.get(kept.id).lease_until > time.time() + 50
    assert store.heartbeat(kept.id, "someone-else", 60) is False, "only the holder renews"
    waiting = store.submit("die-d")
    time.sleep(1.2)

    with caplog.at_level(logging.WARNING, logger="adaptserve.jobs"):
        claimed = store.claim_next(13, runner_id="next")

    assert claimed is not None and claimed.id == waiting.id
    failed = store.get(stale.id)
    assert (failed.state, failed.error, failed.runner_id, failed.progress) == ("failed", LEASE_ERROR, "gone", 0.0)
    assert failed.finished_at >= stale_claim.lease_until
    assert failed.log.rstrip().endswith(f"failed: {LEASE_ERROR}")
    assert LEASE_ERROR == ("job runner stopped renewing its lease (killed, crashed or cut off from the database) "
                           "while this job ran; the champion was not changed")
    assert caplog.messages == [f"job {stale.id} failed: {LEASE_ERROR}"]
    assert store.get(kept.id).state == "running", "a renewed lease holds"
    assert store.heartbeat(stale.id, "gone", 60) is False, "a lost lease is not renewed"
    assert store.finish(stale.id, "succeeded") is False, "nor does a late result overwrite the failure"


def test_a_runner_on_another_host_is_judged_by_its_lease_only(store: JobStore) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job = store.submit("ok-a")
    store.claim_next(dead.pid, runner_id="far", lease_s=60)
    with store.database.write() as conn:  # as if a runner on another machine had claimed it
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(runner_host="another-host"))
    assert store.fail_orphans() == [] and store.fail_orphans(runner_id="new") == [], "its pid means nothing here"
    with store.database.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(lease_until=time.time() - 1))
    assert store.fail_orphans(runner_id="new") == [job.id]
    assert store.get(job.id).error == LEASE_ERROR


# ------------------------------------------------------------------------------------------------------ cron ticks


def _at(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()


LATEST_FIRES = [
    pytest.param("*/5 * * * *", _at(2024, 1, 1, 10, 7, 30), _at(2024, 1, 1, 10, 5), id="between-ticks"),
    pytest.param("*/5 * * * *", _at(2024, 1, 1, 10, 5), _at(2024, 1, 1, 10, 5), id="on-a-tick"),
    pytest.param("0 3 * * *", _at(2024, 1, 6, 2), _at(2024, 1, 5, 3), id="yesterday"),
    pytest.param("* 0-1 * * *", _at(2024, 1, 1, 23), _at(2024, 1, 1, 1, 59), id="dense-then-quiet"),
    pytest.param("0 3 31 12 *", _at(2024, 6, 1), None, id="none-since-it-began"),
]


@pytest.mark.parametrize(("cron", "at", "expected"), LATEST_FIRES)
def test_latest_fire_is_the_tick_a_fire_belongs_to(cron: str, at: float, expected: float | None) -> None:
    assert latest_fire(cron_trigger(cron), at, not_before=_at(2024, 1, 1)) == expected


def test_a_cron_tick_fired_by_two_runners_queues_one_job(store: JobStore, home: Path, tmp_path: Path) -> None:
    homes = [tmp_path / "runner-a", tmp_path / "runner-b"] if shared(store) else [home, home]
    schedule = ScheduleStore(homes[0], known_adapters=KNOWN).add("ok-a", "*/5 * * * *")
    tick = schedule.next_run_at
    runners = [JobRunner(h, job_fn="jobs_crash_helper:fake_retrain", known_adapters=KNOWN, policy_interval_s=None)
               for h in homes]
    fired: list[Any] = []
    barrier = threading.Barrier(2)

    def fire(runner: JobRunner, late_s: float) -> None:
        barrier.wait(10)
        fired.append(runner.fire_schedule(schedule.id, now=tick + late_s))

    threads = [threading.Thread(target=fire, args=pair) for pair in zip(runners, (0.2, 0.4), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    [job] = [j for j in fired if j is not None]
    assert fired.count(None) == 1, "the other runner found the tick taken"
    assert store.list() == [job] and (job.trigger, job.reason) == ("schedule", "schedule 1 (cron '*/5 * * * *')")
    after = runners[1].schedules.get(schedule.id)
    assert (after.last_tick, after.next_run_at) == (tick, tick + 300)
    assert after.last_run_at in (tick + 0.2, tick + 0.4)
    store.finish(job.id, "succeeded")
    assert runners[1].fire_schedule(schedule.id, now=tick + 30) is None, "a late fire of the same tick"
    following = runners[1].fire_schedule(schedule.id, now=tick + 300.5)
    assert following is not None and [j.id for j in store.list()] == [following.id, job.id]


# ------------------------------------------------------------------------------------------------- legacy jobs.db

OLD_SCHEMA = """
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
OLD_JOBS = [  # rowid order; created_at deliberately out of order: seq keeps the rowid order
    ("j-done", "ok-a", "manual", "by hand", "succeeded", 1.0, "challenger promoted", 1000.0, 1001.0, 1010.0,
     json.dumps({"status": "promoted", "version": 2}), None, "queued\nsucceeded\n", 4242, "old-runner"),
    ("j-running", "rej-b", "schedule", "schedule 1", "running", 0.5, "training", 1020.0, 1021.0, None, None, None,
     "queued\nrunning\n", 4243, "old-runner"),
    ("j-queued", "bad-c", "drift", "drift flagged", "queued", 0.0, "waiting for the job runner", 1020.0, None, None,
     None, None, "queued\n", None, None),
]
OLD_SCHEDULES = [(1, "ok-a", "0 3 * * *", 900.0, 950.0, 90000.0), (3, "rej-b", "*/5 * * * *", 901.0, None, 1200.0)]


def make_legacy(home: Path, jobs_rows: list[tuple[Any, ...]] = OLD_JOBS,
                schedule_rows: list[tuple[Any, ...]] = OLD_SCHEDULES) -> Path:
    """<home>/jobs.db as an older adaptserve left it (its own CREATE statements, WAL mode)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "jobs.db"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(OLD_SCHEMA)
        conn.executemany(f"INSERT INTO jobs VALUES ({', '.join('?' * 15)})", jobs_rows)
        conn.executemany("INSERT INTO schedules VALUES (?, ?, ?, ?, ?, ?)", schedule_rows)
    return path


def test_a_legacy_jobs_db_is_imported_once(home: Path, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    legacy = make_legacy(home)
    with caplog.at_level(logging.INFO, logger="adaptserve.jobs"):
        store = JobStore(home, known_adapters=KNOWN)
    [line] = [m for m in caplog.messages if m.startswith("imported ")]
    assert line.startswith(f"imported 3 job(s) and 2 schedule(s) from {legacy} into ")
    assert line.endswith("; the file is now jobs.db.imported")
    assert not legacy.exists() and (home / "jobs.db.imported").is_file()

    assert [j.id for j in store.list()] == ["j-queued", "j-running", "j-done"], "same times, then the old rowid order"
    done = store.get("j-done")
    assert (done.state, done.result, done.log, done.runner_pid, done.runner_id, done.finished_at) == (
        "succeeded", {"status": "promoted", "version": 2}, "queued\nsucceeded\n", 4242, "old-runner", 1010.0)
    schedules = ScheduleStore(home, known_adapters=KNOWN)
    assert [(s.id, s.adapter, s.cron, s.created_at, s.last_run_at, s.next_run_at) for s in schedules.list()] == [
        (1, "ok-a", "0 3 * * *", 900.0, 950.0, 90000.0), (3, "rej-b", "*/5 * * * *", 901.0, None, 1200.0)]
    assert schedules.generation() == 1, "running runners reload the imported schedules"
    assert schedules.add("slow-e", "0 4 * * *").id == 4, "ids are never reused, nor do they clash"

    shutil.copy(home / "jobs.db.imported", legacy)  # as if killed between the commit and the rename
    reopened = JobStore(home, known_adapters=KNOWN)
    assert len(reopened.list()) == 3 and len(schedules.list()) == 3 and not legacy.exists(), "nothing twice"

    assert reopened.fail_orphans(runner_id="the next runner of this home") == ["j-running"]
    assert reopened.get("j-running").error == ORPHAN_ERROR
    assert reopened.claim_next(7, runner_id="r").id == "j-queued"
    with pytest.raises(DuplicateJobError):
        reopened.submit("bad-c", "drift")  # the imported job runs: the policy adds none behind it


def test_a_legacy_row_that_cannot_be_active_or_is_there_already(home: Path, backend: str) -> None:
    store = JobStore(home, known_adapters=KNOWN)  # the home already uses the state database...
    active = store.submit("rej-b")
    ScheduleStore(home, known_adapters=KNOWN).add("ok-a", "0 3 * * *")  # gets id 1
    legacy = make_legacy(home, schedule_rows=[(1, "ok-a", "0 3 * * *", 900.0, None, None),  # ... and a jobs.db
                                              (2, "ok-a", "0 5 * * *", 900.0, None, None)])
    store = JobStore(home, known_adapters=KNOWN)  # this open imports it

    clash = store.get("j-running")
    assert (clash.state, clash.finished_at is not None) == ("failed", True)
    assert clash.error == (f"not carried over as running from {legacy}: the adapter already had an active job in "
                           "the state database")
    assert store.get(active.id).state == "queued" and store.get("j-queued").state == "queued"
    assert [(s.id, s.cron) for s in ScheduleStore(home, known_adapters=KNOWN).list()] == [
        (1, "0 3 * * *"), (2, "0 5 * * *")], "the same schedule is not doubled; a free id is kept"


def test_a_legacy_schedule_whose_id_is_taken_gets_a_new_one(home: Path, backend: str) -> None:
    ScheduleStore(home, known_adapters=KNOWN).add("ok-a", "0 3 * * *")
    make_legacy(home, jobs_rows=[], schedule_rows=[(1, "rej-b", "0 5 * * *", 900.0, None, None),
                                                   (2, "bad-c", "0 6 * * *", 900.0, None, None)])
    schedules = ScheduleStore(home, known_adapters=KNOWN)
    assert [(s.id, s.adapter) for s in schedules.list()] == [(1, "ok-a"), (2, "bad-c"), (3, "rej-b")]
    assert schedules.add("die-d", "0 7 * * *").id == 4


# ------------------------------------------------------------------------------------------------ child processes


def _main(argv: list[str]) -> int:
    role, home, adapter = argv
    store = JobStore(Path(home), known_adapters=[adapter])
    print("ready", flush=True)
    sys.stdin.readline()
    if role == "die":
        with store.database.write(lock=JOBS_LOCK) as conn:
            store.submit_in(conn, adapter, "manual", "")
            print("queued in the open transaction", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    if role == "submit":
        try:
            print(f"queued {store.submit(adapter).id}")
        except DuplicateJobError as err:
            print(f"duplicate {err.existing_id}")
        return 0
    try:  # a writer of its own lock: only the partial unique index stands between the two
        with store.database.write(lock=f"race-{os.getpid()}") as conn:
            conn.execute(insert(jobs).values(id=f"x{os.getpid()}", seq=os.getpid(), adapter=adapter, trigger="manual",
                                             reason="", state="queued", progress=0, message="", created_at=time.time(),
                                             log=""))
            time.sleep(0.3)  # keep the row uncommitted: the other insert waits on it, then is refused
        print("inserted")
    except IntegrityError:
        print("refused")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
