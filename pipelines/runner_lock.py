"""``<home>/runner.lock``: the flock that makes the job runner one per home, and the line saying who holds it.

A starting runner takes the exclusive lock (`hold_runner_lock`) for as long as it lives; the kernel drops it when the
runner exits or is killed (kill -9 included), so a crashed runner never leaves a stale lock. Holding it is what lets
a starting runner fail at once every job an earlier runner of this home left 'running': that runner is gone. Jobs of
runners of other homes on a shared database (ADAPTSERVE_DATABASE_URL) are not this lock's business: their leases
say when they are orphans (`pipelines.jobs`).

The file's first line says who holds it (`RunnerLockHolder`): ``PID`` for a runner started by hand, or
``PID supervised SUPERVISOR_PID`` for one a serving worker's RunnerSupervisor started (service/background.py), which
a service may stop. `runner_holder` probes without taking the lock for more than microseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from models import locks
from pipelines.jobs import JobError

LOCK_FILE = "runner.lock"
SUPERVISED_MARK = "supervised"


class RunnerLockedError(JobError):
    """Another job runner already serves this home."""

    status_code = 409


@dataclass(frozen=True)
class RunnerLockHolder:
    """What <home>/runner.lock says about the runner holding it: ``PID`` (started by hand) or
    ``PID supervised SUPERVISOR_PID`` (started by a serving worker's RunnerSupervisor, which was SUPERVISOR_PID)."""

    pid: int
    supervised: bool = False
    supervisor_pid: int | None = None

    def line(self) -> str:
        fields = [self.pid, SUPERVISED_MARK, self.supervisor_pid] if self.supervised else [self.pid]
        return " ".join(str(f) for f in fields if f is not None) + "\n"

    @classmethod
    def parse(cls, text: str) -> RunnerLockHolder | None:
        """The first line only (a reader may catch a rewrite halfway); None for anything but those two forms."""
        fields = text.partition("\n")[0].split()
        if not fields or not fields[0].isdigit():
            return None
        supervised = fields[1:2] == [SUPERVISED_MARK]
        supervisor = int(fields[2]) if supervised and len(fields) > 2 and fields[2].isdigit() else None
        return cls(int(fields[0]), supervised, supervisor)


def lock_path(home: str | Path) -> Path:
    """The runner lock of a home."""
    return Path(home).expanduser().absolute() / LOCK_FILE


def _read_holder(path: Path) -> RunnerLockHolder | None:
    try:
        return RunnerLockHolder.parse(path.read_text())
    except OSError:
        return None


def _read_pid(path: Path) -> int | None:
    holder = _read_holder(path)
    return None if holder is None else holder.pid


@contextmanager
def hold_runner_lock(home: str | Path, wait_s: float = 2.0, supervised: bool = False) -> Iterator[Path]:
    """Exclusive flock on <home>/runner.lock for as long as the runner lives; the kernel drops it on kill -9.

    Waits up to ``wait_s`` so a momentary probe by ``runner_pid`` never makes a starting runner give up, then raises
    RunnerLockedError naming the holder. ``supervised``: a RunnerSupervisor (our parent process) started this
    runner, and a service that adopts it may stop it; the lock file says so (see RunnerLockHolder)."""
    path = lock_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = locks.acquire(path, wait_s)
    except locks.LockHeldError:
        holder = _read_pid(path)
        raise RunnerLockedError(
            f"another job runner (pid {holder if holder else 'unknown'}) is already running for "
            f"{path.parent}: it holds {path}; run one runner per ADAPTSERVE_HOME"
        ) from None
    try:
        holder = RunnerLockHolder(os.getpid(), supervised, os.getppid() if supervised else None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.line().encode(), 0)
        yield path
    finally:
        locks.release(fd)


def runner_pid(home: str | Path) -> int | None:
    """Pid of the job runner serving this home, or None if none runs."""
    holder = runner_holder(home)
    return None if holder is None else holder.pid


def runner_holder(home: str | Path) -> RunnerLockHolder | None:
    """The job runner holding this home's lock (pid -1 while it has not written its line yet), or None."""
    path = lock_path(home)
    if not locks.is_locked(path):
        return None
    return _read_holder(path) or RunnerLockHolder(-1)
