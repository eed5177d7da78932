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

``open_registry`` is the entry point; ``AdapterRegistry`` is the interface a second backend will implement.
"""

from __future__ import annotations

import abc
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import safe_open

from models.metadata import ADAPTER_FILES, ADAPTER_META, AdapterMeta
from models.sqlite import transaction

__all__ = [
    "CRASH_ENV",
    "CRASH_PHASES",
    "NAME_PATTERN",
    "REQUIRED_FILES",
    "AdapterInfo",
    "AdapterNotFoundError",
    "AdapterRegistry",
    "AdapterVersion",
    "ChampionDeleteError",
    "CorruptAdapterError",
    "InvalidAdapterError",
    "InvalidNameError",
    "InvalidVersionError",
    "MAX_VERSION",
    "Promotion",
    "RegistryError",
    "RollbackError",
    "SQLiteRegistry",
    "UnsupportedBackendError",
    "default_home",
    "open_registry",
]

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
MAX_VERSION = 2**63 - 1  # SQLite's INTEGER range: a larger client number must be refused before a query
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
HOME_ENV = "ADAPTSERVE_HOME"
DB_FILE = "registry.db"
_SCHEMA_VERSION = 1
_CHUNK = 1 << 20
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
"""


# --------------------------------------------------------------------------------------------- errors


class RegistryError(Exception):
    """Base class so callers can catch every registry failure with one except clause.

    `status_code` is the HTTP status a service answers with (service/errors.py reads it)."""

    status_code = 400


class InvalidNameError(RegistryError, ValueError):
    """Adapter name does not match NAME_PATTERN (names become directory names, so they must be safe)."""


class InvalidAdapterError(RegistryError, ValueError):
    """The directory handed to register() is not a complete, parseable PEFT adapter + metadata.json."""


class AdapterNotFoundError(RegistryError, KeyError):
    """Unknown adapter name or version; KeyError-like so ``except KeyError`` callers keep working."""

    status_code = 404

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


class CorruptAdapterError(RegistryError):
    """Artifact files on disk are missing or no longer match the sha256 recorded at register time."""

    status_code = 409

    def __init__(self, name: str, version: int, problems: list[tuple[str, str, str]]) -> None:
        self.name, self.version, self.problems = name, version, problems
        details = "; ".join(f"file {f!r}: expected sha256 {exp}, actual {act}" for f, exp, act in problems)
        super().__init__(f"adapter {name!r} version {version} is corrupt: {details}")


class ChampionDeleteError(RegistryError):
    """Deleting the champion would leave serving workers pointing at nothing."""

    status_code = 409


class RollbackError(RegistryError):
    """rollback() found no earlier champion (still registered) to go back to."""

    status_code = 409


class InvalidVersionError(RegistryError, ValueError):
    """A version number outside 1..MAX_VERSION (no such version can exist)."""


class UnsupportedBackendError(RegistryError, ValueError):
    """open_registry() got a URL scheme with no backend implementation yet."""


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version; a snapshot (is_champion is as of the read that produced it)."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any]
    sha256: dict[str, str]
    created_at: str
    is_champion: bool

    @property
    def meta(self) -> AdapterMeta:
        """`metadata` typed (models/metadata.py); ArtifactError when it lacks a key every adapter has."""
        return AdapterMeta.from_dict(self.metadata, source=self.path / ADAPTER_META)


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter name with all its live versions (ascending) and its champion version, if any."""

    name: str
    champion: int | None
    versions: list[AdapterVersion]


@dataclass(frozen=True)
class Promotion:
    """One champion change; ``previous`` is the champion it replaced, ``action`` is promote or rollback."""

    name: str
    version: int
    previous: int | None
    promoted_at: str
    action: str


# --------------------------------------------------------------------------------------------- interface


class AdapterRegistry(abc.ABC):
    """Backend-neutral registry interface, so a server-backed registry can replace SQLite later."""

    @abc.abstractmethod
    def register(self, name: str, src_dir: str | Path, *, metadata: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Copy an adapter directory in as the next version of ``name``."""

    @abc.abstractmethod
    def promote(self, name: str, version: int, *, verify: bool = True) -> AdapterVersion:
        """Make ``version`` the champion of ``name`` (after re-hashing its files, unless `verify` is False)."""

    @abc.abstractmethod
    def rollback(self, name: str) -> AdapterVersion:
        """Go back to the champion before the current one, following promotion history."""

    @abc.abstractmethod
    def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter with its versions, champion and metadata."""

    @abc.abstractmethod
    def get(self, name: str, version: int) -> AdapterVersion:
        """One version's record."""

    @abc.abstractmethod
    def champion(self, name: str) -> AdapterVersion | None:
        """The champion's record, or None if nothing was promoted yet."""

    @abc.abstractmethod
    def delete(self, name: str, version: int) -> None:
        """Remove a non-champion version; its number is never reused."""

    @abc.abstractmethod
    def path(self, name: str, version: int) -> Path:
        """Directory holding the version's artifacts."""

    @abc.abstractmethod
    def generation(self) -> int:
        """Counter bumped by every change; cheap enough for serving workers to poll."""

    @abc.abstractmethod
    def verify(self, name: str, version: int) -> AdapterVersion:
        """Re-hash the artifacts; raise CorruptAdapterError on any missing or changed file."""

    @abc.abstractmethod
    def history(self, name: str) -> list[Promotion]:
        """Champion changes of ``name``, oldest first."""

    @abc.abstractmethod
    def staging(self) -> AbstractContextManager[Path]:
        """A private scratch dir for work that ends in register() (publish builds model.onnx there), removed on
        exit; if its owner is SIGKILLed, the next staging() or open removes it."""

    def load_check(self, name: str, version: int) -> AdapterVersion:
        """verify() under the name loaders use: call it right before loading weights from ``path``."""
        return self.verify(name, version)


# --------------------------------------------------------------------------------------------- helpers


def _crash_point(phase: str) -> None:
    """Test-only fault injection: SIGKILL ourselves at ``phase`` so tests can prove crash consistency."""
    if os.environ.get(CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _check_name(name: object) -> str:
    """Names become directory names and URL segments, so only a conservative charset is allowed."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid adapter name {name!r}: must match {NAME_PATTERN} "
            "(lowercase letters, digits, '_' and '-', starting with a letter or digit, at most 64 characters)"
        )
    return name


def _check_version(version: object) -> int:
    """SQLite would happily compare '1' with 1, so reject non-ints before they reach a query; and it raises
    OverflowError on integers past 64 bits, so range-check them first."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"adapter version must be an int, got {version!r}")
    if not -MAX_VERSION - 1 <= version <= MAX_VERSION:
        raise InvalidVersionError(f"adapter version {version} is out of range: no version can be past {MAX_VERSION}")
    return version


def _shorten(items: list[Any]) -> str:
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _fsync_dir(path: Path) -> None:
    """A rename or create is only durable once the containing directory is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """mkdir -p that fsyncs each parent it had to create a child in, so new dirs survive power loss."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    path.mkdir(exist_ok=True)
    _fsync_dir(path.parent)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy regular files (following symlinks) and fsync each, so the staged copy is durable before rename."""
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif item.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(item, "rb") as fi, open(target, "xb") as fo:
                shutil.copyfileobj(fi, fo, _CHUNK)
                fo.flush()
                os.fsync(fo.fileno())
    for d in sorted((p for p in dst.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)
    _fsync_dir(dst)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file keyed by POSIX relative path, recorded so verify() can detect bit rot or tampering."""
    return {p.relative_to(root).as_posix(): _sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _read_json_object(path: Path, shown: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{shown} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidAdapterError(f"{shown} must contain a JSON object, got {type(data).__name__}")
    return data


def _check_safetensors(path: Path, shown: Path) -> None:
    """Parse the header only: cheap, and catches truncated or non-safetensors files before they are served."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except Exception as e:  # SafetensorError has no stable public import path
        raise InvalidAdapterError(f"{shown} is not a valid safetensors file: {e}") from e


def _validate_staged(src: Path, stage: Path) -> dict[str, Any]:
    """Validate the staged copy (not the source) so what we store is exactly what we checked."""
    for fname in REQUIRED_FILES:
        if not (stage / fname).is_file():
            raise InvalidAdapterError(
                f"adapter directory {src} is missing required file {fname!r} (needs {', '.join(REQUIRED_FILES)})"
            )
    _read_json_object(stage / "adapter_config.json", src / "adapter_config.json")
    _check_safetensors(stage / "adapter_model.safetensors", src / "adapter_model.safetensors")
    return _read_json_object(stage / ADAPTER_META, src / ADAPTER_META)


def _merge_metadata(stage: Path, file_meta: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Shallow-merge the argument over metadata.json and write it back, so disk and DB tell the same story (an
    AdapterMeta keeps keys it does not know, so a merged file still loads as one)."""
    if not extra:
        return file_meta
    merged = {**file_meta, **extra}
    try:
        text = json.dumps(merged, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidAdapterError(f"metadata argument is not JSON-serializable: {e}") from e
    os.unlink(stage / ADAPTER_META)
    _write_file(stage / ADAPTER_META, text.encode("utf-8"))
    return merged


# --------------------------------------------------------------------------------------------- staging locks


def _new_stage_lock(tmp_root: Path) -> tuple[int, str]:
    """Create and flock ``<token>.lock``; retry if a sweeper unlinked it between our create and our flock."""
    while True:
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        lock_path = tmp_root / f"{token}.lock"
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd, token
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def _staging(tmp_root: Path) -> Iterator[Path]:
    """A private dir under home, locked for its whole life; removed on exit unless renamed away."""
    _ensure_dir(tmp_root)
    fd, token = _new_stage_lock(tmp_root)
    stage = tmp_root / token
    try:
        stage.mkdir()
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        (tmp_root / f"{token}.lock").unlink(missing_ok=True)
        os.close(fd)


def _sweep_token(tmp_root: Path, token: str) -> None:
    """Remove one staging dir + lock, but only if no live process holds the lock."""
    lock_path = tmp_root / f"{token}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        # Owners create the lock before the dir and unlink it after, so a lock-less dir is a leftover.
        shutil.rmtree(tmp_root / token, ignore_errors=True)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        shutil.rmtree(tmp_root / token, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _sweep_staging(tmp_root: Path) -> None:
    """Drop staging leftovers of killed writers; a kill -9 cannot run cleanup, so the next open does."""
    if not tmp_root.is_dir():
        return
    tokens = {p.name.removesuffix(".lock") for p in tmp_root.iterdir()}
    for token in sorted(tokens):
        _sweep_token(tmp_root, token)


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
        _ensure_dir(self.home)
        self._init_db()
        self._recover()

    def __repr__(self) -> str:
        return f"SQLiteRegistry(home={str(self.home)!r})"

    # ---------------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=self._timeout, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
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

    def _init_db(self) -> None:
        with closing(self._connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        with self._write() as conn:
            self._create_schema(conn)

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        # executescript() would COMMIT our BEGIN IMMEDIATE, so run statements one by one.
        for stmt in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _recover(self) -> None:
        """Sweep what killed writers left: staging dirs, and artifact dirs that never got their DB row.

        Runs under the DB write lock: publishing renames + inserts inside that lock, so any row-less
        artifact dir seen while holding it belongs to a dead process.
        """
        _sweep_staging(self.tmp_dir)
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
        row = conn.execute("SELECT champion FROM adapters WHERE name = ?", (_check_name(name),)).fetchone()
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
            (name, _check_version(version)),
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
        _sweep_staging(self.tmp_dir)
        with _staging(self.tmp_dir) as stage:
            yield stage

    def register(self, name: str, src_dir: str | Path, *, metadata: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Stage, validate, hash and fsync a copy first; only then publish it, so readers never see half an adapter."""
        _check_name(name)
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapterError(f"adapter directory {src} does not exist or is not a directory")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidAdapterError(f"metadata argument must be a mapping, got {type(metadata).__name__}")
        with _staging(self.tmp_dir) as stage:
            _copy_tree(src, stage)
            merged = _merge_metadata(stage, _validate_staged(src, stage), metadata)
            sha = _hash_tree(stage)
            _fsync_dir(stage)
            _crash_point("after_copy")
            return self._publish(name, stage, merged, sha)

    def _publish(self, name: str, stage: Path, metadata: dict[str, Any], sha: dict[str, str]) -> AdapterVersion:
        """Pick the version, rename into place and insert the row in one write transaction."""
        with self._write(commit_phase="before_commit") as conn:
            row = conn.execute("SELECT last_version, champion FROM adapters WHERE name = ?", (name,)).fetchone()
            version, champion = (row[0] + 1, row[1]) if row else (1, None)
            final = self._artifact_dir(name, version)
            _ensure_dir(final.parent)
            if final.exists():  # a dead writer's rename whose row never committed (we hold the write lock)
                shutil.rmtree(final)
            os.rename(stage, final)
            _fsync_dir(final.parent)
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
            actual = _sha256_file(file) if file.is_file() else "<missing>"
            if actual != expected:
                problems.append((rel, expected, actual))
        if problems:
            raise CorruptAdapterError(name, version, problems)
        return record


# --------------------------------------------------------------------------------------------- factory


def default_home() -> Path:
    """$ADAPTSERVE_HOME, else ./.adaptserve (resolved at call time so tests and CLIs can set the env var)."""
    return Path(os.environ.get(HOME_ENV) or ".adaptserve")


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
