"""The state database: one SQLAlchemy 2 engine per URL (SQLite by default, PostgreSQL for a server) and its
transactions.

Every store keeps its tables in `metadata` and writes through `Database.write()`, which gives the guarantee the
per-store SQLite files gave before (BEGIN IMMEDIATE, WAL) on both backends:

- **Writers are serialized.** SQLite: `BEGIN IMMEDIATE` takes the file's write lock before the first statement.
  PostgreSQL: the transaction takes a transaction-scoped advisory lock (`pg_advisory_xact_lock`) keyed by the
  write's `lock` name, then runs at READ COMMITTED, so every statement sees what earlier writers of that lock
  committed. A read-modify-write inside one `write()` therefore never loses an update, and the default lock makes
  PostgreSQL as strict as SQLite.
- **All or nothing.** The body runs in one transaction; an exception rolls it back; a process killed (kill -9) in the
  middle leaves none of it (SQLite's WAL; PostgreSQL aborts a transaction whose client is gone).
- **Bounded waits.** Taking the write lock waits `timeout_s` and is retried `attempts` times; nothing has run yet,
  so a retry is safe. A body that can fail part-way on a serialization failure or deadlock (writers of different
  locks touching the same rows) goes through `transact()`, which re-runs it.

Readers (`read()`) never block writers: SQLite's WAL and PostgreSQL's REPEATABLE READ READ ONLY give the body one
consistent snapshot, and a write inside `read()` is refused on both backends.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from models import settings

T = TypeVar("T")
log = logging.getLogger("adaptserve")

# Constraint names fixed by convention, so a later revision can drop or alter one by name on both backends
metadata = MetaData(naming_convention={
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

DEFAULT_LOCK = "adaptserve"
_MODE = "adaptserve_mode"  # execution option read by the SQLite "begin" listener: "write", "read" or absent
_DURABLE = "adaptserve_durable"
# PostgreSQL SQLSTATEs worth a retry: serialization_failure, deadlock_detected, lock_not_available (lock_timeout)
_PG_RETRY = {"40001", "40P01", "55P03"}
# What each open write() transaction runs once it has committed (after_commit); a connection not in it is no write's
_AFTER_COMMIT: weakref.WeakKeyDictionary[Connection, dict[Hashable, Callable[[], None]]] = weakref.WeakKeyDictionary()


class DatabaseError(RuntimeError):
    """The state database cannot be used as configured; the message says what to change."""


class DatabaseBusy(DatabaseError):
    """The write lock stayed taken through every attempt (another writer held it longer than timeout_s each time)."""


def url_for_home(home: str | Path) -> str:
    """The default database of a state directory: SQLite at `<home>/state.db` (an absolute path)."""
    return f"sqlite:///{Path(home).absolute() / 'state.db'}"


def database_url(config: settings.Settings | None = None) -> str:
    """ADAPTSERVE_DATABASE_URL, else the SQLite file under ADAPTSERVE_HOME."""
    config = config or settings.load()
    return config.database_url or url_for_home(config.home.resolve())


def redact(url: str | URL) -> str:
    """The URL as it may be printed or logged: a password becomes ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def parse_url(url: str | URL) -> URL:
    """A SQLAlchemy URL of a supported backend; bare `postgresql://` means psycopg 3 (the driver adaptserve ships)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"{settings.env_name('database_url')}={redact(url)!r} is not an SQLAlchemy URL: use "
                            "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise DatabaseError(f"{settings.env_name('database_url')}={redact(parsed)!r}: unsupported backend "
                            f"{parsed.drivername!r}; use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB")
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise DatabaseError(f"{settings.env_name('database_url')}={redact(parsed)!r}: an in-memory SQLite database is "
                            "private to one connection; use sqlite:///PATH")
    return parsed


def _retryable(err: DBAPIError) -> bool:
    """A failure that a fresh transaction may not hit: SQLite's lock, PostgreSQL's conflicts and lock timeout."""
    sqlstate = getattr(err.orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _PG_RETRY
    message = str(err.orig).lower()
    return "database is locked" in message or "database is busy" in message


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key (Python's hash() differs per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class Database:
    """An engine on one URL with the transactions every store uses; build one per process (engines do not fork).

    timeout_s: how long one attempt waits for the write lock (SQLite busy_timeout, PostgreSQL lock_timeout);
    attempts: how many times write() tries to take it, and transact() to run its body, before giving up.
    """

    def __init__(self, url: str | URL, *, timeout_s: float = 30.0, attempts: int = 5) -> None:
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.url = parse_url(url)
        self.timeout_s, self.attempts = timeout_s, attempts
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine: Engine = self._sqlite_engine() if self.is_sqlite else self._postgres_engine()

    @classmethod
    def from_settings(cls, config: settings.Settings | None = None, **kwargs: Any) -> Database:
        """The database ADAPTSERVE_DATABASE_URL names (default: SQLite under ADAPTSERVE_HOME)."""
        return cls(database_url(config), **kwargs)

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r})"

    def dispose(self) -> None:
        """Close every pooled connection (end of a process, or a test)."""
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------------- engines

    def _sqlite_engine(self) -> Engine:
        Path(str(self.url.database)).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, connect_args={"timeout": self.timeout_s})
        busy_ms = int(self.timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own BEGIN handling off: the "begin" listener issues the one each transaction needs
            dbapi_conn.isolation_level = None
            dbapi_conn.execute(f"PRAGMA busy_timeout={busy_ms}")
            _ensure_wal(dbapi_conn, self.timeout_s)
            dbapi_conn.execute("PRAGMA foreign_keys=ON")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            options = conn.get_execution_options()
            mode = options.get(_MODE)
            # FULL: a commit survives power loss; NORMAL (durable=False) in WAL mode survives a process crash
            conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if options.get(_DURABLE, True) else 'NORMAL'}")
            conn.exec_driver_sql(f"PRAGMA query_only={1 if mode == 'read' else 0}")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "write" else "BEGIN")

        return engine

    def _postgres_engine(self) -> Engine:
        # pre_ping: a pooled connection the server dropped (restart, failover) is replaced, not handed out
        return create_engine(self.url, pool_pre_ping=True, isolation_level="READ COMMITTED",
                             connect_args={"connect_timeout": max(1, int(self.timeout_s))})

    # ---------------------------------------------------------------------------------------------- transactions

    @contextmanager
    def write(self, *, lock: str = DEFAULT_LOCK, durable: bool = True) -> Iterator[Connection]:
        """One write transaction: committed when the body returns, rolled back when it raises.

        Writers of the same `lock` run one at a time (on SQLite every writer: the lock is the file's). durable=False
        trades the fsync of each commit for speed (progress, heartbeats): a process crash still loses nothing, a
        power loss may lose the last commits. Raises DatabaseBusy when the lock stays taken through every attempt.
        """
        conn = self._begin_write(lock, durable)
        _AFTER_COMMIT[conn] = pending = {}
        try:
            yield conn
            conn.commit()
        except BaseException:
            pending.clear()  # nothing was committed: nothing to announce
            conn.rollback()
            raise
        finally:
            _AFTER_COMMIT.pop(conn, None)
            conn.close()
        _run_after_commit(pending)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read-only transaction on a consistent snapshot; never waits for a writer."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(**{_MODE: "read"})
            else:
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                yield conn

    def transact(self, work: Callable[[Connection], T], *, lock: str = DEFAULT_LOCK, durable: bool = True) -> T:
        """`work(conn)` inside write(), run again (a fresh transaction) on a serialization failure or deadlock.

        `work` must only touch the database: a retry re-runs all of it.
        """
        for attempt in range(1, self.attempts + 1):
            try:
                with self.write(lock=lock, durable=durable) as conn:
                    return work(conn)
            except DBAPIError as err:
                if not _retryable(err) or attempt == self.attempts:
                    raise
                _backoff(attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _begin_write(self, lock: str, durable: bool) -> Connection:
        """A connection inside a transaction that holds the write lock, after at most `attempts` tries."""
        for attempt in range(1, self.attempts + 1):
            conn = self.engine.connect()
            try:
                self._take_write_lock(conn, lock, durable)
                return conn
            except DBAPIError as err:
                conn.close()  # closing rolls back whatever the failed attempt began
                if not _retryable(err):
                    raise
            except BaseException:
                conn.close()
                raise
            if attempt < self.attempts:
                _backoff(attempt)
        raise DatabaseBusy(f"database {redact(self.url)}: the write lock {lock!r} stayed taken through "
                           f"{self.attempts} attempts of {self.timeout_s:g} s each")

    def _take_write_lock(self, conn: Connection, lock: str, durable: bool) -> None:
        if self.is_sqlite:
            # the "begin" listener reads these options and issues BEGIN IMMEDIATE: waits up to busy_timeout
            conn.execution_options(**{_MODE: "write", _DURABLE: durable}).begin()
            return
        conn.begin()
        # SET LOCAL: this transaction only; lock_timeout bounds the wait for the advisory lock (and for rows)
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(self.timeout_s * 1000)}")
        if not durable:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(lock)})


def after_commit(conn: Connection, key: Hashable, callback: Callable[[], None]) -> None:
    """Run `callback()` once the write() (or transact()) transaction of `conn` has committed; never if it rolls back.

    For work other processes must only see after the commit is visible to them (SQLite's change notification,
    models/notify.py): SQLAlchemy's own "commit" event fires before the database commits, so a reader it wakes
    could still read the old rows. One callback per `key` per transaction (a second one is dropped). A callback
    runs after the connection went back to the pool; an exception it raises is logged, not raised: the write
    itself succeeded.
    """
    pending = _AFTER_COMMIT.get(conn)
    if pending is None:
        raise DatabaseError("after_commit() needs the connection of an open Database.write() or transact(): only "
                            "there is the commit known")
    pending.setdefault(key, callback)


def _run_after_commit(callbacks: dict[Hashable, Callable[[], None]]) -> None:
    for key, callback in callbacks.items():
        try:
            callback()
        except Exception:  # the transaction committed: a failed announcement must not look like a failed write
            log.exception("after-commit callback %r failed", key)


def _ensure_wal(dbapi_conn: Any, timeout_s: float) -> None:
    """WAL mode (persistent in the file; readers never block the writer), set once per file.

    Switching a file to WAL needs its exclusive lock, and SQLite answers "database is locked" at once (no busy
    handler) while another connection writes: only switch when the file is not in WAL yet, retrying until
    timeout_s."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while str(dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        try:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            attempt += 1
            _backoff(attempt)


def _backoff(attempt: int) -> None:
    """Jittered exponential pause between attempts, so retrying writers do not collide again in step."""
    time.sleep(min(1.0, 0.01 * 2**attempt) * random.uniform(0.5, 1.0))
