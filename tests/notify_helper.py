"""A subscriber in a process of its own for tests/test_notify.py, driven over a multiprocessing pipe.

It subscribes, reports its first wake-up (the connect), then answers each ("wait", seconds) twice: ("waiting",)
just before it starts waiting, then (woken, time.monotonic() when woken or given up, the generation it reads right
after, connects so far). The generation shows that what woke it is already visible to a reader. CLOCK_MONOTONIC is
one clock for every process of a machine, so the parent subtracts its own timestamps from these.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

from sqlalchemy import text

from models.db import Database
from models.notify import Subscription


def read_generation(database: Database) -> int:
    with database.read() as conn:
        return int(conn.execute(text("SELECT n FROM fake_generation")).scalar_one())


def subscriber(url: str, channel: str, pipe: Connection) -> None:
    database = Database(url)
    with Subscription(url, channel) as sub:
        pipe.send(("ready", sub.wait(30), sub.connects, os.getpid()))
        while True:
            command, arg = pipe.recv()
            if command == "close":
                break
            pipe.send(("waiting",))
            woken = sub.wait(arg)
            at = time.monotonic()
            pipe.send((woken, at, read_generation(database), sub.connects))
    database.dispose()
    pipe.send(("closed",))
