"""Job runners of several homes sharing one PostgreSQL database (issue 13, "job runners anywhere"): real runner
processes (tests/jobs_crash_helper.py, fake retrain functions by adapter name) claim disjoint jobs; a runner killed
mid-job loses its lease, and another runner fails that job (failed, not retried: LEASE_ERROR) and carries on; a
runner whose job was failed that way stops the job process.

Only PostgreSQL: on the embedded SQLite default every home has a database of its own (tests/test_jobs.py runs a
runner there, its kill -9 included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jobs_crash_helper
import pytest
from jobs_crash_helper import SLOW_STARTED
from sqlalchemy import update

from models import migrations
from models.state import close_all
from pipelines.jobs import LEASE_ERROR, Job, JobStore
from pipelines.jobs_tables import jobs
from pipelines.runner_lock import runner_pid

HELPER = Path(jobs_crash_helper.__file__)
LEASE_S = 1.5
ADAPTERS = ("nap-1", "nap-2", "nap-3", "nap-4", "ok-a", "slow-e")


@pytest.fixture
def store(postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[JobStore]:
    """A store on the shared database (runner processes inherit the two settings)."""
    migrations.upgrade(postgres_url)
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", postgres_url)
    monkeypatch.setenv("ADAPTSERVE_JOB_LEASE_S", str(LEASE_S))
    yield JobStore(tmp_path / "submitter", known_adapters=ADAPTERS)
    close_all()


@pytest.fixture
def start_runner(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], Path]]]:
    """A runner process on a home of its own (holding its lock); killed with its process group at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> tuple[subprocess.Popen[bytes], Path]:
        home = tmp_path / name
        with open(tmp_path / f"{name}.out", "ab") as out:
            proc = subprocess.Popen([sys.executable, str(HELPER), str(home), "--adapters", ",".join(ADAPTERS)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        wait_for(lambda: runner_pid(home) == proc.pid, f"runner {name} to hold its home's lock")
        return proc, home

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    """A zombie (killed, not yet reaped) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ended(store: JobStore, job_id: str) -> Job | None:
    job = store.get(job_id)
    return None if job.active else job


def test_two_runners_on_two_homes_claim_disjoint_jobs(store: JobStore, start_runner: Callable[..., Any]) -> None:
    (a, _), (b, _) = start_runner("runner-a"), start_runner("runner-b")
    submitted = [store.submit(adapter).id for adapter in ADAPTERS[:4]]  # each naps 1 s: both runners get work
    done = [wait_for(lambda j=job_id: ended(store, j), f"job {job_id}", timeout=60) for job_id in submitted]
    assert [job.state for job in done] == ["succeeded"] * 4
    assert {job.runner_pid for job in done} == {a.pid, b.pid}, "both runners ran jobs"
    assert all(job.log.count("running (runner pid") == 1 for job in done), "and no job ran twice"


def test_a_killed_runners_job_fails_after_its_lease_and_another_runner_carries_on(
    store: JobStore, start_runner: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    a, home_a = start_runner("runner-a")
    slow = store.submit("slow-e")
    wait_for(lambda: store.get(slow.id).runner_pid == a.pid and (home_a / SLOW_STARTED).exists(), "the slow job")
    child = int((home_a / SLOW_STARTED).read_text())
    request.addfinalizer(lambda: alive(child) and os.kill(child, signal.SIGKILL))
    b, _ = start_runner("runner-b")  # a runner of another home, starting beside a live runner's job, leaves it be
    time.sleep(3 * LEASE_S)
    held = store.get(slow.id)
    assert held.state == "running" and held.lease_until > time.time(), "a live runner renews its lease"

    os.killpg(a.pid, signal.SIGKILL)
    assert a.wait(10) == -signal.SIGKILL
    killed_at = time.time()
    last_lease = store.get(slow.id).lease_until
    queued = store.submit("ok-a")

    failed = wait_for(lambda: ended(store, slow.id), "the other runner to fail the job", timeout=LEASE_S + 20)
    assert (failed.state, failed.error, failed.progress) == ("failed", LEASE_ERROR, 0.25)
    assert failed.finished_at >= last_lease, "not before the lease ran out"
    assert failed.finished_at - killed_at < LEASE_S + 10, "and soon after"
    ran = wait_for(lambda: ended(store, queued.id), "the other runner's next job")
    assert (ran.state, ran.runner_pid) == ("succeeded", b.pid)
    wait_for(lambda: not alive(child), "the killed runner's job process to die with it", timeout=10)


def test_a_runner_whose_job_was_failed_for_its_lease_stops_the_job_process(
    store: JobStore, start_runner: Callable[..., Any], request: pytest.FixtureRequest
) -> None:
    a, home_a = start_runner("runner-a")
    slow = store.submit("slow-e")
    wait_for(lambda: store.get(slow.id).runner_pid == a.pid and (home_a / SLOW_STARTED).exists(), "the slow job")
    child = int((home_a / SLOW_STARTED).read_text())
    request.addfinalizer(lambda: alive(child) and os.kill(child, signal.SIGKILL))
    with store.database.write() as conn:  # as if runner-a had been cut off from the database past its lease
        conn.execute(update(jobs).where(jobs.c.id == slow.id).values(lease_until=time.time() - 1))
    assert store.claim_next(os.getpid(), runner_id="elsewhere") is None  # nothing queued; the lapsed job is failed

    wait_for(lambda: not alive(child), "runner-a to stop the job process", timeout=LEASE_S + 15)
    assert store.get(slow.id).error == LEASE_ERROR, "the job process' end changes nothing"
    queued = store.submit("ok-a")
    ran = wait_for(lambda: ended(store, queued.id), "runner-a's next job")
    assert (ran.state, ran.runner_pid, a.poll()) == ("succeeded", a.pid, None)
