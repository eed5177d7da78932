"""A service's RunnerSupervisor stops the job runner it started, or a supervised one a killed service left holding
<home>/runner.lock (adopted), and never a runner someone started by hand or one whose supervisor still lives.

Real runner processes (`python -m pipelines.jobs_cli runner [--supervised]`) on an empty tmp home: the runner needs no
base model until a job runs, so none is trained here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipelines.runner_lock import RunnerLockHolder, runner_holder
from service.background import RunnerSupervisor, process_alive

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 10.0
# a stand-in for a serving worker: starts the runner in a session of its own, as RunnerSupervisor does, then idles
WORKER = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:], start_new_session=True); time.sleep(600)"


def wait_for(check: Callable[[], object], what: str, timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "runner-home"
    path.mkdir()
    return path


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return dict(os.environ, ADAPTSERVE_HOME=str(home))


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Pids (each its own process group) killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _popen(cmd: list[str], env: dict[str, str], cleanup: list[int]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    cleanup.append(proc.pid)
    return proc


def start_runner(how: str, home: Path, env: dict[str, str], cleanup: list[int]) -> tuple[RunnerLockHolder, int | None]:
    """A runner holding home's lock, started `how`; returns its lock line and the pid that supervises it."""
    supervised = RunnerSupervisor(home, env).command()
    worker = None
    if how == "this-process":  # the very command the supervisor runs, started here: this process supervises it
        _popen(supervised, env, cleanup)
    elif how == "by-hand":
        _popen([sys.executable, "-m", "pipelines.jobs_cli", "runner"], env, cleanup)
    else:  # 'killed-service' or 'live-worker': a (stand-in) serving worker starts it
        worker = _popen([sys.executable, "-c", WORKER, *supervised], env, cleanup)
    holder = wait_for(lambda: (h := runner_holder(home)) and h.pid > 0 and h, "the runner to hold the lock")
    cleanup.append(holder.pid)
    if how == "killed-service":
        worker.kill()
        assert worker.wait(timeout=10) == -signal.SIGKILL
        assert process_alive(holder.pid), "the runner outlives its killed service (the case to handle)"
    return holder, None if worker is None else worker.pid


CASES = [
    pytest.param("killed-service", True, id="adopted-from-a-killed-service"),
    pytest.param("this-process", True, id="supervised-started-by-this-process"),
    pytest.param("by-hand", False, id="by-hand-is-never-stopped"),
    pytest.param("live-worker", False, id="supervised-by-a-live-worker-is-left-to-it"),
]


@pytest.mark.parametrize(("how", "stopped"), CASES)
def test_stop_ends_an_adopted_supervised_runner_only(
    how: str, stopped: bool, home: Path, env: dict[str, str], cleanup: list[int]
) -> None:
    holder, worker = start_runner(how, home, env, cleanup)
    expected_supervisor = {"this-process": os.getpid(), "by-hand": None}.get(how, worker)
    assert holder == RunnerLockHolder(holder.pid, how != "by-hand", expected_supervisor)

    supervisor = RunnerSupervisor(home, env, interval_s=0.05, grace_s=GRACE_S).start()
    wait_for(lambda: supervisor.found == holder, "the supervisor to see the lock held", timeout=10)
    began = time.monotonic()
    supervisor.stop()
    took = time.monotonic() - began

    assert supervisor.proc is None, "it found the lock held, so it never started a runner of its own"
    if stopped:
        assert not process_alive(holder.pid), "the adopted runner is gone"
        assert took < GRACE_S, f"SIGTERM sufficed: an idle runner stops in well under the grace ({took:.1f} s)"
        assert runner_holder(home) is None, "and the lock with it"
    else:
        time.sleep(0.5)
        assert process_alive(holder.pid), "not this service's runner: still running"
        assert runner_holder(home) == holder
        assert took < 1.0


def test_stop_ends_the_runner_it_started_and_restarts_a_dead_one(home: Path, env: dict[str, str]) -> None:
    supervisor = RunnerSupervisor(home, env, interval_s=0.05, grace_s=GRACE_S).start()
    try:
        first = wait_for(lambda: (h := runner_holder(home)) and h.pid > 0 and h, "the supervisor's runner")
        assert first == RunnerLockHolder(supervisor.proc.pid, True, os.getpid())
        os.kill(first.pid, signal.SIGKILL)
        second = wait_for(lambda: (h := runner_holder(home)) and h.pid not in (-1, first.pid) and h, "a new runner")
        assert second == RunnerLockHolder(supervisor.proc.pid, True, os.getpid())
    finally:
        supervisor.stop()
    assert supervisor.proc.returncode == 0, "SIGTERM: the runner stopped cleanly"
    assert not process_alive(second.pid) and runner_holder(home) is None
