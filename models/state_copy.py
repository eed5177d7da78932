"""Copy one home's state, every row of the state database and every artifact object, into another database and
artifact store: what `adaptserve db copy` runs to move an embedded home (SQLite + a local directory) onto
PostgreSQL + an S3-compatible store, so that replicas can share it.

Invariants:
- The source is only read: every table in one read transaction (one consistent snapshot), every object fetched and
  verified by models.artifact_store before it is stored again.
- Objects first, rows after. Objects are listed inside the source's snapshot, so every object a copied row can name
  (a row is committed after its object is stored) reaches the destination before the row does. Objects are
  immutable and keyed by their sha256: a rerun skips the ones already there.
- Rows in ONE destination write transaction, inserted in batches of at most `batch_rows` rows and BATCH_BYTES bytes
  (memory stays bounded: labels and inputs hold PNGs, capture records embeddings). A copy killed part-way (kill -9,
  a lost connection) leaves the destination's tables as the upgrade left them, and a rerun starts over.
- Only into an empty destination: a table holding a row that a fresh upgrade does not seed is refused (the
  message names the tables and their counts), before anything is written and again inside the write transaction,
  which on PostgreSQL also locks every copied table against other writers until it commits.
- Rows keep their ids. Afterwards each id counter (PostgreSQL's sequences, SQLite's sqlite_sequence) restarts past
  the highest id the source used, counting the ids of deleted rows SQLite remembers: a deleted schedule's id is not
  handed out again.
- The rows an upgrade seeds (adaptserve_info, the schedules generation, the feedback input counts) are replaced by
  the source's, so every copied table holds the same rows on both sides. Alembic's version table is not copied:
  the destination has its own from the upgrade.
"""

from __future__ import annotations

import functools
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Integer, MetaData, Table, delete, func, insert, inspect, select, text, tuple_

from models import migrations
from models.artifact_store import ArtifactError, ArtifactStore, check_digest
from models.db import Database, metadata, redact
from models.derived import TABLES as _DERIVED_TABLES  # noqa: F401 - registers them: no store db copy opens does

CRASH_ENV = "ADAPTSERVE_COPY_CRASH_AFTER_BATCHES"  # test-only: SIGKILL after this many row batches (see _Batches)
VERSION_TABLE = "alembic_version"
BATCH_ROWS = 500
BATCH_BYTES = 16 * 2**20
_FETCH_ROWS = 64  # rows read from the source at a time: an input row may hold a 512 KiB image

T = TypeVar("T")
Progress = Callable[[str, int, int], None]  # (what: "objects" or "rows", done, total)


class CopyError(RuntimeError):
    """The copy cannot go ahead as asked; the message says why and what to do."""


class DestinationNotEmpty(CopyError):
    """The destination database already holds rows; `occupied` is {table: rows} (seeded rows not counted)."""

    def __init__(self, database: Database, occupied: dict[str, int]) -> None:
        self.occupied = occupied
        listed = ", ".join(f"{name} {n}" for name, n in occupied.items())
        super().__init__(f"destination {redact(database.url)} already holds rows ({listed}); no rows were written: "
                         f"db copy writes only into an empty database. To start over, {_start_over(database)}")


def _start_over(database: Database) -> str:
    if database.is_sqlite:
        return f"remove {database.url.database} or name another file"
    name = database.url.database
    return f"drop and recreate the database (`dropdb {name} && createdb {name}`) or pass --to-database an empty one"


@dataclass
class CopyReport:
    """What a copy did (or, with dry_run, would do)."""

    rows: dict[str, int]  # table -> rows in the source, every copied table in dependency order
    objects: int  # objects in the source store
    objects_copied: int  # of those, stored into the destination (dry run: the ones it lacks)
    bytes_copied: int
    destination_revision: str | None  # before the copy's upgrade (None: an empty database)
    sequences: dict[str, int] = field(default_factory=dict)  # "table.column" -> the next id it hands out
    occupied: dict[str, int] = field(default_factory=dict)  # dry run only: why a real run would refuse
    seconds: float = 0.0
    dry_run: bool = False


# ---------------------------------------------------------------------------------------------------- tables


def copied_tables() -> list[Table]:
    """Every table of `models.db.metadata` that a copy moves, parents before children; importing a store's module
    is what registers its tables, so the caller imports them all first."""
    return [table for table in metadata.sorted_tables if table.name != VERSION_TABLE]


@functools.cache
def seeded_keys() -> dict[str, frozenset[tuple[Any, ...]]]:
    """{table: primary keys of the rows a fresh `migrations.upgrade` writes}, read from a scratch SQLite database
    upgraded to head: the revisions themselves are the one place that knows what each seeds."""
    with tempfile.TemporaryDirectory(prefix="adaptserve-seed-") as tmp:
        scratch = Database(f"sqlite:///{Path(tmp) / 'seed.db'}")
        try:
            migrations.upgrade(scratch)
            with scratch.read() as conn:
                found = {name: _keys(conn, name) for name in inspect(conn).get_table_names() if name != VERSION_TABLE}
        finally:
            scratch.dispose()
    return {name: keys for name, keys in found.items() if keys}


def _keys(conn: Connection, name: str) -> frozenset[tuple[Any, ...]]:
    table = Table(name, MetaData(), autoload_with=conn)  # reflected: the scratch database, not what is imported
    return frozenset(tuple(row) for row in conn.execute(select(*table.primary_key.columns)))


def occupied(conn: Connection) -> dict[str, int]:
    """{table: rows beyond the seeded ones} of every copied table that has any; a table not created yet has none."""
    present, seeds, found = set(inspect(conn).get_table_names()), seeded_keys(), {}
    for table in copied_tables():
        if table.name not in present:
            continue
        n = conn.execute(select(func.count()).select_from(table)).scalar_one()
        if keys := seeds.get(table.name):
            n -= conn.execute(select(func.count()).select_from(table).where(_key_in(table, keys))).scalar_one()
        if n:
            found[table.name] = int(n)
    return found


def _key_in(table: Table, keys: Iterable[tuple[Any, ...]]) -> Any:
    columns = list(table.primary_key.columns)
    if len(columns) == 1:
        return columns[0].in_([key[0] for key in keys])
    return tuple_(*columns).in_(list(keys))


# --------------------------------------------------------------------------------------------------- objects


def list_objects(store: ArtifactStore) -> list[tuple[str, int]]:
    """Every object of `store` as (sha256, size in bytes), by digest. Anything else under the store's root
    (uploads in progress under tmp/, stray files) is not an object and is left out."""
    prefix = f"{store.root}/sha256/"
    found = store.fs.find(prefix.rstrip("/"), detail=True)
    objects = []
    for path, info in found.items():
        digest = path.rsplit("/", 1)[-1]
        if path.startswith(prefix) and _is_digest(digest) and path == store.key(digest):
            objects.append((digest, int(info.get("size") or 0)))
    return sorted(objects)


def _is_digest(name: str) -> bool:
    try:
        check_digest(name)
    except ValueError:
        return False
    return True


def copy_objects(source: ArtifactStore, dest: ArtifactStore, objects: list[tuple[str, int]],
                 progress: Progress | None = None) -> tuple[int, int]:
    """Store every object the destination lacks, each verified on both ends; (objects copied, bytes copied)."""
    copied = size = 0
    with tempfile.TemporaryDirectory(prefix="adaptserve-copy-") as tmp:
        for done, (digest, nbytes) in enumerate(objects, 1):
            if not reach(dest, dest.exists, digest):
                path = source.get_file(digest, Path(tmp) / digest)  # hashed on the way: a corrupt object stops here
                stored = reach(dest, dest.put_file, path)  # read back and hashed there before it becomes visible
                if stored != digest:
                    raise CopyError(f"object sha256:{digest} changed on its way to {dest.url} (sha256:{stored})")
                path.unlink()
                copied, size = copied + 1, size + nbytes
            if progress:
                progress("objects", done, len(objects))
    return copied, size


def reach(store: ArtifactStore, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` on a store; whatever the store's client raises (a botocore error for missing credentials or an
    endpoint that does not answer, an OSError for a missing bucket) becomes a CopyError naming the store."""
    try:
        return call(*args)
    except ArtifactError:
        raise
    except Exception as err:  # the S3 client's errors are its own classes (botocore), not OSError
        raise CopyError(f"artifact store {store.url}: {type(err).__name__}: {err}") from err


# ------------------------------------------------------------------------------------------------------ rows


class _Batches:
    """Inserts batches into the destination, counts them and reports progress; CRASH_ENV=N SIGKILLs the process
    right after the N-th batch (inside the transaction), so a test can prove a killed copy leaves no rows."""

    def __init__(self, conn: Connection, total: int, progress: Progress | None) -> None:
        self.conn, self.total, self.progress = conn, total, progress
        self.done = self.count = 0
        self.crash_at = int(os.environ.get(CRASH_ENV) or 0)

    def insert(self, table: Table, rows: list[dict[str, Any]]) -> None:
        self.conn.execute(insert(table), rows)
        self.count, self.done = self.count + 1, self.done + len(rows)
        if self.progress:
            self.progress("rows", self.done, self.total)
        if self.count == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _copy_table(src: Connection, table: Table, batches: _Batches, batch_rows: int) -> None:
    """Every row of `table` in primary-key order, in batches of at most batch_rows rows and BATCH_BYTES bytes."""
    query = select(table).order_by(*table.primary_key.columns).execution_options(yield_per=_FETCH_ROWS)
    batch: list[dict[str, Any]] = []
    size = 0
    for row in src.execute(query):
        values = dict(row._mapping)
        batch.append(values)
        size += sum(len(v) for v in values.values() if isinstance(v, bytes | str)) + 8 * len(values)
        if len(batch) >= batch_rows or size >= BATCH_BYTES:
            batches.insert(table, batch)
            batch, size = [], 0
    if batch:
        batches.insert(table, batch)


def _high_water(src: Connection, table: Table, column: str) -> int:
    """The highest id the source used in `table.column`: its largest value, or SQLite's AUTOINCREMENT counter
    (sqlite_sequence, which remembers the ids of deleted rows) when that is higher."""
    high = int(src.execute(select(func.max(table.c[column]))).scalar_one() or 0)
    if src.dialect.name == "sqlite" and src.execute(text(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'")).first():
        used = src.execute(text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table.name}).scalar()
        high = max(high, int(used or 0))
    return high


def _reset_sequences(src: Connection, dst: Connection) -> dict[str, int]:
    """Move each id counter of the destination past the source's highest id (the rows came with their ids, which
    the counter did not see); {"table.column": the next id it hands out}."""
    moved = {}
    for table in copied_tables():
        for column in table.primary_key.columns:
            if isinstance(column.type, Integer) and (restart := _counter(dst, table, column.name)):
                high = _high_water(src, table, column.name)
                restart(high)
                moved[f"{table.name}.{column.name}"] = high + 1
    return moved


def _counter(dst: Connection, table: Table, column: str) -> Callable[[int], None] | None:
    """How to set the destination's id counter of `table.column` to a highest id: PostgreSQL's sequence behind the
    column, SQLite's sqlite_sequence row of an AUTOINCREMENT table; None where there is none (a plain SQLite rowid
    table takes max + 1 by itself)."""
    if dst.dialect.name == "postgresql":
        name = dst.dialect.identifier_preparer.format_table(table)
        seq = dst.execute(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": name, "c": column}).scalar()
        if seq is None:
            return None

        def setval(high: int) -> None:
            dst.execute(text("SELECT setval(:s, :v, :called)"), {"s": seq, "v": max(high, 1), "called": high > 0})

        return setval
    if not table.dialect_options["sqlite"]["autoincrement"]:
        return None

    def set_sqlite_sequence(high: int) -> None:
        dst.execute(text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table.name})
        dst.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"), {"t": table.name, "v": high})

    return set_sqlite_sequence


def _copy_rows(src: Connection, dest: Database, rows: dict[str, int], batch_rows: int,
               progress: Progress | None) -> dict[str, int]:
    """Every row into `dest` in one write transaction (see the module docstring); the sequences it moved."""
    tables = copied_tables()
    with dest.write() as dst:
        if not dest.is_sqlite:  # EXCLUSIVE: readers go on, every other writer waits until this commits
            names = ", ".join(dst.dialect.identifier_preparer.format_table(t) for t in tables)
            dst.exec_driver_sql(f"LOCK TABLE {names} IN EXCLUSIVE MODE")
        if found := occupied(dst):  # another copy or a replica got there after the first look
            raise DestinationNotEmpty(dest, found)
        for table in reversed(tables):  # only seeded rows are left: the source's replace them
            if table.name in seeded_keys():
                dst.execute(delete(table))
        batches = _Batches(dst, sum(rows.values()), progress)
        for table in tables:
            _copy_table(src, table, batches, batch_rows)
        return _reset_sequences(src, dst)


# ------------------------------------------------------------------------------------------------------ copy


def copy_state(source: Database, source_store: ArtifactStore, dest: Database, dest_store: ArtifactStore, *,
               batch_rows: int = BATCH_ROWS, dry_run: bool = False, progress: Progress | None = None) -> CopyReport:
    """Copy every object of source_store into dest_store, then every row of source into dest (upgraded to head
    first); see the module docstring. With dry_run, only read both sides and report what a copy would do.

    Raises DestinationNotEmpty (nothing written) when dest holds rows, CopyError when source and dest are one
    database, migrations.SchemaError when dest was written by a newer adaptserve."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if source.url == dest.url:
        raise CopyError(f"the source and the destination are the same database ({redact(dest.url)}): the source is "
                        "what ADAPTSERVE_DATABASE_URL names, else <home>/state.db; to copy the embedded home, unset "
                        "ADAPTSERVE_DATABASE_URL for this command")
    started = time.monotonic()
    with source.read() as src:  # one snapshot for every table; its first statement fixes it on SQLite
        rows = {t.name: int(src.execute(select(func.count()).select_from(t)).scalar_one()) for t in copied_tables()}
        with dest.read() as conn:
            found = occupied(conn)
        revision = migrations.current(dest)
        objects = list_objects(source_store)
        report = CopyReport(rows, len(objects), 0, 0, revision, dry_run=dry_run)
        if dry_run:
            missing = [(d, n) for d, n in objects if not reach(dest_store, dest_store.exists, d)]
            report.objects_copied, report.bytes_copied = len(missing), sum(n for _, n in missing)
            report.occupied = found
        else:
            if found:
                raise DestinationNotEmpty(dest, found)
            reach(dest_store, dest_store.exists, "0" * 64)  # credentials and endpoint work, before anything is written
            migrations.upgrade(dest)
            report.objects_copied, report.bytes_copied = copy_objects(source_store, dest_store, objects, progress)
            report.sequences = _copy_rows(src, dest, rows, batch_rows, progress)
    report.seconds = time.monotonic() - started
    return report
