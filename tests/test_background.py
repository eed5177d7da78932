"""service.background.OffPath: a serving worker's deferred writes on models.background.BackgroundWorker."""

from __future__ import annotations

import threading
import time

from service.background import OffPath


def test_offpath_runs_writes_in_order_and_counts_failures_one_by_one() -> None:
    seen: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    off = OffPath("t")
    for write in (lambda: seen.append(1), fail, lambda: seen.append(2), fail):
        assert off.submit(write) is True
    assert off.flush(5)
    assert seen == [1, 2] and (off.failed, off.dropped, off.handled) == (2, 0, 2)
    off.close()
    assert off.submit(lambda: seen.append(3)) is False and seen == [1, 2]


def test_offpath_drops_when_full_instead_of_blocking() -> None:
    gate = threading.Event()
    off = OffPath("t", maxsize=1)
    off.submit(lambda: gate.wait(5))
    time.sleep(0.05)  # the thread now blocks on the first write; the queue holds one more
    started = time.monotonic()
    assert [off.submit(lambda: None) for _ in range(3)] == [True, False, False]
    assert time.monotonic() - started < 0.5 and off.dropped == 2
    gate.set()
    assert off.flush(5)
    off.close()
