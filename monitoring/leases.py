"""Which replica runs an adapter's scheduled drift check: a lease row per adapter in the state database
(`drift_leases`: adapter, holder, until), won by a conditional update.

Every monitor ticks every interval_s and, per adapter, tries to win the lease of the next interval. The update
succeeds only when the current interval is over (`until <= now`) and the lease is the caller's own, was given back
(holder ''), or was abandoned (its holder missed renewing it for the takeover time). So on one database:

* at most one monitor wins an adapter's interval, and nobody, the winner included, wins it again before `until`:
  several replicas run exactly one check per adapter per interval;
* the holder keeps winning while it lives (the others wait the takeover time first), so one replica keeps checking
  an adapter and its "nothing new since my last check" skip keeps working;
* a holder that dies stops renewing: another monitor takes over at most interval + takeover time later; one that
  closes gives its leases back and another takes over at its next tick, after the current interval still.

Times are the replicas' wall clocks (epoch seconds): their skew must stay well under the takeover time (NTP does).
The embedded SQLite default works the same with the one or several processes of one home.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from sqlalchemy import Connection, or_, select, update

from models.state import open_state
from monitoring.tables import LEASE_LOCK, drift_leases, insert_new

_T = drift_leases
# A holder late by less than this keeps its leases: a busy worker (GIL, a long check, a loaded machine) is not dead.
_MIN_TAKEOVER_S = 10.0


def new_holder() -> str:
    """A holder id unique to one monitor: host and pid say who it is, the random part tells two monitors apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class DriftLeases:
    """The drift_leases of one monitor (`holder`) on the home's state database; see the module docstring.

    interval_s: how long a won lease lasts (the check interval); takeover_s: how long after a lease ran out another
    holder may take it (default max(interval_s, 10 s)).
    """

    def __init__(self, home: str | Path, interval_s: float, *, holder: str | None = None,
                 takeover_s: float | None = None) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.database = open_state(home)
        self.interval_s = float(interval_s)
        self.takeover_s = max(self.interval_s, _MIN_TAKEOVER_S) if takeover_s is None else float(takeover_s)
        self.holder = holder or new_holder()

    def acquire(self, adapter: str, now: float | None = None) -> bool:
        """Win `adapter`'s lease for the interval starting `now` (default time.time()); False when another holder
        has it, or this one already won the current interval."""
        now = time.time() if now is None else now

        def work(conn: Connection) -> bool:
            conn.execute(insert_new(conn, _T, "adapter").values(adapter=adapter, holder="", until=0.0))
            won = conn.execute(update(_T).where(
                _T.c.adapter == adapter, _T.c.until <= now,
                or_(_T.c.holder == self.holder, _T.c.holder == "", _T.c.until <= now - self.takeover_s),
            ).values(holder=self.holder, until=now + self.interval_s))
            return won.rowcount == 1

        return self.database.transact(work, lock=LEASE_LOCK, durable=False)

    def held(self, now: float | None = None) -> list[str]:
        """Adapters whose lease this holder has and may renew (not yet past the takeover time)."""
        now = time.time() if now is None else now
        with self.database.read() as conn:
            return list(conn.scalars(select(_T.c.adapter).where(
                _T.c.holder == self.holder, _T.c.until > now - self.takeover_s).order_by(_T.c.adapter)).all())

    def holder_of(self, adapter: str) -> str | None:
        """Who has the adapter's lease ('' once given back), None when nobody ever won it."""
        with self.database.read() as conn:
            return conn.scalar(select(_T.c.holder).where(_T.c.adapter == adapter))

    def release(self) -> int:
        """Give back every lease of this holder (it stops checking); the current intervals still stand. Returns how
        many it had."""
        def work(conn: Connection) -> int:
            return conn.execute(update(_T).where(_T.c.holder == self.holder).values(holder="")).rowcount

        return self.database.transact(work, lock=LEASE_LOCK, durable=False)
