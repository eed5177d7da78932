"""The job runner: turns cron schedules and flagged drift into jobs, and runs each job in its own process.

Who does what:

* the service and the CLI only *submit*: ``JobStore.submit`` and ``ScheduleStore.add`` are small writes to the state
  database with no torch import, so serving workers never train and predictions keep their latency;
* one ``JobRunner`` per home (``adaptserve jobs runner``, holding the exclusive flock on ``<home>/runner.lock``,
  `pipelines.runner_lock`), and any number of homes, on any machines, sharing one database
  (ADAPTSERVE_DATABASE_URL). Each turns cron schedules (APScheduler, `pipelines.schedules`; every tick fires once
  whichever runners see it) and flagged drift (`pipelines.policy.DriftPolicy`) into queued jobs, claims queued
  jobs (no two runners the same one) and runs each in a child process (``python -m pipelines.runner exec ID``), so
  a crash in training cannot take the runner down;
* the child reports progress, log lines and the outcome back through the job store (`pipelines.jobs`).

Crash safety (kill -9 of the runner, its child, or both, at any point):

* every state change is one transaction of the state database (see `pipelines.jobs`);
* the job function (``pipelines.retrain.retrain``) publishes and promotes through the adapter registry, which stages
  and commits atomically, so a killed job leaves no visible partial adapter and the champion unchanged;
* the child asks the kernel to SIGKILL it when the runner dies (PR_SET_PDEATHSIG), so no training outlives it;
* a runner holds a lease on the job it runs and renews it every third of ADAPTSERVE_JOB_LEASE_S on a thread of its
  own. The job of a runner that died ends failed, never retried (resubmit to retry): at once when the next runner
  of the same home starts (it holds the home's lock, so the old runner is gone: ``fail_orphans``), else, seen by
  any runner on the database, once the lease has run out. A runner that finds its lease taken (it was cut off from
  the database that long) stops the job process. Queued jobs, schedules and labelled data are never touched by
  recovery.

One job runs at a time per runner: training uses every core of the 2-core target machine, so a runner runs jobs one
after another in submission order; more homes (machines) run more jobs at once.

The child inherits the runner's environment, so the ADAPTSERVE_RETRAIN_* settings the runner was started with are
the ones its jobs train and gate with.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from models import settings
from pipelines.jobs import (
    CHAMPION_KEPT,
    LEASE_ERROR,
    ORPHAN_ERROR,
    DuplicateJobError,
    Job,
    JobStore,
    KnownAdapters,
    UnknownAdapterJobError,
)
from pipelines.policy import DriftPolicy
from pipelines.runner_lease import LeaseKeeper
from pipelines.runner_lock import hold_runner_lock
from pipelines.schedules import CRON_TIMEZONE, ScheduleNotFoundError, ScheduleStore, cron_trigger

log = logging.getLogger("adaptserve.jobs")

DEFAULT_JOB_FN = "pipelines.retrain:retrain"
LOG_DIR = "job-logs"
STOPPED_ERROR = f"job runner was stopped while this job ran{CHAMPION_KEPT}"
_OUTCOMES = {"promoted": "succeeded", "rejected": "rejected"}
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------------------------- job functions


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
    service's RunnerSupervisor in the lock file, so the service that finds it there stops it with itself;
    ``lease_s`` is how long its hold on a running job lasts unrenewed (default ADAPTSERVE_JOB_LEASE_S).
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
        lease_s: float | None = None,
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
        self.lease_s = settings.load().job_lease_s if lease_s is None else lease_s
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

    def fire_schedule(self, schedule_id: int, now: float | None = None) -> Job | None:
        """What APScheduler calls: submit a 'schedule' job for this tick, unless another runner did; a duplicate or
        vanished adapter is logged and skipped (the tick counts as fired)."""
        try:
            job = self.schedules.fire(schedule_id, self.jobs, now)
        except ScheduleNotFoundError:
            return None  # deleted since the last reload
        except (DuplicateJobError, UnknownAdapterJobError) as e:
            log.warning("schedule %s skipped: %s", schedule_id, e)
            return None
        if job is None:
            log.info("schedule %s: this tick was fired by another runner", schedule_id)
        else:
            log.info("queued job %s for adapter %r (schedule) %s", job.id, job.adapter, job.reason)
        return job

    # ---------------------------------------------------------------- drift

    def check_drift(self) -> list[Job]:
        """Evaluate the drift policy for every registered adapter; submit a 'drift' job where it says so."""
        if self.policy is None:
            self.policy = DriftPolicy.from_env(self.home, jobs=self.jobs)
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
        job = self.jobs.claim_next(os.getpid(), self.runner_id, self.lease_s)
        if job is None:
            return None
        log.info("job %s: retraining %r (%s)", job.id, job.adapter, job.trigger)
        final = self._execute(job)
        log.info("job %s: %s %s", final.id, final.state, final.error or "")
        return final

    def _command(self, job: Job) -> list[str]:
        cmd = [sys.executable, "-m", "pipelines.runner", "exec", job.id, "--home", str(self.home)]
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
        with LeaseKeeper(self.jobs, job.id, self.runner_id, self.lease_s) as lease:
            rc, stopped = self._wait(proc, lease)
        return self._settle(job, rc, out_path, stopped)

    def _wait(self, proc: subprocess.Popen[bytes], lease: LeaseKeeper) -> tuple[int, bool]:
        """The child's exit status, and whether this runner stopped it (stop(), or another runner took the job)."""
        stopped, lost_seen = False, False
        while True:
            try:
                return proc.wait(timeout=self.poll_s), stopped
            except subprocess.TimeoutExpired:
                pass
            if stopped:
                continue
            taken = False
            if lease.lost.is_set() and not lost_seen:
                lost_seen = True  # the child's own finish also ends the lease: only a job failed by others is taken
                taken = self.jobs.get(job_id := lease.job_id).error in (LEASE_ERROR, ORPHAN_ERROR)
                if taken:
                    log.warning("job %s was failed by another runner (this one's lease ran out): stopping its job "
                                "process", job_id)
            if self._stop.is_set() or taken:
                stopped = True
                self._terminate(proc)
            elif self._housekeeping:
                self._tick()

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
        died = f"job process {_describe_exit(rc)} before reporting a result{CHAMPION_KEPT}"
        reason = STOPPED_ERROR if stopped else died
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
    parser = argparse.ArgumentParser(prog="python -m pipelines.runner", description="retrain job process (internal)")
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
    from pipelines.runner import main as _main  # the importable copy, so classes are not duplicated under __main__

    raise SystemExit(_main())
