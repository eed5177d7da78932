"""A worker's registry follow loop (service/watch.py): notified refreshes at once, polls without, folds bursts,
survives a failing refresh; the route's and the loop's refreshes never overlap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from models import notify
from models.db import Database
from models.state import state_url
from service.watch import Serialized, follow, subscribe


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("ADAPTSERVE_DATABASE_URL", raising=False)  # the SQLite state.db of this home
    return tmp_path / "home"


@pytest.fixture
def writer(home: Path) -> Iterator[Callable[[], float]]:
    """A fake registry write on the home's state database: publish and commit; monotonic() at the commit."""
    database = Database(state_url(home))

    def write() -> float:
        with database.write() as conn:
            conn.execute(text("SELECT 1"))
            notify.publish(conn, notify.REGISTRY)
        return time.monotonic()

    yield write
    database.dispose()


class Recorder:
    """A refresh that records when it ran, optionally slow or failing on its first calls."""

    def __init__(self, seconds: float = 0.0, failures: int = 0) -> None:
        self.calls: list[float] = []
        self.seconds, self.failures = seconds, failures

    def __call__(self) -> None:
        self.calls.append(time.monotonic())
        time.sleep(self.seconds)
        if len(self.calls) <= self.failures:
            raise RuntimeError("database is locked")


async def _run_for(seconds: float, refresh: Recorder, changes: notify.Subscription | None, poll_s: float,
                   during: Callable[[], object] | None = None, delay: float = 0.0) -> None:
    """follow() for `seconds`; `during()` runs in a thread `delay` seconds in."""
    task = asyncio.create_task(follow(refresh, changes, poll_s))
    if during is not None:
        await asyncio.sleep(delay)
        await asyncio.to_thread(during)
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_without_notification_it_polls(home: Path) -> None:
    refresh = Recorder()
    assert subscribe(home, enabled=False) is None
    asyncio.run(_run_for(0.55, refresh, None, poll_s=0.1))
    assert 4 <= len(refresh.calls) <= 6


def test_a_notification_refreshes_at_once(home: Path, writer: Callable[[], float]) -> None:
    refresh = Recorder()
    committed: list[float] = []
    with subscribe(home, enabled=True) as changes:
        # poll_s 30: any refresh after the first (the connect's wake-up) is the notification's
        asyncio.run(_run_for(0.3, refresh, changes, poll_s=30.0, during=lambda: committed.append(writer()), delay=0.3))
    assert len(refresh.calls) == 2
    latency_ms = 1000 * (refresh.calls[1] - committed[0])
    print(f"\nsqlite: commit -> refresh started in the follow loop: {latency_ms:.2f} ms")
    assert latency_ms < 1000


def test_a_burst_during_a_refresh_folds_into_one_more(home: Path, writer: Callable[[], float]) -> None:
    refresh = Recorder(seconds=0.5)
    burst: list[float] = []

    def publish_then_burst() -> None:
        writer()  # wakes the loop: its refresh runs 0.5 s
        time.sleep(0.05)
        burst.extend(writer() for _ in range(20))  # all while that refresh runs

    with subscribe(home, enabled=True) as changes:
        assert changes.wait(10)  # the connect's wake-up, taken here so the loop starts on the first publish
        asyncio.run(_run_for(1.2, refresh, changes, poll_s=30.0, during=publish_then_burst, delay=0.1))
    assert burst[-1] < refresh.calls[0] + refresh.seconds  # the burst did end inside the first refresh
    assert len(refresh.calls) == 2  # the first publish's refresh, then one for all 20


def test_a_failing_refresh_does_not_stop_following(home: Path, writer: Callable[[], float]) -> None:
    refresh = Recorder(failures=1)
    with subscribe(home, enabled=True) as changes:
        asyncio.run(_run_for(0.3, refresh, changes, poll_s=30.0, during=writer, delay=0.3))
    assert len(refresh.calls) == 2  # the connect's (raised, logged) and the notification's


def test_serialized_refreshes_never_overlap() -> None:
    inside, overlaps = [0], []
    lock = threading.Lock()

    def refresh() -> int:
        with lock:
            inside[0] += 1
            overlaps.append(inside[0])
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return 7

    serialized = Serialized(refresh)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(serialized())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [7] * 4 and overlaps == [1] * 4
