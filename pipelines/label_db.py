"""The label store's tables in the state database (`models.db`), and the one-time import of a legacy
``<home>/labels.db``.

Three tables, created by the Alembic revision 0003_labels: ``labels`` (one row per example), ``label_events`` (every
labelling, the audit trail) and ``label_conflicts`` (every contradiction). Every write of the label store holds
LABELS_LOCK and is durable: labels are people's work.

Legacy homes: a labels.db (the SQLite file the store kept before the state database) is copied in on the first open
of a store for that home, in one write transaction, then renamed ``labels.db.imported`` (its -wal and -shm too).
The file is read, never altered, and may be in any shape the store ever wrote: the columns added since the first
version (trust, sender, outcome) are filled in for rows that lack them as the old in-place migration filled them
(an import, source "import:...", was TRUSTED, anything else UNTRUSTED; the sender "legacy"). An example another
home's file brought first keeps that label; a different one from this file becomes a contradiction (see
`_new_labels`); every event is kept. A copy that fails part-way leaves the database and the file as they were. The
copy is skipped when the file's newest event is already in the database (a process killed between the commit and
the rename, two processes opening at once).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    Table,
    Text,
    insert,
    select,
    text,
)

from models.db import Database, metadata, redact
from models.legacy import IMPORTED_SUFFIX, open_legacy, retire
from monitoring.tables import capture_records
from pipelines.label_trust import Trust

log = logging.getLogger("adaptserve.labels")

LABELS_LOCK = "labels"  # every label store writer, of every home sharing the database, queues on this one
LEGACY_FILE = "labels.db"
LEGACY_SENDER = "legacy"  # the sender of rows stored before senders were recorded
_HAS_PREDICTION, _PENDING = text("prediction_id IS NOT NULL"), text("resolved_at IS NULL")  # partial indexes
_BATCH = 500  # old rows per insert: bounded memory (each row holds a PNG), and few round trips

labels = Table(
    "labels", metadata,
    Column("id", Text, primary_key=True),  # example_id(adapter, pixels)
    Column("adapter", Text, nullable=False),
    Column("label", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("prediction_id", Text),
    Column("split", Text),  # forced by an import's train/ or val/test/ folder; NULL: the hash decides
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("png", LargeBinary, nullable=False),
    Column("trust", Integer, nullable=False),
    Column("sender", Text, nullable=False),
    CheckConstraint("split IS NULL OR split IN ('train', 'holdout')", name="split"),
    Index("ix_labels_adapter_updated_at", "adapter", "updated_at"),
    Index("ix_labels_prediction_id", "prediction_id", sqlite_where=_HAS_PREDICTION, postgresql_where=_HAS_PREDICTION),
)  # fmt: skip

label_events = Table(
    "label_events", metadata,
    Column("seq", Integer, primary_key=True),  # labelling order
    Column("label_id", Text, nullable=False),
    Column("adapter", Text, nullable=False),
    Column("label", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("prediction_id", Text),
    Column("at", Float, nullable=False),
    Column("trust", Integer, nullable=False),
    Column("sender", Text, nullable=False),
    Column("outcome", Text),  # NULL for events logged before outcomes were recorded
    Index("ix_label_events_label_id", "label_id"),
)  # fmt: skip

label_conflicts = Table(
    "label_conflicts", metadata,
    Column("seq", Integer, primary_key=True),
    Column("label_id", Text, nullable=False),
    Column("adapter", Text, nullable=False),
    Column("kept_label", Text, nullable=False),
    Column("kept_trust", Integer, nullable=False),
    Column("offered_label", Text, nullable=False),
    Column("trust", Integer, nullable=False),
    Column("source", Text, nullable=False),
    Column("sender", Text, nullable=False),
    Column("prediction_id", Text),
    Column("at", Float, nullable=False),
    Column("resolution", Text),  # NULL: pending
    Column("resolved_label", Text),
    Column("resolved_at", Float),
    CheckConstraint("resolution IS NULL OR resolution IN ('outranked', 'replaced', 'settled')", name="resolution"),
    Index("ix_label_conflicts_pending", "label_id", sqlite_where=_PENDING, postgresql_where=_PENDING),
    Index("ix_label_conflicts_adapter_at", "adapter", "at"),
)  # fmt: skip

# What a legacy file's row lacks, as SQLite expressions over the old row (what the old in-place migration stored)
_IMPORT_TRUST = f"CASE WHEN substr(source, 1, 7) = 'import:' THEN {int(Trust.TRUSTED)} ELSE {int(Trust.UNTRUSTED)} END"
_ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "labels": (("trust", _IMPORT_TRUST), ("sender", f"'{LEGACY_SENDER}'")),
    "events": (("trust", _IMPORT_TRUST), ("sender", f"'{LEGACY_SENDER}'"), ("outcome", "NULL")),
}
# legacy table -> (new table, its columns in the old file; seq is renumbered in the new table, in the old order)
_LEGACY_TABLES: dict[str, tuple[Table, tuple[str, ...]]] = {
    "labels": (labels, tuple(c.name for c in labels.columns)),
    "events": (label_events, tuple(c.name for c in label_events.columns if c.name != "seq")),
    "conflicts": (label_conflicts, tuple(c.name for c in label_conflicts.columns if c.name != "seq")),
}


# ------------------------------------------------------------------------------------------------ legacy import


def import_legacy(database: Database, home: Path) -> list[str]:
    """Copy `<home>/labels.db` into `database` once and rename it (see the module docstring); a no-op (one stat)
    when the home has none. Returns the columns the file lacked ("labels.trust", ...), filled in on the copy."""
    path = home / LEGACY_FILE
    if not path.is_file():
        return []
    with database.write(lock=LABELS_LOCK) as conn:
        if not path.is_file():  # another process imported it while this one waited for the lock
            return []
        with closing(open_legacy(path)) as old:
            missing = _missing_columns(old)
            copied = 0 if _already_imported(conn, old) else _copy(conn, old)
    retire(path)
    log.info("imported %d label(s) from %s into %s; the file is now %s%s", copied, path, redact(database.url),
             path.name, IMPORTED_SUFFIX)
    return [f"{table}.{name}" for table, columns in missing.items() for name in columns]


def _tables(old: sqlite3.Connection) -> set[str]:
    return {name for (name,) in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _missing_columns(old: sqlite3.Connection) -> dict[str, list[str]]:
    """The added columns each legacy table lacks (a table that is not there lacks nothing: it has no rows)."""
    present = _tables(old)
    missing = {}
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in old.execute(f"PRAGMA table_info({table})")} if table in present else set()
        if table in present and (todo := [name for name, _ in columns if name not in have]):
            missing[table] = todo
    return missing


def _already_imported(conn: Connection, old: sqlite3.Connection) -> bool:
    """Whether the file's newest event is in the database: the copy is one transaction, so then all of it is."""
    if "events" not in _tables(old):
        return False
    newest = old.execute("SELECT label_id, label, at FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    if newest is None:
        return False
    e = label_events.c  # `at` is the float time.time() gave: another file's event never has the same one
    found = conn.execute(select(e.seq).where(e.label_id == newest[0], e.label == newest[1], e.at == newest[2])
                         .limit(1)).first()
    return found is not None


def _copy(conn: Connection, old: sqlite3.Connection) -> int:
    """Every row of the old file, table by table in its old order; returns how many labels were new here."""
    present = _tables(old)
    copied = 0
    for name, (table, columns) in _LEGACY_TABLES.items():
        if name not in present:  # conflicts came later than labels and events
            continue
        for batch in _rows(old, name, columns):
            if table is labels:
                batch = _new_labels(conn, batch)
                copied += len(batch)
            if batch:
                conn.execute(insert(table), batch)
    return copied


def _new_labels(conn: Connection, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The old labels of examples the database has none of yet; another home's label of the same example is kept, and
    a different label from this file is filed as a contradiction: outranked when its trust is lower, else pending (a
    higher-trust label settles it, as any)."""
    stored = {row.id: row for row in conn.execute(
        select(labels.c.id, labels.c.label, labels.c.trust).where(labels.c.id.in_([r["id"] for r in batch])))}
    for row in batch:
        kept = stored.get(row["id"])
        if kept is None or kept.label == row["label"]:
            continue
        outranked = row["trust"] < kept.trust
        resolved = {"resolution": "outranked", "resolved_label": kept.label, "resolved_at": row["updated_at"]}
        conn.execute(insert(label_conflicts).values(
            label_id=row["id"], adapter=row["adapter"], kept_label=kept.label, kept_trust=kept.trust,
            offered_label=row["label"], trust=row["trust"], source=row["source"], sender=row["sender"],
            prediction_id=row["prediction_id"], at=row["updated_at"], **(resolved if outranked else {})))
    return [row for row in batch if row["id"] not in stored]


def _rows(old: sqlite3.Connection, table: str, columns: tuple[str, ...]) -> Iterator[list[dict[str, Any]]]:
    """The old table's rows as dicts of `columns`, in batches; a column the file lacks gets its _ADDED_COLUMNS
    value."""
    have = {row[1] for row in old.execute(f"PRAGMA table_info({table})")}
    fill = dict(_ADDED_COLUMNS.get(table, ()))
    exprs = [c if c in have else f"{fill[c]} AS {c}" for c in columns]
    order = "rowid" if table == "labels" else "seq"
    cursor = old.execute(f"SELECT {', '.join(exprs)} FROM {table} ORDER BY {order}")
    while batch := cursor.fetchmany(_BATCH):
        yield [dict(zip(columns, row, strict=True)) for row in batch]


def measured_accuracy(database: Database, adapter: str, version: int) -> dict[str, Any]:
    """What the labels say of one version's served predictions: `{"accuracy", "labels"}`, over every captured
    prediction of it that a label names (accuracy None without one). The label-free estimate's ground truth."""
    served = capture_records.c
    query = (select(served.label, labels.c.label).join(labels, labels.c.prediction_id == served.prediction_id)
             .where(served.adapter == adapter, served.version == int(version)))
    with database.read() as conn:
        pairs = conn.execute(query).all()
    right = sum(1 for predicted, label in pairs if predicted == label)
    return {"accuracy": round(right / len(pairs), 4) if pairs else None, "labels": len(pairs), "version": int(version)}
