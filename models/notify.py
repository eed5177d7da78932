"""Change notification between processes and machines: a writer announces a change inside its transaction, every
subscriber wakes at once, and polling stays the fallback.

A notification says "look now", never what changed: a subscriber re-reads the state it cares about (a generation
counter) after waking, so a lost, duplicated or spurious one costs at most one cheap read. Subscribers keep polling
at their own interval too, so a notification that never arrives only delays a change to the next poll.

**PostgreSQL** (replicas on several machines): `publish` runs `pg_notify` inside the write transaction; the server
delivers it when, and only if, the transaction commits, after the commit is visible. A `Subscription` holds its own
autocommit psycopg connection that `LISTEN`s, on a background thread; when the server goes away it reconnects
with backoff, and reports a wake-up after every (re)connect, because notifications sent while it was disconnected
are lost for good. LISTEN needs a session of its own: behind a transaction-pooling PgBouncer it hears nothing (point
the URL at the server, or live with the poll).

**SQLite** (one machine, several processes): there is no server to tell. Each subscriber binds a datagram socket
(AF_UNIX, SOCK_DGRAM) in a directory beside the database file (`state.db-notify/`); `publish` registers a
callback that runs once the write has committed (models/db.py `after_commit`: SQLAlchemy's "commit" event fires
before SQLite commits, so a reader woken from it could still read the old rows) and sends one empty datagram,
non-blocking, to every socket of the channel there. A socket nobody holds (its process was killed) refuses the
datagram and is unlinked by the sender; a full queue means that subscriber has a wake-up waiting already. Why this
and not a faster file poll: a stat() poll every 20 ms is 50 wake-ups a second in every worker, forever (0.5% of a
core each, measured), and still averages 10 ms late; a waiting socket looks up every CHECK_S only (0.02%), wakes in
about half a millisecond, and the cost lands on the rare writer: a listdir and one sendto per subscriber (tens of
microseconds for 8; the numbers and how they were measured: docs/architecture.md). Addresses longer
than AF_UNIX allows (108 bytes) go through /proc/self/fd/<directory fd>/ (Linux). A subscriber that finds its
socket file gone (someone cleaned the directory) binds a new one and reports a wake-up, as a PostgreSQL subscriber
does after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import secrets
import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, text
from sqlalchemy.engine import URL

from models.db import Database, after_commit, parse_url, redact

log = logging.getLogger("adaptserve")

REGISTRY = "adaptserve_registry"  # promote, rollback, register, delete: every serving worker reloads its champions

_CHANNEL = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # a PostgreSQL identifier, and a safe file-name part
_ADDRESS_MAX = 107  # bytes of an AF_UNIX address without its NUL (Linux; macOS allows 103)
CHECK_S = 0.5  # how often a listener looks up from waiting: closed? socket file still there?
RETRY_MAX_S = 5.0  # longest pause between two reconnect attempts


def publish(conn: Connection, channel: str) -> None:
    """Announce a change on `channel` from inside the write transaction `conn`; delivered only if it commits.

    PostgreSQL: `pg_notify`, delivered by the server at commit (identical ones of one transaction fold into one).
    SQLite: one datagram to each subscriber once the transaction has committed; `conn` must be the connection of an
    open `Database.write()` or `transact()` (the only place the commit is known), else DatabaseError.
    """
    _checked(channel)
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})
        return
    directory = socket_dir(conn.engine.url)
    after_commit(conn, (__name__, channel), lambda: send(directory, channel))


def _checked(channel: str) -> str:
    if not _CHANNEL.fullmatch(channel):
        raise ValueError(f"channel {channel!r}: use 1-63 lowercase letters, digits or '_', not starting with a digit")
    return channel


# --------------------------------------------------------------------------------------- SQLite: datagram sockets


def socket_dir(url: str | URL) -> Path:
    """Where the subscribers of an SQLite database keep their sockets: `<database file>-notify/`, beside it."""
    path = Path(str(parse_url(url).database)).resolve()
    return path.with_name(path.name + "-notify")


@contextmanager
def _addressable(directory: Path, name_len: int) -> Iterator[str]:
    """A prefix that makes `directory`'s entries (names up to `name_len` bytes) short enough to be AF_UNIX
    addresses: the directory itself, else /proc/self/fd/<fd of it>/ (Linux resolves it like the real path)."""
    plain = f"{directory}/"
    if len(os.fsencode(plain)) + name_len <= _ADDRESS_MAX:
        yield plain
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/"
    finally:
        os.close(fd)


def send(directory: Path, channel: str) -> int:
    """One datagram to every subscriber socket of `channel` in `directory`, without blocking; sockets nobody holds
    any more (their process died) are unlinked. How many subscribers it reached."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(f"{channel}.") and n.endswith(".sock")]
    except FileNotFoundError:  # nobody ever subscribed
        return 0
    if not names:
        return 0
    reached = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            _addressable(directory, max(map(len, names), default=0)) as prefix:
        for name in names:
            try:
                sock.sendto(b"", socket.MSG_DONTWAIT, prefix + name)
                reached += 1
            except BlockingIOError:  # its queue is full: it has wake-ups waiting already
                reached += 1
            except ConnectionRefusedError:  # a file nobody has bound: left by a killed subscriber
                (directory / name).unlink(missing_ok=True)
            except FileNotFoundError:  # closed just now
                pass
            except OSError as err:  # e.g. no write permission: that subscriber will notice at its next poll
                log.warning("notify %s: cannot reach %s: %s", channel, directory / name, err)
    return reached


class _Listener(Protocol):
    def run(self, connected: Callable[[], None], wake: Callable[[], None], closed: threading.Event) -> None:
        """Connect, call `connected()`, then `wake()` per notification until `closed` is set or the connection
        ends (return or raise: the caller connects again)."""

    def stop(self) -> None:
        """Make a running `run` look up from waiting now (it still returns only once `closed` is set)."""


class _SocketListener:
    """SQLite: one bound datagram socket in the database's notify directory while it runs."""

    def __init__(self, directory: Path, channel: str) -> None:
        self.directory, self.channel = directory, channel
        self._name: str | None = None

    def run(self, connected: Callable[[], None], wake: Callable[[], None], closed: threading.Event) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{self.channel}.{os.getpid()}.{secrets.token_hex(4)}.sock"
        path = self.directory / name
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            with _addressable(self.directory, len(name)) as prefix:
                sock.bind(prefix + name)
            inode = os.stat(path).st_ino
            try:
                sock.setblocking(False)
                self._name = name
                connected()
                while not closed.is_set():
                    if not select.select([sock], [], [], CHECK_S)[0]:
                        if not _same_file(path, inode):
                            log.warning("notify %s: %s was removed; binding a new socket", self.channel, path)
                            return
                        continue
                    _drain(sock)
                    if not closed.is_set():
                        wake()
            finally:
                self._name = None
                if _same_file(path, inode):
                    path.unlink(missing_ok=True)

    def stop(self) -> None:
        name = self._name
        if name is not None:
            send_one(self.directory, name)


def send_one(directory: Path, name: str) -> None:
    """One datagram to the socket `name` in `directory` (a listener waking itself); nobody there is fine."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, _addressable(directory, len(name)) as prefix:
        try:
            sock.sendto(b"", socket.MSG_DONTWAIT, prefix + name)
        except OSError:
            pass


def _drain(sock: socket.socket) -> None:
    """Read every queued datagram: a burst of notifications is one wake-up."""
    while True:
        try:
            sock.recv(64)
        except BlockingIOError:
            return


def _same_file(path: Path, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except FileNotFoundError:
        return False


# -------------------------------------------------------------------------------------------- PostgreSQL: LISTEN


class _PostgresListener:
    """PostgreSQL: its own autocommit psycopg connection that LISTENs on the channel while it runs."""

    def __init__(self, url: URL, channel: str) -> None:
        self.channel, self.url = channel, url
        # the connect arguments SQLAlchemy itself would give psycopg for this URL (host, port, sslmode, ...)
        args, kwargs = url.get_dialect()().create_connect_args(url)
        self._args = list(args)
        # a server gone without a word (host down, network cut) is noticed by TCP keepalives within ~25 s
        self._kwargs = {"connect_timeout": 5, "application_name": f"adaptserve-notify {channel}", "keepalives": 1,
                        "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3, **kwargs}

    def run(self, connected: Callable[[], None], wake: Callable[[], None], closed: threading.Event) -> None:
        import psycopg  # libpq: only a PostgreSQL subscriber loads it (an SQLite deployment never does)
        from psycopg import sql

        with psycopg.connect(*self._args, **self._kwargs, autocommit=True) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            connected()
            while not closed.is_set():
                # notifications that arrive between two calls wait in psycopg's backlog (3.2+): none is lost
                for _ in conn.notifies(timeout=CHECK_S):
                    if closed.is_set():
                        return
                    wake()

    def stop(self) -> None:
        """Nothing to interrupt: `notifies` looks up every CHECK_S."""


# ------------------------------------------------------------------------------------------------- subscription


class Subscription:
    """Wakes its waiter when a committed write published on `channel` (PostgreSQL or SQLite), on a thread of its own.

    One waiter: `wait()` from a thread or `await wait_async()` from an event loop; either returns True when woken
    since the last call (a notification, or a (re)connect: anything may have changed while it was not listening),
    False when the timeout passed first. Wake-ups that arrive while nobody waits fold into one. Build it in the
    process that uses it (threads and sockets do not survive a fork); `close()` when done.
    """

    def __init__(self, database: Database | str | URL, channel: str) -> None:
        url = database.url if isinstance(database, Database) else parse_url(database)
        self.channel, self.where = _checked(channel), redact(url)
        self._listener: _Listener = (_PostgresListener(url, channel) if url.get_backend_name() == "postgresql"
                                     else _SocketListener(socket_dir(url), channel))
        self.connects = 0  # successful (re)connects so far, each reported as a wake-up
        self._connected = False
        self._failures = 0  # failed connects (or connections lost) in a row
        self._cond = threading.Condition()
        self._pending = False
        self._event: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"notify-{channel}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Subscription({self.where!r}, {self.channel!r}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        """Listening now (False while it reconnects: only polling notices changes then)."""
        return self._connected

    def wait(self, timeout: float | None = None) -> bool:
        """Block until woken (True) or `timeout` seconds passed (False); True at once if a wake-up is waiting."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._closed.is_set(), timeout)
            woken, self._pending = self._pending, False
        return woken

    async def wait_async(self, timeout: float | None = None) -> bool:
        """`wait` for an event loop: the listener thread sets an asyncio.Event through call_soon_threadsafe."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._pending:
                self._pending = False
                return True
            if self._event is None or self._event[0] is not loop:
                self._event = (loop, asyncio.Event())
            event = self._event[1]
            event.clear()  # a set() left from an earlier wake-up, already taken through _pending
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        with self._cond:
            woken, self._pending = self._pending, False
        return woken

    def close(self, timeout: float = 2.0) -> None:
        """Stop listening (a SQLite subscriber removes its socket); waiters return False."""
        self._closed.set()
        self._listener.stop()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            if self._pending:  # the waiter has not looked since the last one: one wake-up covers both
                return
            self._pending = True
            self._cond.notify_all()
            target = self._event
        if target is not None:
            try:
                target[0].call_soon_threadsafe(target[1].set)
            except RuntimeError:  # that loop is closed: nobody awaits there any more
                pass

    def _on_connect(self) -> None:
        self.connects += 1
        self._connected = True
        if self._failures:
            log.info("notify %s: listening on %s again", self.channel, self.where)
        self._failures = 0
        self._wake()  # what was sent while not listening is lost: the waiter must re-read

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._listener.run(self._on_connect, self._wake, self._closed)
            except Exception as err:  # the server went away, refused us, or the directory is unusable: retry
                if self._closed.is_set():
                    break
                self._failures += 1  # _on_connect resets it: a connection lost after working counts 1
                (log.warning if self._failures == 1 else log.debug)(
                    "notify %s on %s: %s; polling only until it listens again (attempt %d)", self.channel,
                    self.where, " ".join(str(err).split()) or type(err).__name__, self._failures)
            finally:
                self._connected = False
            self._closed.wait(_pause(self._failures))


def _pause(failures: int) -> float:
    """Seconds before the next connect: none after a clean end, then 0.05, 0.1, ... up to RETRY_MAX_S, jittered so
    that every worker of every replica does not knock on a restarted server in step."""
    if failures == 0:
        return 0.0
    return min(RETRY_MAX_S, 0.05 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
