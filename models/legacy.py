"""Reading the SQLite files the stores kept before the state database (`<home>/labels.db`, `inputs.db`, `jobs.db`,
`capture.db`, `monitor.db`, `registry.db`), for their one-time import: one implementation for every store.

Each store copies a legacy file's rows inside one write transaction of its own lock, skipping what the database
already holds, and only then retires the file (`retire`: renamed `<name>.imported`, with any -wal / -shm left
over, so SQLite still pairs them if anyone opens the file). A process killed between the commit and the rename
finds the rows there next time and copies nothing twice; two processes opening at once run one after the other,
and the second finds the file gone.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

IMPORTED_SUFFIX = ".imported"


def open_legacy(path: Path) -> sqlite3.Connection:
    """The old file, read-write: mode=rw never creates an empty file if it went away meanwhile, and rw, not ro, lets a
    left-over WAL replay. sqlite3.OperationalError when the file is gone."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=30)


def read_rows(path: Path, table: str, columns: tuple[str, ...], order: str) -> list[dict[str, Any]] | None:
    """Every row of `table` in the old file as {column: value}, in `order`; None when the file is gone by now.

    A file without the table (created but never written) has no rows.
    """
    try:
        old = open_legacy(path)
    except sqlite3.OperationalError:
        if not path.exists():
            return None
        raise
    with closing(old):
        if old.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() is None:
            return []
        cursor = old.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")
        return [dict(zip(columns, row, strict=True)) for row in cursor]


def retire(path: Path) -> str:
    """`<name>` (and a left-over -wal / -shm) -> `<name>.imported`; another process may have renamed it already.
    Returns the new name."""
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            path.with_name(path.name + suffix).rename(path.with_name(path.name + IMPORTED_SUFFIX + suffix))
    return path.name + IMPORTED_SUFFIX
