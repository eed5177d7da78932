"""The thread that keeps a runner's lease on the job it runs (`JobStore.heartbeat`), and says when it was lost.

A thread of its own, not the runner's loop: housekeeping between polls (a drift check, a registry read, a slow
database) may take longer than a lease, and a live runner must not lose its job to that. It renews every third of
the lease, so two renewals can fail (a database restarting) before the lease runs out.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from pipelines.jobs import JobStore

log = logging.getLogger("adaptserve.jobs")


class LeaseKeeper:
    """`with LeaseKeeper(store, job_id, runner_id, lease_s) as lease:` renews until the block ends; `lease.lost` is
    set (and renewing stops) once the job is no longer this runner's: it ended, or another runner failed it after
    the lease ran out."""

    def __init__(self, store: JobStore, job_id: str, runner_id: str | None, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.store, self.job_id, self.runner_id, self.lease_s = store, job_id, runner_id, lease_s
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            try:
                if not self.store.heartbeat(self.job_id, self.runner_id, self.lease_s):
                    self.lost.set()
                    return
            except Exception:  # the database is unreachable: keep trying while the lease may still hold
                log.exception("job %s: renewing the lease failed; retrying in %.1f s", self.job_id, self.lease_s / 3)
