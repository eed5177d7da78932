"""Schema migrations of the state database (Alembic, configured in code: no alembic.ini at run time).

The revisions live in `versions/` beside this file and ship with the package. `upgrade()` is what
`adaptserve db upgrade` runs; `check()` is what a service runs before it starts: a database behind this adaptserve's
head (or empty) is refused with the command that fixes it, one ahead of it (written by a newer adaptserve) with a
different sentence, since upgrading the database cannot help there.

Invariant: an upgrade is one write transaction (`Database.write()`): two processes upgrading at once run one after
the other, and a failed or killed upgrade leaves the schema where it was (SQLite and PostgreSQL both run DDL in
transactions).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Column, Connection, String, Table, Text, select
from sqlalchemy.engine import URL

from models import settings
from models.db import Database, DatabaseError, metadata, redact

SCRIPT_LOCATION = Path(__file__).resolve().parent
UPGRADE_COMMAND = "adaptserve db upgrade"

# What 0001_baseline creates, for reading it back (the revision itself names its columns: revisions are frozen)
info_table = Table(
    "adaptserve_info", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text(), nullable=False),
)


class SchemaError(DatabaseError):
    """The database's schema is not the one this adaptserve was built for; the message says what to run."""


def config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged revisions; `connection` (in a transaction) is what env.py uses."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this adaptserve knows: the one its stores need."""
    found = ScriptDirectory.from_config(config()).get_current_head()
    if found is None:
        raise RuntimeError(f"no revisions under {SCRIPT_LOCATION / 'versions'}")
    return found


@contextmanager
def _opened(target: Database | str | URL) -> Iterator[Database]:
    """`target` itself when it is a Database; else a Database on that URL, disposed afterwards."""
    if isinstance(target, Database):
        yield target
        return
    database = Database(target)
    try:
        yield database
    finally:
        database.dispose()


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current(target: Database | str | URL) -> str | None:
    """The revision the database is at; None when it has no adaptserve schema yet."""
    with _opened(target) as database, database.read() as conn:
        return _revision(conn)


def _status(revision: str | None) -> str:
    """"head" (usable), "behind" (empty or older: `adaptserve db upgrade` fixes it) or "newer" (unknown here)."""
    if revision == head():
        return "head"
    if revision is None:
        return "behind"
    try:
        ScriptDirectory.from_config(config()).get_revision(revision)
    except CommandError:
        return "newer"
    return "behind"


def _schema_error(database: Database, revision: str | None, status: str) -> SchemaError:
    where = f"database {redact(database.url)} is at revision {revision or 'none (empty)'}"
    if status == "newer":
        return SchemaError(f"{where}, written by a newer adaptserve (this one knows revisions up to {head()}): "
                           f"upgrade adaptserve, or point {settings.env_name('database_url')} at another database")
    return SchemaError(f"{where}; this adaptserve needs {head()}: run `{UPGRADE_COMMAND}`")


def check(target: Database | str | URL) -> str:
    """The revision, when it is this adaptserve's head; else SchemaError saying what to run."""
    with _opened(target) as database:
        revision = current(database)
        status = _status(revision)
        if status != "head":
            raise _schema_error(database, revision, status)
    return str(revision)


def upgrade(target: Database | str | URL) -> tuple[str | None, str]:
    """Bring the database to head in one write transaction; (revision before, revision after).

    A database at head is left as it is; one written by a newer adaptserve raises SchemaError (nothing to do here).
    """
    with _opened(target) as database, database.write() as conn:
        before = _revision(conn)
        status = _status(before)
        if status == "newer":
            raise _schema_error(database, before, status)
        if status == "behind":
            command.upgrade(config(conn), "head")
        return before, str(_revision(conn))


def info(target: Database | str | URL) -> dict[str, str]:
    """The adaptserve_info rows (schema_created_at, schema_created_by); empty before the first upgrade."""
    with _opened(target) as database, database.read() as conn:
        if not conn.dialect.has_table(conn, info_table.name):
            return {}
        return {key: value for key, value in conn.execute(select(info_table.c.key, info_table.c.value))}
