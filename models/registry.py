"""Adapter registry: named LoRA adapters, integer versions, one champion per name.

Metadata lives in SQLite (``<home>/registry.db``), artifacts on disk under ``<home>/adapters/<name>/<version>/``.
Serving workers in other processes poll :meth:`AdapterRegistry.generation` to notice changes, so every write
must be crash-safe and visible atomically:

* an adapter is copied into a staging dir under ``<home>/tmp``, fsynced, validated and hashed there;
* inside one ``BEGIN IMMEDIATE`` transaction the staging dir is renamed into place and the row inserted, so a
  version number is picked under the DB write lock and an artifact dir without a row can only belong to a
  writer that died (it is swept on the next open);
* staging dirs carry an ``flock`` held for their whole life, so an open in another process never sweeps a live
  writer's staging dir, while a SIGKILLed writer's lock disappears with it.

``open_registry`` is the entry point; ``AdapterRegistry`` (models/registry_interface.py, with the records and
the name rules) is the interface a second backend will implement; the errors are in models/registry_errors.py and
the locked staging dirs in models/staging.py. This module is the SQLite backend.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models import settings
from models.adapter_dir import merge_metadata, validate_staged
from models.files import copy_tree_durable, ensure_dir, file_sha256, fsync_dir, hash_tree
from models.metadata import ADAPTER_FILES
from models.registry_errors import (
    AdapterNotFoundError,
    ChampionDeleteError,
    CorruptAdapterError,
    InvalidAdapterError,
    InvalidNameError,
    InvalidVersionError,
    RegistryError,
    RollbackError,
    UnsupportedBackendError,
)
from models.registry_interface import (
    MAX_VERSION,
    NAME_PATTERN,
    AdapterInfo,
    AdapterRegistry,
    AdapterVersion,
    Promotion,
    check_name,
    check_version,
)
from models.sqlite import connect, init_db, transaction
from models.staging import staging_dir, sweep

__all__ = [
    # the registry
    "CRASH_ENV", "CRASH_PHASES", "REQUIRED_FILES", "SQLiteRegistry", "default_home", "open_registry",
    # its contract (models.registry_interface) and errors (models.registry_errors): callers import them from here
    "MAX_VERSION", "NAME_PATTERN", "AdapterInfo", "AdapterRegistry", "AdapterVersion", "Promotion",
    "AdapterNotFoundError", "ChampionDeleteError", "CorruptAdapterError", "InvalidAdapterError", "InvalidNameError",
    "InvalidVersionError", "RegistryError", "RollbackError", "UnsupportedBackendError",
]

REQUIRED_FILES = ADAPTER_FILES
CRASH_ENV = "ADAPTSERVE_REGISTRY_CRASH_AT"
# Test-only SIGKILL points (see _crash_point); listed so tests can assert they cover every one.
CRASH_PHASES = (
    "after_copy",
    "after_rename",
    "before_commit",
    "promote_before_commit",
    "rollback_before_commit",
    "delete_before_commit",
    "delete_after_commit",
)
DB_FILE = "registry.db"
_MAX_LISTED = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    last_version INTEGER NOT NULL,
    champion INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES adapters(name),
    version INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL REFERENCES adapters(name),
    version INTEGER NOT NULL,
    previous INTEGER,
    action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    promoted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state (key, value) VALUES ('generation', 0);
-- the schema's version: bump it with any change to the tables above
PRAGMA user_version = 1;
"""


# --------------------------------------------------------------------------------------------- helpers


def _crash_point(phase: str) -> None:
    """Test-only fault injection: SIGKILL ourselves at ``phase`` so tests can prove crash consistency."""
    if os.environ.get(CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _shorten(items: list[Any]) -> str:
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


# --------------------------------------------------------------------------------------------- SQLite backend


class SQLiteRegistry(AdapterRegistry):
    """Registry in ``<home>/registry.db`` (WAL, synchronous=FULL) + ``<home>/adapters``.

    A fresh connection per operation keeps it safe across threads and forked workers; writes use
    BEGIN IMMEDIATE so concurrent writers serialize instead of failing on lock upgrade.
    """

    def __init__(self, home: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.home = self.home.expanduser().absolute()
        self.db_path = self.home / DB_FILE
        self.adapters_dir = self.home / "adapters"
        self.tmp_dir = self.home / "tmp"
        self._timeout = timeout
        ensure_dir(self.home)
        init_db(self.db_path, _SCHEMA, timeout)
        self._recover()

    def __repr__(self) -> str:
        return f"SQLiteRegistry(home={str(self.home)!r})"

    # ---------------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self.db_path, self._timeout)  # synchronous=FULL: a registered version survives power loss
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-query reads see one consistent WAL snapshot."""
        with closing(self._connect()) as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self, commit_phase: str | None = None) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; ``commit_phase`` names the pre-commit crash hook."""
        with closing(self._connect()) as conn, transaction(conn):
            yield conn
            if commit_phase:
                _crash_point(commit_phase)

    def _recover(self) -> None:
        """Sweep what killed writers left: staging dirs, and artifact dirs that never got their DB row.

        Runs under the DB write lock: publishing renames + inserts inside that lock, so any row-less
        artifact dir seen while holding it belongs to a dead process.
        """
        sweep(self.tmp_dir)
        if not self.adapters_dir.is_dir():
            return
        with self._write() as conn:
            live = {(n, v) for n, v in conn.execute("SELECT name, version FROM versions")}
            for name_dir in self.adapters_dir.iterdir():
                for vdir in name_dir.iterdir() if name_dir.is_dir() else ():
                    if vdir.name.isdigit() and (name_dir.name, int(vdir.name)) not in live:
                        shutil.rmtree(vdir, ignore_errors=True)

    # ---------------------------------------------------------------- lookups (take an open connection)

    def _artifact_dir(self, name: str, version: int) -> Path:
        return self.adapters_dir / name / str(version)

    def _require_adapter(self, conn: sqlite3.Connection, name: str) -> int | None:
        """Return the champion of ``name`` or raise AdapterNotFoundError listing the names that exist."""
        row = conn.execute("SELECT champion FROM adapters WHERE name = ?", (check_name(name),)).fetchone()
        if row is None:
            names = [n for (n,) in conn.execute("SELECT name FROM adapters ORDER BY name")]
            raise AdapterNotFoundError(f"adapter {name!r} not found; existing adapters: {_shorten(names)}")
        return row[0]

    def _version_numbers(self, conn: sqlite3.Connection, name: str) -> list[int]:
        return [v for (v,) in conn.execute("SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]

    def _record(self, row: tuple[Any, ...], champion: int | None) -> AdapterVersion:
        name, version, metadata, sha, created_at = row
        return AdapterVersion(
            name=name,
            version=version,
            path=self._artifact_dir(name, version),
            metadata=json.loads(metadata),
            sha256=json.loads(sha),
            created_at=created_at,
            is_champion=version == champion,
        )

    def _get(self, conn: sqlite3.Connection, name: str, version: int) -> AdapterVersion:
        champion = self._require_adapter(conn, name)
        row = conn.execute(
            "SELECT name, version, metadata, sha256, created_at FROM versions WHERE name = ? AND version = ?",
            (name, check_version(version)),
        ).fetchone()
        if row is None:
            existing = self._version_numbers(conn, name)
            raise AdapterNotFoundError(
                f"adapter {name!r} has no version {version}; existing versions: {_shorten(existing)}"
            )
        return self._record(row, champion)

    def _bump_generation(self, conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE state SET value = value + 1 WHERE key = 'generation'")

    # ---------------------------------------------------------------- register

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A locked dir under ``<home>/tmp``, after sweeping the dirs there whose owner died (their lock is free)."""
        sweep(self.tmp_dir)
        with staging_dir(self.tmp_dir) as stage:
            yield stage

    def register(self, name: str, src_dir: str | Path, *, metadata: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Stage, validate, hash and fsync a copy first; only then publish it, so readers never see half an adapter."""
        check_name(name)
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapterError(f"adapter directory {src} does not exist or is not a directory")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidAdapterError(f"metadata argument must be a mapping, got {type(metadata).__name__}")
        with staging_dir(self.tmp_dir) as stage:
            copy_tree_durable(src, stage)
            merged = merge_metadata(stage, validate_staged(src, stage), metadata)
            sha = hash_tree(stage)
            fsync_dir(stage)
            _crash_point("after_copy")
            return self._publish(name, stage, merged, sha)

    def _publish(self, name: str, stage: Path, metadata: dict[str, Any], sha: dict[str, str]) -> AdapterVersion:
        """Pick the version, rename into place and insert the row in one write transaction."""
        with self._write(commit_phase="before_commit") as conn:
            row = conn.execute("SELECT last_version, champion FROM adapters WHERE name = ?", (name,)).fetchone()
            version, champion = (row[0] + 1, row[1]) if row else (1, None)
            final = self._artifact_dir(name, version)
            ensure_dir(final.parent)
            if final.exists():  # a dead writer's rename whose row never committed (we hold the write lock)
                shutil.rmtree(final)
            os.rename(stage, final)
            fsync_dir(final.parent)
            try:
                _crash_point("after_rename")
                created_at = self._insert_version(conn, name, version, metadata, sha)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            return AdapterVersion(name, version, final, metadata, sha, created_at, version == champion)

    def _insert_version(
        self, conn: sqlite3.Connection, name: str, version: int, metadata: dict[str, Any], sha: dict[str, str]
    ) -> str:
        now = _now()
        conn.execute(
            "INSERT INTO adapters (name, last_version, champion, created_at) VALUES (?, ?, NULL, ?) "
            "ON CONFLICT(name) DO UPDATE SET last_version = excluded.last_version",
            (name, version, now),
        )
        conn.execute(
            "INSERT INTO versions (name, version, metadata, sha256, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, version, json.dumps(metadata, sort_keys=True), json.dumps(sha, sort_keys=True), now),
        )
        self._bump_generation(conn)
        return now

    # ---------------------------------------------------------------- champion changes

    def _set_champion(
        self, conn: sqlite3.Connection, name: str, version: int, previous: int | None, action: str
    ) -> None:
        conn.execute("UPDATE adapters SET champion = ? WHERE name = ?", (version, name))
        conn.execute(
            "INSERT INTO promotions (name, version, previous, action, promoted_at) VALUES (?, ?, ?, ?, ?)",
            (name, version, previous, action, _now()),
        )
        self._bump_generation(conn)

    def promote(self, name: str, version: int, *, verify: bool = True) -> AdapterVersion:
        """Make ``version`` champion; re-promoting the current champion is a no-op (no history row, no bump).

        With `verify` (the default) every file is re-hashed first: a corrupt version raises CorruptAdapterError and
        the champion stays as it was."""
        if verify:
            self.verify(name, version)
        with self._write(commit_phase="promote_before_commit") as conn:
            record = self._get(conn, name, version)
            if not record.is_champion:
                self._set_champion(conn, name, version, self._require_adapter(conn, name), "promote")
        return replace(record, is_champion=True)

    def _champion_stack(self, conn: sqlite3.Connection, name: str) -> list[int]:
        """Replay history as a stack (promote pushes, rollback pops back to its target) so repeated
        rollbacks walk further back instead of toggling between the last two champions."""
        stack: list[int] = []
        rows = conn.execute("SELECT version, action FROM promotions WHERE name = ? ORDER BY id", (name,))
        for version, action in rows:
            if action == "promote":
                stack.append(version)
                continue
            while stack and stack[-1] != version:
                stack.pop()
        return stack

    def rollback(self, name: str) -> AdapterVersion:
        """Return to the previous champion; versions deleted since are skipped (they cannot be served)."""
        with self._write(commit_phase="rollback_before_commit") as conn:
            current = self._require_adapter(conn, name)
            if current is None:
                raise RollbackError(f"cannot roll back adapter {name!r}: it has no champion")
            live = set(self._version_numbers(conn, name))
            stack = self._champion_stack(conn, name)
            if stack and stack[-1] == current:
                stack.pop()
            while stack and (stack[-1] not in live or stack[-1] == current):
                stack.pop()
            if not stack:
                raise RollbackError(
                    f"cannot roll back adapter {name!r}: no earlier champion before version {current} in its history"
                )
            self._set_champion(conn, name, stack[-1], current, "rollback")
            return self._get(conn, name, stack[-1])

    def history(self, name: str) -> list[Promotion]:
        with self._read() as conn:
            self._require_adapter(conn, name)
            rows = conn.execute(
                "SELECT name, version, previous, promoted_at, action FROM promotions WHERE name = ? ORDER BY id",
                (name,),
            ).fetchall()
        return [Promotion(*row) for row in rows]

    # ---------------------------------------------------------------- reads

    def list_adapters(self) -> list[AdapterInfo]:
        with self._read() as conn:
            champions = dict(conn.execute("SELECT name, champion FROM adapters ORDER BY name").fetchall())
            rows = conn.execute(
                "SELECT name, version, metadata, sha256, created_at FROM versions ORDER BY name, version"
            ).fetchall()
        by_name: dict[str, list[AdapterVersion]] = {name: [] for name in champions}
        for row in rows:
            by_name[row[0]].append(self._record(row, champions[row[0]]))
        return [AdapterInfo(name, champions[name], versions) for name, versions in by_name.items()]

    def get(self, name: str, version: int) -> AdapterVersion:
        with self._read() as conn:
            return self._get(conn, name, version)

    def champion(self, name: str) -> AdapterVersion | None:
        with self._read() as conn:
            current = self._require_adapter(conn, name)
            return None if current is None else self._get(conn, name, current)

    def path(self, name: str, version: int) -> Path:
        return self.get(name, version).path

    def generation(self) -> int:
        """One indexed single-row read; workers poll this and reload only when it changes."""
        with closing(self._connect()) as conn:
            return conn.execute("SELECT value FROM state WHERE key = 'generation'").fetchone()[0]

    # ---------------------------------------------------------------- delete / verify

    def delete(self, name: str, version: int) -> None:
        """Drop the row first (commit), then the files: a crash in between leaves only a row-less dir to sweep."""
        with self._write(commit_phase="delete_before_commit") as conn:
            record = self._get(conn, name, version)
            if record.is_champion:
                raise ChampionDeleteError(
                    f"cannot delete adapter {name!r} version {version}: it is the current champion; "
                    "promote another version (or roll back) first"
                )
            conn.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))
            self._bump_generation(conn)
        _crash_point("delete_after_commit")
        shutil.rmtree(record.path, ignore_errors=True)

    def verify(self, name: str, version: int) -> AdapterVersion:
        """Re-hash every recorded file; raise CorruptAdapterError listing each missing or changed one."""
        record = self.get(name, version)
        problems: list[tuple[str, str, str]] = []
        for rel, expected in sorted(record.sha256.items()):
            file = record.path / rel
            actual = file_sha256(file) if file.is_file() else "<missing>"
            if actual != expected:
                problems.append((rel, expected, actual))
        if problems:
            raise CorruptAdapterError(name, version, problems)
        return record


# --------------------------------------------------------------------------------------------- factory


def default_home() -> Path:
    """ADAPTSERVE_HOME, else ./.adaptserve (read at call time so tests and CLIs can set the variable)."""
    return settings.load().home


def open_registry(url_or_path: str | Path | None = None) -> AdapterRegistry:
    """Open a registry from a home path or ``sqlite:///path`` URL; other schemes are reserved for later backends.

    ``sqlite:///rel/dir`` is relative and ``sqlite:////abs/dir`` absolute (SQLAlchemy's convention); the path
    is the registry home directory, which holds registry.db and adapters/.
    """
    if url_or_path is None or isinstance(url_or_path, Path):
        return SQLiteRegistry(url_or_path)
    scheme, sep, rest = str(url_or_path).partition("://")
    if not sep:
        return SQLiteRegistry(url_or_path)
    if scheme.lower() != "sqlite":
        raise UnsupportedBackendError(
            f"registry backend {scheme!r} is not supported yet (in {url_or_path!r}); use a path or sqlite:///path"
        )
    if not rest.startswith("/") or rest == "/":
        raise UnsupportedBackendError(f"malformed sqlite registry URL {url_or_path!r}; expected sqlite:///path")
    return SQLiteRegistry(rest[1:])
