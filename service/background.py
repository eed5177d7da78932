"""Work a serving worker does off the request path: deferred writes, and keeping the job runner alive.

* OffPath: the worker's deferred writes, a models.background.BackgroundWorker of closures. A request hands over
  a closure in ~1 µs and never waits; when the queue is full the work is dropped and counted (a lost feedback
  input is better than a slow prediction); closures run one at a time, in submission order.
* RunnerSupervisor: retraining never runs in a serving worker. The worker that finds the job runner's lock
  free starts `python -m pipelines.jobs_cli runner --supervised` as its own process (session) and restarts it if
  it dies; the runner holds an exclusive lock, so with several workers (or a runner started by hand) exactly one
  runs. On shutdown it stops its runner, or a supervised one left behind by a killed service (adopted), never one
  started by hand.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from models.background import BackgroundWorker
from pipelines.runner_lock import LOCK_FILE, RunnerLockHolder, runner_holder

log = logging.getLogger("adaptserve")

Write = Callable[[], None]


def _run_each(batch: list[Write]) -> None:
    for write in batch:
        write()


class OffPath(BackgroundWorker[Write]):
    """Closures run on one daemon thread, one per batch, so `failed` counts failed closures and `dropped` the ones
    a full queue refused (both read by the service's metrics and tests)."""

    def __init__(self, name: str, maxsize: int = 10000) -> None:
        super().__init__(name, _run_each, maxsize=maxsize, max_batch=1)


def _proc_status(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, or None when it is gone or cannot be seen (/proc, else `ps`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]  # after "pid (comm)": the comm may hold spaces
        return state, int(ppid)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # no /proc (macOS): ask ps
        try:
            out = subprocess.run(["ps", "-o", "stat=,ppid=", "-p", str(pid)], capture_output=True, text=True).stdout
            state, ppid = out.split()
            return state[0], int(ppid)
        except (OSError, ValueError):
            return None


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has exited: its flock and open files are gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = _proc_status(pid)
    return status is None or status[0] != "Z"


def stop_runner(pid: int, grace_s: float) -> bool:
    """SIGTERM the runner (it ends a running job failed, with its reason), SIGKILL its process group after `grace_s`
    (a job process too). True when it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    try:
        group = os.getpgid(pid)
        if group == pid:  # its own session (the supervisor starts it so): the group is the runner and its job
            os.killpg(group, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    log.warning("the job runner (pid %s) did not stop within %.0f s of SIGTERM: killed it", pid, grace_s)
    deadline = time.monotonic() + 5.0
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


class RunnerSupervisor:
    """Start the job runner when none runs; check again every `interval_s` (so a crashed runner comes back).

    Its runner is started `--supervised`, in a session of its own (so it outlives a restart of this worker). stop()
    stops it, or a supervised runner this supervisor finds holding the lock whose own supervisor is gone (adopted:
    the service that started it was killed): SIGTERM, then SIGKILL after `grace_s`. A runner started by hand is
    never stopped, nor one whose supervising worker is still alive (another worker or service stops its own)."""

    def __init__(self, home: Path, env: dict[str, str], interval_s: float = 5.0, grace_s: float = 15.0) -> None:
        self.home = home
        self.lock = home / LOCK_FILE
        self.env = env
        self.interval_s = interval_s
        self.grace_s = grace_s  # > the runner's own 10 s for its job process to stop
        self.proc: subprocess.Popen | None = None
        self.found: RunnerLockHolder | None = None  # the last runner not started here seen holding the lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runner-supervisor", daemon=True)

    def start(self) -> RunnerSupervisor:
        self._thread.start()
        return self

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pipelines.jobs_cli", "runner", "--supervised"]

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.proc is None or self.proc.poll() is not None:
                holder = runner_holder(self.home)
                if holder is None:
                    self._start_runner()
                elif holder.pid > 0 and holder != self.found:
                    self.found = holder
                    whose = "adopted: this service stops it" if self._adoptable(holder) else "not ours to stop"
                    log.info("a job runner (pid %s, %s) holds %s: %s", holder.pid,
                             "supervised" if holder.supervised else "started by hand", self.lock, whose)
            self._stop.wait(self.interval_s)

    def _start_runner(self) -> None:
        root = Path(__file__).resolve().parent.parent
        with open(self.lock.with_name("runner.log"), "ab") as err:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.command(),
                cwd=root,
                env=self.env,
                start_new_session=True,  # survives a restart of this worker; the lock keeps it unique
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        log.info("started the job runner (pid %s)", self.proc.pid)

    def _adoptable(self, holder: RunnerLockHolder) -> bool:
        """A supervised runner whose supervising process is gone (or is us): its parent is no longer the one the
        lock file names. A runner started by hand belongs to whoever started it."""
        if not holder.supervised or holder.pid <= 0:
            return False
        status = _proc_status(holder.pid)
        if status is None:
            return process_alive(holder.pid)  # cannot see its parent: the mark alone decides
        parent = status[1]
        return parent == os.getpid() or holder.supervisor_pid is None or parent != holder.supervisor_pid

    def stop(self) -> None:
        """Stop supervising, then stop our runner or an adopted one (blocks up to about `grace_s`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)  # no runner starts behind our back while we stop
        if self.proc is not None and self.proc.poll() is None:
            stop_runner(self.proc.pid, self.grace_s)
            self.proc.poll()  # reap it
            return
        holder = runner_holder(self.home)
        if holder is not None and self._adoptable(holder):
            log.info("stopping the adopted job runner (pid %s)", holder.pid)
            stop_runner(holder.pid, self.grace_s)
