"""Change notification between processes and machines: a writer announces a change inside its transaction, every
subscriber wakes at once.

PostgreSQL: `publish` sends `NOTIFY` on the channel inside the write transaction (delivered when, and only if, it
commits). SQLite has no such thing: `publish` is a no-op and subscribers poll. Subscribers always re-read the state
they care about (a generation counter) after waking: a notification says "look now", never what changed.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

REGISTRY = "adaptserve_registry"  # promote, rollback, register, delete: every serving worker reloads its champions


def publish(conn: Connection, channel: str) -> None:
    """Announce a change on `channel` from inside the write transaction `conn` (PostgreSQL; a no-op on SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})
