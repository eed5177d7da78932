"""Work a serving worker does off the request path: deferred writes, and keeping the job runner alive.

* OffPath: a bounded queue drained by one daemon thread. A request hands over a closure in ~1 µs and never
  waits; when the queue is full the work is dropped and counted (a lost feedback input is better than a
  slow prediction).
* RunnerSupervisor: retraining never runs in a serving worker. The worker that finds the job runner's lock
  free starts `python -m pipelines.jobs_cli runner` as its own process (session) and restarts it if it dies; the
  runner holds an exclusive lock, so with several workers (or a runner started by hand) exactly one runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("adaptserve")


class OffPath:
    def __init__(self, name: str, maxsize: int = 10000) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize)
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> bool:
        try:
            self._q.put_nowait(fn)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        while (fn := self._q.get()) is not None:
            try:
                fn()
            except Exception:  # one failed write must not stop the ones behind it
                self.failed += 1
                log.exception("background write failed")
            finally:
                self._q.task_done()
        self._q.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._q.unfinished_tasks

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)


def lock_is_free(path: Path) -> bool:
    """True when nobody holds an exclusive fcntl lock on `path` (probe: take it and let go at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


class RunnerSupervisor:
    """Start the job runner when none runs; check again every `interval_s` (so a crashed runner comes back)."""

    def __init__(self, home: Path, env: dict[str, str], interval_s: float = 5.0) -> None:
        self.lock = home / "runner.lock"
        self.env = env
        self.interval_s = interval_s
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runner-supervisor", daemon=True)

    def start(self) -> RunnerSupervisor:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            if (self.proc is None or self.proc.poll() is not None) and lock_is_free(self.lock):
                root = Path(__file__).resolve().parent.parent
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "pipelines.jobs_cli", "runner"],
                    cwd=root,
                    env=self.env,
                    start_new_session=True,  # survives a restart of this worker; the lock keeps it unique
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.lock.with_name("runner.log"), "ab"),  # noqa: SIM115 - the child owns it
                )
                log.info("started the job runner (pid %s)", self.proc.pid)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
