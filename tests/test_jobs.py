"""Tests for retrain jobs (pipelines.jobs, .schedules, .policy, .runner, .runner_lock): job lifecycle (including a
kill -9 of the runner), duplicate/unknown refusals, cron schedules that persist across restarts, the drift policy,
and the CLI.

Jobs run through the real runner path (a child process per job) with the fake retrain functions of
tests/jobs_crash_helper.py, which act by adapter name: ok-* promoted, rej-* rejected, bad-* raises, die-* SIGKILLs
its own job process, slow-* hangs mid-publish.

The store tests (the `store` and `schedules` fixtures) run on both backends: the embedded SQLite default and a
PostgreSQL server. Tests that run a real runner (child processes, run_forever threads) and the CLI tests stay on
the embedded SQLite (`EMBEDDED_ONLY`); tests/test_runner_scaleout.py runs runners on PostgreSQL.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jobs_crash_helper
import numpy as np
import pytest
from jobs_crash_helper import SLOW_STARTED, fake_retrain
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from typer import Typer
from typer.testing import CliRunner

from models import migrations, settings
from models.registry import Registry
from models.settings import SettingsError
from models.state import close_all
from pipelines.jobs import (
    LOG_MAX_CHARS,
    ORPHAN_ERROR,
    DuplicateJobError,
    Job,
    JobNotFoundError,
    JobStore,
    UnknownAdapterJobError,
)
from pipelines.jobs_cli import jobs_app, retrain_command, schedules_app
from pipelines.jobs_tables import jobs
from pipelines.policy import DriftPolicy
from pipelines.runner import DEFAULT_JOB_FN, STOPPED_ERROR, JobRunner, callable_path, resolve_callable
from pipelines.runner_lock import RunnerLockedError, RunnerLockHolder, runner_pid
from pipelines.schedules import (
    DuplicateScheduleError,
    ScheduleError,
    ScheduleNotFoundError,
    ScheduleStore,
    cron_trigger,
)

HELPER = Path(jobs_crash_helper.__file__)
KNOWN = ("ok-a", "rej-b", "bad-c", "die-d", "slow-e")
CRON_HELP = "use 5 fields: minute hour day month weekday, e.g. '0 3 * * *'"
RARE_CRON = "0 3 1 1 *"  # 03:00 UTC on January 1st: never fires by itself during a test
KILLED = "job process was killed by SIGKILL before reporting a result; the champion was not changed"
# runs a real runner (child processes or a run_forever thread): on the embedded SQLite default only
EMBEDDED_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"  # the same dir conftest points ADAPTSERVE_HOME at, so the CLI sees it too


@pytest.fixture(autouse=True)
def _close_databases() -> Iterator[None]:
    yield
    close_all()  # this test's engines (a PostgreSQL database per test) give their connections back


@pytest.fixture
def backend(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The state database of the test: sqlite leaves ADAPTSERVE_DATABASE_URL unset (the embedded <home>/state.db);
    postgresql points it at a fresh database, upgraded to head as `adaptserve db upgrade` would."""
    if make_url(db_url).get_backend_name() == "postgresql":
        migrations.upgrade(db_url)
        monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", db_url)
    return db_url


@pytest.fixture
def store(home: Path, backend: str) -> JobStore:
    return JobStore(home, known_adapters=KNOWN)


@pytest.fixture
def schedules(home: Path, backend: str) -> ScheduleStore:
    return ScheduleStore(home, known_adapters=KNOWN)


def make_runner(home: Path, **kwargs: Any) -> JobRunner:
    options: dict[str, Any] = {"job_fn": fake_retrain, "known_adapters": KNOWN, "poll_s": 0.05}
    return JobRunner(home, **{**options, "policy_interval_s": None, **kwargs})


@pytest.fixture
def registry(home: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Registry:
    """A real registry holding ok-a and slow-e, version 1 of each the champion (no torch needed), on the test's
    state database (the registry's rows live there too)."""
    from safetensors.numpy import save_file

    if "backend" in request.fixturenames:
        request.getfixturevalue("backend")
    reg = Registry(home)
    for name in ("ok-a", "slow-e"):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (src / "metadata.json").write_text(json.dumps({"classes": ["0", "1"]}))
        save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(src / "adapter_model.safetensors"))
        reg.promote(name, reg.register(name, src).version)
    return reg


@pytest.fixture
def running(home: Path) -> Iterator[Callable[..., JobRunner]]:
    """Start run_forever in a thread; stopped and joined at teardown."""
    started: list[tuple[JobRunner, threading.Thread]] = []

    def start(**kwargs: Any) -> JobRunner:
        runner = make_runner(home, **kwargs)
        thread = threading.Thread(target=runner.run_forever, daemon=True)
        thread.start()
        started.append((runner, thread))
        wait_for(lambda: runner._schedules_gen is not None, "runner start (schedules loaded)")
        return runner

    yield start
    for runner, thread in started:
        runner.stop()
        thread.join(15)
        assert not thread.is_alive(), "run_forever must return after stop()"


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    """A zombie (killed, not yet reaped by whoever inherited it) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------------------------- lifecycle

OUTCOMES = [
    pytest.param("ok-a", "succeeded", 1.0, "challenger promoted", None, id="promoted"),
    pytest.param("rej-b", "rejected", 1.0, "challenger rejected; champion kept", None, id="rejected"),
    pytest.param(
        "bad-c", "failed", 0.75, "failed: RuntimeError: training diverged for bad-c",
        "RuntimeError: training diverged for bad-c", id="raises",
    ),
    pytest.param(
        "die-d", "failed", 0.25, f"failed: {KILLED}", KILLED, id="job-process-killed",
    ),
]  # fmt: skip


@EMBEDDED_ONLY
@pytest.mark.parametrize(("adapter", "state", "progress", "message", "error"), OUTCOMES)
def test_job_runs_in_a_child_process_to_its_end_state(
    home: Path, store: JobStore, adapter: str, state: str, progress: float, message: str, error: str | None
) -> None:
    queued = store.submit(adapter, reason="by hand")
    assert (queued.state, queued.trigger, queued.reason, queued.progress, queued.started_at) == (
        "queued", "manual", "by hand", 0.0, None,
    )  # fmt: skip

    [job] = make_runner(home).run_pending()

    assert job.id == queued.id and store.get(job.id) == job
    assert (job.state, job.progress, job.message, job.error) == (state, progress, message, error)
    assert job.runner_pid == os.getpid()
    assert queued.created_at <= job.started_at <= job.finished_at <= time.time()
    assert "25% loading labelled data" in job.log
    assert job.log.rstrip().endswith(state if error is None else f"{state}: {error}")
    if state == "failed":
        assert job.result is None
    else:
        status = "promoted" if state == "succeeded" else "rejected"
        assert job.result == {"adapter": adapter, "status": status, "version": 2}
    if adapter == "bad-c":
        assert 'raise RuntimeError(f"training diverged for {adapter}")' in job.log, "traceback belongs in the log"
    d = job.to_dict()
    assert d["state"] == state and d["run_s"] == pytest.approx(job.finished_at - job.started_at, abs=1e-3)
    assert store.counts() == {(adapter, "manual", state): 1}


def test_claim_moves_the_oldest_queued_job_to_running(store: JobStore) -> None:
    first, second = store.submit("ok-a"), store.submit("rej-b")
    claimed = store.claim_next(pid=4242, runner_id="r1")
    assert claimed is not None and claimed.id == first.id
    assert (claimed.state, claimed.runner_pid, claimed.runner_id) == ("running", 4242, "r1")
    assert claimed.started_at is not None and store.get(second.id).state == "queued"
    assert store.claim_next(pid=4242).id == second.id
    assert store.claim_next(pid=4242) is None


def test_progress_and_finish_only_touch_active_jobs(store: JobStore) -> None:
    job = store.submit("ok-a")
    assert store.progress(job.id, 0.5, "training") is False, "a queued job has no progress yet"
    store.claim_next(os.getpid())
    assert store.progress(job.id, 1.7, "epoch 3/3", log_it=True) is True
    running = store.get(job.id)
    assert (running.progress, running.message) == (1.0, "epoch 3/3") and "100% epoch 3/3" in running.log
    with pytest.raises(ValueError, match="progress fraction must be a finite number, got nan"):
        store.progress(job.id, float("nan"))
    with pytest.raises(ValueError, match="a job ends succeeded, rejected, failed, not 'running'"):
        store.finish(job.id, "running")
    assert store.finish(job.id, "rejected", result={"status": "rejected"}) is True
    assert store.finish(job.id, "succeeded") is False, "an ended job never changes again"
    assert store.progress(job.id, 0.1, "late") is False
    assert store.get(job.id).state == "rejected"
    with pytest.raises(JobNotFoundError, match="job 'nope' not found"):
        store.get("nope")


def test_duplicate_concurrent_job_is_refused_naming_the_existing_job(store: JobStore) -> None:
    first = store.submit("ok-a")
    with pytest.raises(DuplicateJobError) as err:
        store.submit("ok-a", trigger="schedule")
    assert err.value.existing_id == first.id
    assert str(err.value).startswith(f"adapter 'ok-a' already has a queued retrain job {first.id} (created ")
    assert f"GET /jobs/{first.id}" in str(err.value)
    with pytest.raises(DuplicateJobError, match=f"already has a queued retrain job {first.id}"):
        store.submit("ok-a")  # a manual job already waits: it will train on the same labels
    store.claim_next(os.getpid())
    with pytest.raises(DuplicateJobError, match=f"already has a running retrain job {first.id}"):
        store.submit("ok-a", trigger="drift")
    assert store.submit("rej-b").state == "queued", "other adapters are not blocked"
    store.finish(first.id, "failed", error="x")
    assert store.submit("ok-a").id != first.id, "once the job ended the adapter can be retrained again"


def test_a_manual_request_waits_behind_the_running_job_and_takes_over_a_queued_policy_job(store: JobStore) -> None:
    policy = store.submit("ok-a", "drift", "drift flagged, 50 labels")
    taken = store.submit("ok-a", "manual", "POST /retrain")  # the policy's job had not started: it becomes this one
    assert (taken.id, taken.trigger, taken.reason, taken.state) == (policy.id, "manual", "POST /retrain", "queued")
    assert "superseded by a manual request (POST /retrain); was drift: drift flagged, 50 labels" in taken.log
    assert "took over the queued drift job" in taken.message and len(store.list()) == 1

    running = store.claim_next(os.getpid(), runner_id="r1")
    assert running is not None and running.id == policy.id
    with pytest.raises(DuplicateJobError, match=f"running retrain job {running.id}"):
        store.submit("ok-a", "drift", "drift again")  # the policy never stacks a job behind one that runs
    behind = store.submit("ok-a", "manual", "all 400 labels")
    assert behind.state == "queued" and behind.message == f"queued behind running job {running.id}"
    other = store.submit("rej-b")
    # a runner skips the job waiting behind its adapter's running one, not the other adapters'
    assert store.claim_next(os.getpid(), runner_id="r2").id == other.id
    assert store.claim_next(os.getpid(), runner_id="r3") is None
    store.finish(running.id, "succeeded", result={"status": "promoted"})
    after = store.claim_next(os.getpid(), runner_id="r2")
    assert after is not None and after.id == behind.id and after.state == "running"


@pytest.mark.parametrize("state", ["queued", "running"])
def test_the_database_itself_allows_one_queued_and_one_running_job_per_adapter(store: JobStore, state: str) -> None:
    store.submit("ok-a")
    store.claim_next(os.getpid())
    store.submit("ok-a")  # one running, one queued behind it
    unique = (r"UNIQUE constraint failed: jobs\.adapter" if store.database.is_sqlite
              else f'duplicate key value violates unique constraint "ix_jobs_one_{state}_per_adapter"')
    with pytest.raises(IntegrityError, match=unique), store.database.write() as conn:
        conn.execute(insert(jobs).values(id="x", seq=99, adapter="ok-a", trigger="manual", reason="", state=state,
                                         progress=0, message="", created_at=0, log=""))


def test_unknown_adapter_is_refused(store: JobStore, schedules: ScheduleStore) -> None:
    message = (
        "unknown adapter 'nope': it is not in the registry "
        "(registered adapters: ['bad-c', 'die-d', 'ok-a', 'rej-b', 'slow-e'])"
    )
    with pytest.raises(UnknownAdapterJobError) as err:
        store.submit("nope")
    assert str(err.value) == message
    with pytest.raises(UnknownAdapterJobError, match=r"unknown adapter 'nope'"):
        schedules.add("nope", "0 3 * * *")
    with pytest.raises(ValueError, match="unknown trigger 'cron'; expected one of manual, schedule, drift"):
        store.submit("ok-a", trigger="cron")
    assert store.list() == [] and schedules.list() == []


def test_known_adapters_default_to_the_registry(registry: Registry, backend: str) -> None:
    jobs = JobStore(registry.home)
    assert jobs.known_adapters() == {"ok-a", "slow-e"}
    assert jobs.submit("slow-e").adapter == "slow-e"
    with pytest.raises(UnknownAdapterJobError, match=r"registered adapters: \['ok-a', 'slow-e'\]"):
        jobs.submit("rej-b")


def test_list_filters_newest_first(store: JobStore) -> None:
    a = store.submit("ok-a")
    b = store.submit("rej-b")
    store.claim_next(os.getpid())
    assert [j.id for j in store.list()] == [b.id, a.id]
    assert [j.id for j in store.list(state="running")] == [a.id]
    assert [j.id for j in store.list(adapter="rej-b")] == [b.id]
    assert [j.id for j in store.list(limit=1)] == [b.id]
    with pytest.raises(ValueError, match="unknown job state 'done'; expected one of queued, running, succeeded"):
        store.list(state="done")


def test_job_to_dict_is_json_with_iso_times_and_durations() -> None:
    ended = Job("j1", "ok-a", "manual", "", "succeeded", 1.0, "m", 1000.0, 1002.5, 1010.0, {"v": 2}, None, "l", 7)
    d = ended.to_dict()
    assert (d["created_at"], d["started_at"], d["finished_at"]) == (
        "1970-01-01T00:16:40.000+00:00", "1970-01-01T00:16:42.500+00:00", "1970-01-01T00:16:50.000+00:00",
    )  # fmt: skip
    assert (d["queued_s"], d["run_s"], d["log"], d["result"]) == (2.5, 7.5, "l", {"v": 2})
    assert json.loads(json.dumps(d)) == d
    queued = Job("j2", "ok-a", "drift", "r", "queued", 0.0, "", 1000.0, None, None, None, None, "", None)
    assert (queued.to_dict(now=1004.0)["queued_s"], queued.to_dict(now=1004.0)["run_s"]) == (4.0, None)
    assert "log" not in queued.to_dict(include_log=False)


def test_log_keeps_its_tail_within_the_bound(store: JobStore) -> None:
    job = store.submit("ok-a")
    for i in range(40):
        store.append_log(job.id, f"line {i:05d} " + "x" * 1000)
    text = store.get(job.id).log
    assert len(text) <= LOG_MAX_CHARS + 40
    assert text.startswith("[... earlier log lines dropped ...]\n")
    assert "line 00039 " in text and "line 00000 " not in text and "queued (manual)" not in text


def test_fail_orphans_spares_live_runners_unless_a_new_runner_owns_the_lock(store: JobStore) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live_job = store.submit("ok-a")
    store.claim_next(os.getpid(), runner_id="live")
    dead_job = store.submit("rej-b")
    store.claim_next(dead.pid, runner_id="gone")
    assert store.fail_orphans() == [dead_job.id]
    failed = store.get(dead_job.id)
    assert (failed.state, failed.error, failed.finished_at is not None) == ("failed", ORPHAN_ERROR, True)
    assert store.get(live_job.id).state == "running"
    assert store.fail_orphans(runner_id="live") == [], "the lock holder's own jobs are not orphans"
    assert store.fail_orphans(runner_id="new") == [live_job.id]


def test_job_function_must_be_importable_by_the_job_process() -> None:
    assert callable_path(fake_retrain) == "jobs_crash_helper:fake_retrain"
    with pytest.raises(ValueError, match="must be a module-level function the job process can import"):
        callable_path(lambda home, adapter, **kw: None)
    with pytest.raises(ValueError, match="job function 'retrain' must be given as 'module:function'"):
        callable_path("retrain")


def test_default_job_function_is_pipelines_retrain_by_name(home: Path) -> None:
    runner = JobRunner(home, known_adapters=KNOWN)
    assert runner.job_fn == DEFAULT_JOB_FN == "pipelines.retrain:retrain"
    job = Job("j", "ok-a", "manual", "", "running", 0.0, "", 0.0, 0.0, None, None, None, "", 1)
    command = runner._command(job)
    assert command[1:5] == ["-m", "pipelines.runner", "exec", "j"]
    assert command[command.index("--job-fn") + 1] == "pipelines.retrain:retrain"


def test_default_job_function_resolves_to_retrain(home: Path) -> None:
    module = pytest.importorskip("pipelines.retrain", reason="pipelines.retrain is not written yet")
    fn = resolve_callable(DEFAULT_JOB_FN)
    assert fn is module.retrain
    inspect.signature(fn).bind(home, "ok-a", base_dir=None, progress=None)


# --------------------------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("kill", ["process-group", "runner-only"])
def test_killed_runner_leaves_a_failed_job_and_nothing_else_changed(
    registry: Registry, home: Path, tmp_path: Path, kill: str, request: pytest.FixtureRequest
) -> None:
    jobs, schedules = JobStore(home), ScheduleStore(home)
    schedule = schedules.add("ok-a", "0 3 * * *")
    done = jobs.submit("ok-a")
    [done] = JobRunner(home, job_fn=fake_retrain, poll_s=0.05, policy_interval_s=None).run_pending()
    slow = jobs.submit("slow-e")
    with open(tmp_path / "runner.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(HELPER), str(home)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: jobs.get(slow.id).state == "running" and (home / SLOW_STARTED).exists(), "the slow job")
        queued = jobs.submit("ok-a")  # waits behind the slow job
        assert runner_pid(home) == proc.pid
        with pytest.raises(RunnerLockedError) as err:
            make_runner(home, lock_wait_s=0.2).run_forever()
        assert str(err.value) == (
            f"another job runner (pid {proc.pid}) is already running for {home}: it holds {home / 'runner.lock'}; "
            "run one runner per ADAPTSERVE_HOME"
        )
        before = {j.id: j for j in jobs.list()}
        child = int((home / SLOW_STARTED).read_text())
        request.addfinalizer(lambda: alive(child) and os.kill(child, signal.SIGKILL))  # never leave it behind
        if kill == "process-group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # the job process must die with its runner (PR_SET_PDEATHSIG)
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_for(lambda: not alive(child), "the job process to die with its runner", timeout=10)
    assert jobs.get(slow.id) == before[slow.id] and before[slow.id].state == "running", "no one recovered yet"
    assert runner_pid(home) is None, "the kernel dropped the dead runner's lock"

    [ran] = JobRunner(home, job_fn=fake_retrain, poll_s=0.05, policy_interval_s=None).run_pending()

    failed = jobs.get(slow.id)
    assert (failed.state, failed.error, failed.progress) == ("failed", ORPHAN_ERROR, 0.25)
    assert failed.finished_at is not None and failed.log.rstrip().endswith(f"failed: {ORPHAN_ERROR}")
    assert (ran.id, ran.state) == (queued.id, "succeeded"), "queued work survives and runs on the next runner"
    assert jobs.get(done.id) == before[done.id], "finished jobs are untouched"
    assert schedules.list() == [schedule]
    reopened = Registry(home)  # opening sweeps what a killed writer left
    champion = reopened.champion("slow-e")
    assert champion is not None and champion.version == 1
    assert [v.version for info in reopened.list_adapters() for v in info.versions] == [1, 1]
    assert list(reopened.tmp_dir.iterdir()) == [], "the half-staged adapter never became visible and is swept"


@EMBEDDED_ONLY
def test_stopping_the_runner_ends_a_running_job_failed(home: Path, store: JobStore) -> None:
    slow = store.submit("slow-e")
    runner = make_runner(home)
    thread = threading.Thread(target=runner.run_forever, daemon=True)
    thread.start()
    wait_for(lambda: (home / SLOW_STARTED).exists(), "the slow job")
    runner.stop()
    thread.join(20)
    assert not thread.is_alive()
    job = store.get(slow.id)
    assert (job.state, job.error) == ("failed", STOPPED_ERROR)
    assert STOPPED_ERROR == "job runner was stopped while this job ran; the champion was not changed"
    assert not alive(int((home / SLOW_STARTED).read_text()))
    assert runner_pid(home) is None


# --------------------------------------------------------------------------------------------- runner lock file

LOCK_LINES = [
    pytest.param("4242\n", RunnerLockHolder(4242), id="by-hand-and-the-old-format"),
    pytest.param("4242 supervised 17\n", RunnerLockHolder(4242, True, 17), id="supervised"),
    pytest.param("4242 supervised\n", RunnerLockHolder(4242, True, None), id="supervised-supervisor-unknown"),
    pytest.param("56\n2 supervised 17\n", RunnerLockHolder(56), id="caught-halfway-through-a-rewrite"),
    pytest.param("", None, id="empty"),
    pytest.param("pid?\n", None, id="junk"),
]


@pytest.mark.parametrize(("text", "holder"), LOCK_LINES)
def test_lock_file_line_parses_old_and_supervised_forms(text: str, holder: RunnerLockHolder | None) -> None:
    assert RunnerLockHolder.parse(text) == holder
    if holder is not None and text.count("\n") == 1:
        assert holder.line() == text, "what the runner writes reads back the same"


@pytest.mark.parametrize("supervised", [False, True], ids=["by-hand", "supervised"])
def test_the_lock_file_says_whether_a_supervisor_started_the_runner(home: Path, supervised: bool) -> None:
    from pipelines.runner_lock import _read_pid, hold_runner_lock, runner_holder

    with hold_runner_lock(home, supervised=supervised) as path:
        line = f"{os.getpid()} supervised {os.getppid()}\n" if supervised else f"{os.getpid()}\n"
        assert path.read_text() == line
        assert runner_holder(home) == RunnerLockHolder(os.getpid(), supervised, os.getppid() if supervised else None)
        assert runner_pid(home) == _read_pid(path) == os.getpid()
    assert runner_holder(home) is None and runner_pid(home) is None


# --------------------------------------------------------------------------------------------- schedules

INVALID_CRONS = [
    pytest.param("* * * *", "got 4 field(s), expected 5", id="four-fields"),
    pytest.param(
        "61 * * * *",
        "Error validating expression '61': the last value (61) is higher than the maximum value (59)",
        id="minute-61",
    ),
    pytest.param("0 3 * * 8", "weekday '8' is not 0-7 (0 and 7 are Sunday) or sun..sat", id="weekday-8"),
    pytest.param("0 3 * * 5-1", "weekday range '5-1' runs backwards", id="backwards"),
    pytest.param("0 0 31 2 *", "it never fires", id="february-31"),
    pytest.param("", "got 0 field(s), expected 5", id="empty"),
]


@pytest.mark.parametrize(("cron", "reason"), INVALID_CRONS)
def test_invalid_cron_is_refused_with_the_reason(schedules: ScheduleStore, cron: str, reason: str) -> None:
    with pytest.raises(ScheduleError) as err:
        schedules.add("ok-a", cron)
    assert str(err.value) == f"invalid cron expression '{cron}': {reason}; {CRON_HELP}"
    assert isinstance(err.value, ValueError) and schedules.list() == []


WEEKDAY_CASES = [  # 2024-01-06 is a Saturday
    pytest.param("0 3 * * 0", datetime(2024, 1, 7, 3, tzinfo=UTC), id="0-is-sunday"),
    pytest.param("0 3 * * 7", datetime(2024, 1, 7, 3, tzinfo=UTC), id="7-is-sunday"),
    pytest.param("0 3 * * 1-5", datetime(2024, 1, 8, 3, tzinfo=UTC), id="weekdays-skip-the-weekend"),
    pytest.param("0 3 * * 6", datetime(2024, 1, 6, 3, tzinfo=UTC), id="6-is-saturday"),
    pytest.param("0 3 * * */2", datetime(2024, 1, 6, 3, tzinfo=UTC), id="every-2nd-from-sunday"),
    pytest.param("30 4 * * MON", datetime(2024, 1, 8, 4, 30, tzinfo=UTC), id="names"),
]


@pytest.mark.parametrize(("cron", "expected"), WEEKDAY_CASES)
def test_weekdays_follow_crontab_not_apscheduler3_numbering(cron: str, expected: datetime) -> None:
    assert cron_trigger(cron).get_next_fire_time(None, datetime(2024, 1, 6, 0, 0, tzinfo=UTC)) == expected


def test_schedules_persist_and_delete(home: Path, schedules: ScheduleStore) -> None:
    before = time.time()
    first = schedules.add("ok-a", "  0   3 * * * ")
    assert (first.id, first.cron, first.last_run_at) == (1, "0 3 * * *", None)
    assert before < first.next_run_at <= before + 86400 and datetime.fromtimestamp(first.next_run_at, UTC).hour == 3
    second = schedules.add("rej-b", "*/5 * * * *")
    with pytest.raises(DuplicateScheduleError) as dup:
        schedules.add("ok-a", "0 3 * * *")
    assert str(dup.value) == "adapter 'ok-a' already has schedule 1 with cron '0 3 * * *'"
    reopened = ScheduleStore(home, known_adapters=KNOWN)
    assert reopened.list() == [first, second]
    assert reopened.get(2).to_dict()["next_run_at"].endswith("+00:00")
    generation = reopened.generation()
    assert reopened.delete(1) == first and reopened.generation() == generation + 1
    with pytest.raises(ScheduleNotFoundError, match=r"schedule 1 not found; existing schedules: \[2\]"):
        schedules.delete(1)
    with pytest.raises(ScheduleNotFoundError, match=r"schedule 'two' not found; existing schedules: \[2\]"):
        schedules.delete("two")
    assert schedules.get("2") == second, "ids from a URL path are strings"
    assert schedules.list() == [second]


@EMBEDDED_ONLY
def test_a_schedule_fires_a_job_through_apscheduler(home: Path, store: JobStore, schedules: ScheduleStore,
                                                    running: Callable[..., JobRunner]) -> None:  # fmt: skip
    schedule = schedules.add("ok-a", RARE_CRON)
    runner = running()
    aps_job = runner.scheduler.get_job(f"schedule-{schedule.id}")
    assert aps_job.next_run_time.timestamp() == schedule.next_run_at, "the runner owes the stored next fire"

    runner.scheduler.modify_job(aps_job.id, next_run_time=datetime.now(UTC))  # fire now instead of on January 1st
    job = wait_for(lambda: next((j for j in store.list(state="succeeded")), None), "the scheduled job to run")
    assert (job.adapter, job.trigger, job.reason) == ("ok-a", "schedule", f"schedule 1 (cron '{RARE_CRON}')")
    fired = schedules.get(schedule.id)
    assert fired.last_run_at is not None
    following = cron_trigger(RARE_CRON).get_next_fire_time(None, datetime.fromtimestamp(fired.last_run_at, UTC))
    assert fired.next_run_at == following.timestamp()

    added = schedules.add("rej-b", "*/5 * * * *")
    wait_for(lambda: runner.scheduler.get_job(f"schedule-{added.id}"), "a schedule added while running")
    schedules.delete(schedule.id)
    wait_for(lambda: runner.scheduler.get_job(f"schedule-{schedule.id}") is None, "a deleted schedule to go")


def test_a_fire_while_a_job_is_active_is_skipped(home: Path, store: JobStore, schedules: ScheduleStore) -> None:
    schedule = schedules.add("ok-a", RARE_CRON)
    active = store.submit("ok-a")
    runner = make_runner(home)
    assert runner.fire_schedule(schedule.id) is None
    assert [j.id for j in store.list()] == [active.id]
    assert schedules.get(schedule.id).last_run_at is not None
    assert runner.fire_schedule(999) is None, "a schedule deleted since the last reload fires nothing"


@EMBEDDED_ONLY
def test_a_fire_missed_while_no_runner_ran_fires_once_after_restart(
    home: Path, store: JobStore, running: Callable[..., JobRunner]
) -> None:
    first = ScheduleStore(home, known_adapters=KNOWN)
    missed = first.add("ok-a", "0 3 * * *")
    future = first.add("rej-b", RARE_CRON)
    first.mark_run(missed.id, time.time() - 2 * 86400)  # its next fire is now about a day overdue
    assert first.get(missed.id).next_run_at < time.time()

    running()  # a new runner process would see the same rows

    job = wait_for(lambda: next((j for j in store.list(state="succeeded")), None), "the missed fire")
    assert (job.adapter, job.trigger) == ("ok-a", "schedule")
    assert [j.adapter for j in store.list()] == ["ok-a"], "schedules not yet due fire nothing"
    wait_for(lambda: first.get(missed.id).next_run_at > time.time(), "the fire to be recorded")
    assert ScheduleStore(home, known_adapters=KNOWN).get(future.id) == future


# --------------------------------------------------------------------------------------------- drift policy


# flagged, new labels, last job (trigger, state, seconds before now), drift check age (s), starts a job
POLICY_CASES = [
    pytest.param(False, 500, None, 10, False, id="not-flagged"),
    pytest.param(None, 500, None, 10, False, id="no-drift-check-yet"),
    pytest.param(True, 49, None, 10, False, id="flagged-labels-below"),
    pytest.param(True, 50, None, 10, True, id="flagged-labels-at-minimum"),
    pytest.param(True, 500, ("drift", "failed", 599), 10, False, id="flagged-in-cooldown"),
    pytest.param(True, 500, ("drift", "failed", 601), 10, True, id="flagged-cooldown-passed"),
    pytest.param(True, 500, ("manual", "failed", 5), 10, True, id="cooldown-counts-drift-jobs-only"),
    pytest.param(True, 500, ("manual", "succeeded", 5), 10, False, id="check-predates-the-last-promotion"),
    pytest.param(True, 500, ("manual", "rejected", 5), 10, True, id="check-before-a-rejection-still-stands"),
]


@pytest.mark.parametrize(("flagged", "labels", "last_job", "check_age", "starts"), POLICY_CASES)
def test_drift_policy(
    store: JobStore, home: Path, flagged: bool | None, labels: int, last_job: tuple | None, check_age: float,
    starts: bool,
) -> None:  # fmt: skip
    offset = 0.0
    if last_job is not None:
        trigger, state, age = last_job
        job = store.submit("ok-a", trigger=trigger)
        store.finish(job.id, state)
        offset = age  # the policy's clock runs `age` seconds after that job
    now = time.time() + offset
    check = None if flagged is None else {
        "adapter": "ok-a", "drift": flagged, "score": 0.31, "threshold": 0.1,
        "checked_at": datetime.fromtimestamp(now - check_age - offset, UTC).isoformat(),
    }  # fmt: skip
    seen: list[tuple[str, float | None]] = []

    def count(adapter: str, since: float | None) -> int:
        seen.append((adapter, since))
        return labels

    policy = DriftPolicy(home, min_labels=50, cooldown_s=600, latest_drift=lambda a: check, count_labels=count,
                         jobs=store, clock=lambda: now)  # fmt: skip
    reason = policy.evaluate("ok-a")
    assert (reason is not None) == starts
    if starts:
        assert reason == (
            f"drift flagged by the check at {check['checked_at']} (score 0.31, threshold 0.1); "
            f"{labels} new labels (>= 50)"
        )
        trained = store.last_finished("ok-a", states=("succeeded", "rejected"))
        assert seen == [("ok-a", None if trained is None else trained.finished_at)], "labels since the last training"


# drift flagged, estimated accuracy, measured (accuracy, labels), min_drop: starts a job, and how it is known
ACCURACY_CASES = [
    pytest.param(True, 0.985, (None, 0), 5.0, None, id="drift-that-costs-no-accuracy-starts-nothing"),
    pytest.param(False, 0.80, (None, 0), 5.0, "estimated 80.0%", id="estimated-drop-without-a-drift-flag"),
    pytest.param(True, 0.98, (0.70, 25), 5.0, "measured 70.0% from 25 labels", id="labels-outrank-the-estimate"),
    pytest.param(True, 0.98, (0.10, 5), 5.0, None, id="a-few-labels-do-not"),
    pytest.param(False, 0.50, (0.98, 40), 5.0, None, id="labels-say-it-is-fine"),
    pytest.param(True, 0.985, (None, 0), 0.0, "drift flagged", id="min-drop-0-is-the-drift-flag-alone"),
]


@pytest.mark.parametrize(("flagged", "estimated", "measured", "min_drop", "starts"), ACCURACY_CASES)
def test_the_policy_starts_a_job_on_lost_accuracy_not_on_any_drift(
    store: JobStore, home: Path, flagged: bool, estimated: float, measured: tuple, min_drop: float, starts: str | None,
) -> None:  # fmt: skip
    check = {"adapter": "ok-a", "version": 1, "drift": flagged, "score": 3.1, "threshold": 2.0,
             "checked_at": datetime.now(UTC).isoformat(),
             "accuracy_estimate": {"estimated_accuracy": estimated, "holdout_accuracy": 0.997}}
    asked: list[tuple[str, int]] = []

    def measure(adapter: str, version: int) -> dict:
        asked.append((adapter, version))
        return {"accuracy": measured[0], "labels": measured[1]}

    policy = DriftPolicy(home, min_labels=50, cooldown_s=600, min_drop=min_drop, latest_drift=lambda a: check,
                         count_labels=lambda a, since: 60, measured=measure, jobs=store)
    reason = policy.evaluate("ok-a")
    if starts is None:
        assert reason is None
    else:
        assert reason is not None and starts in reason and reason.endswith("60 new labels (>= 50)"), reason
    assert asked == ([] if min_drop == 0 else [("ok-a", 1)])


def test_the_default_measured_reader_counts_labels_of_served_predictions(home: Path) -> None:
    policy = DriftPolicy(home)
    assert policy._measured("ok-a", 1) == {"accuracy": None, "labels": 0, "version": 1}


MIN_LABELS_ENV, COOLDOWN_ENV = settings.env_name("retrain_min_labels"), settings.env_name("retrain_cooldown_s")


def test_drift_policy_defaults_come_from_the_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIN_LABELS_ENV, raising=False)
    monkeypatch.delenv(COOLDOWN_ENV, raising=False)
    assert (DriftPolicy.from_env(home).min_labels, DriftPolicy.from_env(home).cooldown_s) == (50, 600.0)
    monkeypatch.setenv(MIN_LABELS_ENV, "7")
    monkeypatch.setenv(COOLDOWN_ENV, "30")
    assert (DriftPolicy.from_env(home).min_labels, DriftPolicy.from_env(home).cooldown_s) == (7, 30.0)
    assert (DriftPolicy(home).min_labels, DriftPolicy(home).cooldown_s) == (50, 600.0), "declared defaults"
    monkeypatch.setenv(MIN_LABELS_ENV, "many")
    with pytest.raises(SettingsError) as err:
        DriftPolicy.from_env(home)
    assert str(err.value) == "ADAPTSERVE_RETRAIN_MIN_LABELS='many' is not an integer (default 50)"
    monkeypatch.setenv(MIN_LABELS_ENV, "7")
    monkeypatch.setenv(COOLDOWN_ENV, "-5")
    with pytest.raises(SettingsError) as err:
        DriftPolicy.from_env(home)
    assert str(err.value) == "ADAPTSERVE_RETRAIN_COOLDOWN_S='-5' must be >= 0.0 (default 600.0)"
    with pytest.raises(ValueError, match="min_labels and cooldown_s must be >= 0, got -1 and 0"):
        DriftPolicy(home, min_labels=-1, cooldown_s=0)


def test_a_runner_without_a_policy_uses_the_settings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIN_LABELS_ENV, "7")
    monkeypatch.setenv(COOLDOWN_ENV, "30")
    runner = make_runner(home, policy_interval_s=10)
    assert runner.check_drift() == [], "no drift check recorded yet"
    assert (runner.policy.min_labels, runner.policy.cooldown_s) == (7, 30.0)


def test_default_drift_readers_resolve(home: Path) -> None:
    monitor = pytest.importorskip("monitoring.monitor", reason="monitoring.monitor is not written yet")
    pytest.importorskip("pipelines.labels", reason="pipelines.labels is not written yet")
    policy = DriftPolicy(home)
    reader = policy._drift_reader()
    assert isinstance(reader.__self__, monitor.DriftHistory) and reader.__name__ == "latest"
    assert isinstance(policy._label_counter()("ok-a", None), int)


def test_runner_turns_flagged_drift_into_one_job(home: Path, store: JobStore) -> None:
    def latest(adapter: str) -> dict[str, Any]:
        return {"drift": adapter == "rej-b", "checked_at": time.time(), "score": 0.5, "threshold": 0.1}

    policy = DriftPolicy(home, 1, 0, latest_drift=latest, count_labels=lambda adapter, since: 3, jobs=store)
    runner = make_runner(home, policy=policy, policy_interval_s=10)
    [job] = runner.check_drift()
    assert (job.adapter, job.trigger, job.state) == ("rej-b", "drift", "queued")
    assert job.reason.startswith("drift flagged by the check at ") and job.reason.endswith("3 new labels (>= 1)")
    assert runner.check_drift() == [], "the queued job is not duplicated"


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> Callable[..., Any]:
    app = Typer()
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(schedules_app, name="schedules")
    app.command("retrain")(retrain_command)

    def invoke(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, " ".join(result.output.split())

    return invoke


def test_cli_retrain_queues_and_refuses_clearly(registry: Registry, cli: Callable[..., Any]) -> None:
    code, out = cli("retrain", "--adapter", "nope")
    assert code == 2 and "error: unknown adapter 'nope': it is not in the registry" in out
    code, out = cli("retrain", "--adapter", "ok-a")
    [job] = JobStore(registry.home).list()
    assert code == 0 and f"queued retrain job {job.id} for ok-a" in out
    assert "no job runner is running" in out and "the job stays queued until one starts" in out
    code, out = cli("retrain", "--adapter", "ok-a")
    assert code == 2 and f"already has a queued retrain job {job.id}" in out
    code, out = cli("jobs", "list")
    assert code == 0 and job.id in out and "queued" in out
    code, out = cli("jobs", "show", job.id)
    assert code == 0 and f'"id": "{job.id}"' in out and "queued (manual) requested from the command line" in out
    code, out = cli("jobs", "show", "nope")
    assert (code, out) == (2, "error: job 'nope' not found")


def test_cli_retrain_wait_follows_the_job_to_its_end(
    registry: Registry, cli: Callable[..., Any], running: Callable[..., JobRunner]
) -> None:
    running(known_adapters=None)  # a runner on the registry's adapters
    code, out = cli("retrain", "--adapter", "ok-a", "--wait", "--poll", "0.05")
    assert code == 0 and "succeeded: challenger promoted" in out
    assert "no job runner is running" not in out


def test_cli_schedules(registry: Registry, cli: Callable[..., Any]) -> None:
    code, out = cli("schedules", "add", "ok-a", "* * * *")
    assert (code, out) == (2, f"error: invalid cron expression '* * * *': got 4 field(s), expected 5; {CRON_HELP}")
    code, out = cli("schedules", "add", "ok-a", "0 3 * * *")
    assert code == 0 and out.startswith("schedule 1: retrain ok-a at '0 3 * * *' (UTC); next run ")
    code, out = cli("schedules", "list")
    assert code == 0 and "ok-a" in out and "0 3 * * *" in out
    assert cli("schedules", "delete", "1") == (0, "deleted schedule 1 (ok-a, '0 3 * * *')")
    assert cli("schedules", "delete", "1") == (2, "error: schedule 1 not found; existing schedules: []")
