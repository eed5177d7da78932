"""SQLite plumbing the stores share (registry, labels, feedback inputs, jobs, capture, drift history).

Every store runs in autocommit mode (isolation_level=None) and writes inside BEGIN IMMEDIATE, so concurrent
writers (threads, workers, the job runner) queue on the lock instead of failing on a lock upgrade, and a
killed process leaves either all of a write or none of it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path


def connect(path: Path, timeout: float, durable: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode. durable: synchronous=FULL (a commit survives power loss); else NORMAL,
    which in WAL mode survives a process crash and skips an fsync per commit."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on `conn`, rolled back on any error: all of it or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def init_db(path: Path, schema: str, timeout: float, durable: bool = True) -> None:
    """Create the directory, switch the file to WAL and run `schema` (';'-separated statements) in one write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(path, timeout, durable)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        with transaction(conn):
            for stmt in filter(str.strip, schema.split(";")):
                conn.execute(stmt)
