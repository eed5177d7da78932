"""Background work off the request path: a bounded queue drained in batches by one daemon thread.

The one writer-thread implementation (the service's deferred writes, the capture writer, the drift recorder).
`submit` never blocks: a full queue drops the item and counts it (a lost record is better than a slow
prediction). The thread takes whatever is queued, waits up to `linger_s` for more (up to `max_batch`), and hands
the batch to `handle` in one call, so a store can write it in one transaction. A failing batch is logged and
counted; the thread carries on. `flush()` returns once everything submitted before it was handled.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger("adaptserve")
T = TypeVar("T")


class _Marker:
    """A flush barrier or the stop sentinel, travelling through the queue in FIFO order with the items."""

    def __init__(self, stop: bool = False) -> None:
        self.stop = stop
        self.done = threading.Event()


class BackgroundWorker(Generic[T]):
    """Items go in from any thread; `handle(batch)` runs on the worker's thread, one batch at a time.

    Counters (read from any thread, approximate while it runs): `submitted`, `dropped`, `handled`, `failed`."""

    def __init__(self, name: str, handle: Callable[[list[T]], None], *, maxsize: int = 10000, max_batch: int = 1,
                 linger_s: float = 0.0) -> None:
        if maxsize < 1 or max_batch < 1 or linger_s < 0:
            raise ValueError(f"need maxsize >= 1, max_batch >= 1 and linger_s >= 0, got {maxsize}, {max_batch} and "
                             f"{linger_s}")
        self.name = name
        self._handle = handle
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._q: queue.Queue[T | _Marker] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self.submitted = self.dropped = self.handled = self.failed = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- any thread

    def submit(self, item: T) -> bool:
        """Queue one item without blocking; False (and counted in `dropped`) when full or closed."""
        return self.submit_many((item,)) == 1

    def submit_many(self, items: Iterable[T]) -> int:
        """Queue items without blocking; returns how many were queued (the rest are dropped and counted)."""
        queued = dropped = 0
        with self._lock:  # one lock: a flush marker lands after every item submitted before flush() was called
            if self._closed:
                return 0
            for item in items:
                try:
                    self._q.put_nowait(item)
                    queued += 1
                except queue.Full:
                    dropped += 1
            self.submitted += queued
            self.dropped += dropped
        return queued

    @property
    def pending(self) -> int:
        """Items waiting in the queue (not counting the batch being handled)."""
        return self._q.qsize()

    @property
    def unfinished(self) -> int:
        """Items submitted and not yet handled or failed: queued, or in the batch being handled."""
        return self.submitted - self.handled - self.failed

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything submitted before this call was handled; False on timeout (None: no limit).

        The timeout bounds the whole call: queueing the barrier behind a full queue and waiting for it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        marker = _Marker()
        if not self._put_marker(marker, timeout):
            return False
        return marker.done.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))

    def close(self, timeout: float | None = 10.0) -> bool:
        """Handle what is queued, then stop the thread; later submits are dropped. Idempotent.

        True once the thread has stopped (everything queued before was handled or failed); False on timeout."""
        with self._lock:
            already, self._closed = self._closed, True
        if not already:
            marker = _Marker(stop=True)
            if self._put_marker(marker, timeout):
                self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put_marker(self, marker: _Marker, timeout: float | None) -> bool:
        if not self._thread.is_alive():
            return False
        try:
            self._q.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return True

    # ---------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        while True:
            batch: list[T] = []
            marker = self._collect(self._q.get(), batch)
            if batch:
                self._run_batch(batch)
            if marker is not None:
                marker.done.set()
                if marker.stop:
                    return

    def _collect(self, item: T | _Marker, batch: list[T]) -> _Marker | None:
        """Gather a batch starting with item, up to max_batch or linger_s; the marker that ended it, if any."""
        deadline = time.monotonic() + self.linger_s
        while True:
            if isinstance(item, _Marker):
                return item
            batch.append(item)
            if len(batch) >= self.max_batch:
                return None
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    item = self._q.get(timeout=remaining)
                except queue.Empty:
                    return None

    def _run_batch(self, batch: list[T]) -> None:
        try:
            self._handle(batch)
            self.handled += len(batch)
        except Exception:  # one failed batch must not stop the ones behind it
            self.failed += len(batch)
            log.exception("%s: background batch of %d failed", self.name, len(batch))
