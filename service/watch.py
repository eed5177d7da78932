"""How a serving worker hears that the registry changed: a notification (models/notify.py), else its poll.

A promote, rollback, registration or delete made through any worker of any replica, the CLI or a retrain job
publishes on `notify.REGISTRY` inside its write; every worker's subscription wakes and the worker refreshes at
once. The poll every `poll_s` stays underneath: a notification lost (a listener reconnecting, a full socket queue,
notification off) only delays the swap to the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from models import notify
from models.state import state_url

log = logging.getLogger("adaptserve")
T = TypeVar("T")


def subscribe(home: Path, enabled: bool) -> notify.Subscription | None:
    """The registry's change subscription on the state database of `home`; None when notification is off."""
    if not enabled:
        return None
    return notify.Subscription(state_url(home), notify.REGISTRY)


async def follow(refresh: Callable[[], object], changes: notify.Subscription | None, poll_s: float) -> None:
    """Forever: wait for a change notification or `poll_s` seconds, whichever comes first, then `refresh()` in a
    thread (it reads the database and may load a model: never on the event loop).

    Bursts coalesce: notifications that arrive while a refresh runs leave one wake-up behind, and the next refresh
    reads the registry as it is then, so it covers all of them.
    """
    while True:
        if changes is None:
            await asyncio.sleep(poll_s)
        else:
            await changes.wait_async(poll_s)
        try:
            await asyncio.to_thread(refresh)
        except Exception:  # keep following: a transient database error must not stop hot swaps
            log.exception("registry refresh failed")


class Serialized(Generic[T]):
    """`fn()` run by one thread at a time: the refresh an admin route runs after its own change and the one its
    notification wakes would otherwise load the same champion twice and could publish the older map last."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn, self._lock = fn, threading.Lock()

    def __call__(self) -> T:
        with self._lock:
            return self._fn()
