"""``<home>/labels.db``: its tables, its connections, and the migration of a file from before trust was recorded.

Every labels.db has one shape: the columns added since the first version (trust, sender, outcome) are added by
`migrate`, on a fresh file as on an old one, in one transaction (all of them or none). Connections are fresh per
operation and durable (synchronous=FULL): labels are people's work.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from models.sqlite import connect, init_db, transaction
from pipelines.label_trust import Trust

LABELS_DB = "labels.db"

# trust, sender (labels, events) and outcome (events) are added by `migrate`, on a fresh file as on one from before
# they existed, so every labels.db has one shape
SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    id TEXT PRIMARY KEY,
    adapter TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    prediction_id TEXT,
    split TEXT CHECK (split IS NULL OR split IN ('train', 'holdout')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    png BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_adapter ON labels (adapter, updated_at);
CREATE INDEX IF NOT EXISTS labels_by_prediction ON labels (prediction_id) WHERE prediction_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    label_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    label TEXT NOT NULL,
    source TEXT NOT NULL,
    prediction_id TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conflicts (
    seq INTEGER PRIMARY KEY,
    label_id TEXT NOT NULL,
    adapter TEXT NOT NULL,
    kept_label TEXT NOT NULL,
    kept_trust INTEGER NOT NULL,
    offered_label TEXT NOT NULL,
    trust INTEGER NOT NULL,
    source TEXT NOT NULL,
    sender TEXT NOT NULL,
    prediction_id TEXT,
    at REAL NOT NULL,
    resolution TEXT CHECK (resolution IS NULL OR resolution IN ('outranked', 'replaced', 'settled')),
    resolved_label TEXT,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS conflicts_pending ON conflicts (label_id) WHERE resolved_at IS NULL;
CREATE INDEX IF NOT EXISTS conflicts_by_adapter ON conflicts (adapter, at)
"""

LEGACY_SENDER = "legacy"  # the sender of rows stored before senders were recorded
_ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "labels": (("trust", "INTEGER NOT NULL DEFAULT 0"), ("sender", f"TEXT NOT NULL DEFAULT '{LEGACY_SENDER}'")),
    "events": (
        ("trust", "INTEGER NOT NULL DEFAULT 0"),
        ("sender", f"TEXT NOT NULL DEFAULT '{LEGACY_SENDER}'"),
        ("outcome", "TEXT"),
    ),
}


def open_db(path: Path, timeout: float) -> list[str]:
    """Create or open labels.db at `path` in its current shape; the columns a migration added (see `migrate`)."""
    init_db(path, SCHEMA, timeout, durable=True)
    return migrate(path, timeout)


def read(path: Path, timeout: float) -> closing[sqlite3.Connection]:
    """A fresh connection for reads, closed when the ``with`` block ends."""
    return closing(_connect(path, timeout))


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    return connect(path, timeout, durable=True)  # labels are people's work: FULL survives power loss


@contextmanager
def write(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a fresh connection: all of it or none of it."""
    with closing(_connect(path, timeout)) as conn, transaction(conn):
        yield conn



def _missing_columns(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str]]]:
    missing = {}
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if todo := [c for c in columns if c[0] not in have]:
            missing[table] = todo
    return missing


def migrate(path: Path, timeout: float) -> list[str]:
    """Add the columns a labels.db from before trust lacks, all in one transaction; returns those added.

    Old rows carry no sender: an import ("import:..." source, as `adaptserve data add` stores) is rated TRUSTED,
    as an import is now; feedback and uploads UNTRUSTED; their sender is "legacy"."""
    with closing(_connect(path, timeout)) as conn:
        if not _missing_columns(conn):
            return []
        with transaction(conn):
            missing = _missing_columns(conn)  # again under the write lock: another worker may have migrated it
            for table, columns in missing.items():
                for name, decl in columns:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                if any(name == "trust" for name, _ in columns):
                    conn.execute(
                        f"UPDATE {table} SET trust = ? WHERE substr(source, 1, 7) = 'import:'", (int(Trust.TRUSTED),)
                    )
    return [f"{table}.{name}" for table, columns in missing.items() for name, _ in columns]

