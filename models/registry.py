"""Adapter registry: named LoRA adapters, integer versions, one champion per name, shared by every replica.

Where things live:

* rows in the state database (`models.state.open_state(home)`: ADAPTSERVE_DATABASE_URL, else SQLite at
  ``<home>/state.db``), tables in models/registry_tables.py (revision 0005_registry): adapters, versions with their
  metadata and manifest ({relative path: sha256}), promotion history, the generation counter;
* files in the content-addressed artifact store (ADAPTSERVE_ARTIFACTS_URL: a directory or ``s3://...``, default
  ``<home>/artifacts``), one object per distinct file;
* each home's verified local copy of the versions it uses under ``<home>/adapters/<name>/<version>/``
  (models/registry_local.py), the path loaders read: `verify()`, `load_check()`, `path()` and `local()` fetch a
  missing copy from the store; `get()`, `champion()`, `list_adapters()` only read rows and never download.

Serving workers of every replica poll `generation()` (and, on PostgreSQL, hear models.notify.REGISTRY). Every
change is one write transaction holding REGISTRY_LOCK that moves the generation and notifies, and survives kill -9:

* register: the adapter is copied into a locked staging dir under ``<home>/tmp``, validated and hashed there
  (models/adapter_dir.py, models/staging.py); every file is put to the store (each upload verified); only then the
  version number is picked and the row inserted in one transaction. A kill before the commit leaves no row (objects
  without a row are harmless: content-addressed); after it, a complete version (the staged dir then becomes this
  home's local copy; if the kill came first, the copy is fetched on first use).
* delete: the row goes (and the generation moves) in one transaction, then the local copy. Objects stay in the store
  (another version may share them by content; nothing collects them yet). Other homes' copies of the deleted
  version are removed by their next open.

A legacy home's registry.db is imported once on first open (models/registry_legacy.py). The contract is
models/registry_interface.py (records, names, invariants); the errors are models/registry_errors.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from models import settings
from models.adapter_dir import merge_metadata, validate_staged
from models.artifact_store import artifacts_url, open_store
from models.files import copy_tree_durable, ensure_dir, file_sha256, fsync_dir
from models.metadata import ADAPTER_FILES
from models.registry_errors import (
    AdapterNotFoundError,
    ChampionDeleteError,
    CorruptAdapterError,
    InvalidAdapterError,
    InvalidNameError,
    InvalidVersionError,
    LegacyImportError,
    RegistryError,
    RollbackError,
    UnfetchableAdapterError,
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
from models.registry_legacy import import_legacy
from models.registry_local import LocalCopies
from models.registry_tables import (
    REGISTRY_LOCK,
    changed,
    registry_adapters,
    registry_generation,
    registry_promotions,
    registry_versions,
)
from models.staging import staging_dir, sweep
from models.state import open_state

__all__ = [
    # the registry
    "CRASH_ENV", "CRASH_PHASES", "REQUIRED_FILES", "Registry", "default_home", "open_registry",
    # its contract (models.registry_interface) and errors (models.registry_errors): callers import them from here
    "MAX_VERSION", "NAME_PATTERN", "AdapterInfo", "AdapterRegistry", "AdapterVersion", "Promotion",
    "AdapterNotFoundError", "ChampionDeleteError", "CorruptAdapterError", "InvalidAdapterError", "InvalidNameError",
    "InvalidVersionError", "LegacyImportError", "RegistryError", "RollbackError", "UnfetchableAdapterError",
    "UnsupportedBackendError",
]

REQUIRED_FILES = ADAPTER_FILES
CRASH_ENV = "ADAPTSERVE_REGISTRY_CRASH_AT"
# Test-only SIGKILL points (see _crash_point); listed so tests can assert they cover every one.
CRASH_PHASES = (
    "after_stage",  # register: staged, validated, fsynced; nothing uploaded
    "after_upload",  # register: every object in the store, no row
    "before_commit",  # register: the row inserted, not committed
    "after_commit",  # register: committed; the staged dir not yet this home's local copy
    "promote_before_commit",
    "rollback_before_commit",
    "delete_before_commit",
    "delete_after_commit",  # the row is gone, the local copy not yet
    "import_before_commit",  # legacy import: objects uploaded, rows inserted, not committed
    "import_after_commit",  # legacy import: committed, registry.db not yet renamed
)
_MAX_LISTED = 20
log = logging.getLogger("adaptserve.registry")
_warned: set[Path] = set()  # homes this process warned about a database shared without a shared store
_VERSION_COLUMNS = (registry_versions.c.name, registry_versions.c.version, registry_versions.c.metadata,
                    registry_versions.c.manifest, registry_versions.c.created_at)


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


class Registry(AdapterRegistry):
    """The registry of one home: rows in its state database, files in its artifact store, local copies in
    ``<home>/adapters``. Safe across threads and forked workers (the database opens one engine per process)."""

    def __init__(self, home: str | Path | None = None, config: settings.Settings | None = None) -> None:
        config = config or settings.load()
        self.home = (Path(home) if home is not None else config.home).expanduser().absolute()
        self.adapters_dir, self.tmp_dir = self.home / "adapters", self.home / "tmp"
        ensure_dir(self.home)
        self.database = open_state(self.home, config)
        # no digest cache beside it: the local copies are this home's cache, a second one would double the disk
        self.store = open_store(artifacts_url(config.model_copy(update={"home": self.home})))
        self.copies = LocalCopies(self.adapters_dir, self.store)
        if not self.database.is_sqlite and not config.artifacts_url and self.home not in _warned:
            _warned.add(self.home)
            log.warning("the registry's rows are on the shared database %r but its files in this home's own %s "
                        "(%s unset): other homes cannot fetch the versions this one registers, nor this one theirs",
                        self.database, self.store.url, settings.env_name("artifacts_url"))
        import_legacy(self.database, self.store, self.home, _crash_point)  # before the sweep: it keeps its dirs
        sweep(self.tmp_dir)
        self.copies.sweep(self._live)

    def __repr__(self) -> str:
        return f"Registry(home={str(self.home)!r}, database={self.database!r}, store={self.store!r})"

    def _live(self) -> set[tuple[str, int]]:
        with self.database.read() as conn:
            return {(n, v) for n, v in conn.execute(select(registry_versions.c.name, registry_versions.c.version))}

    @contextmanager
    def _write(self, commit_phase: str) -> Iterator[Connection]:
        """One write transaction of REGISTRY_LOCK; `commit_phase` names its test-only kill point before the commit."""
        with self.database.write(lock=REGISTRY_LOCK) as conn:
            yield conn
            _crash_point(commit_phase)

    # ---------------------------------------------------------------- lookups (take an open connection)

    def _require_adapter(self, conn: Connection, name: str) -> int | None:
        """Return the champion of ``name`` or raise AdapterNotFoundError listing the names that exist."""
        row = conn.execute(select(registry_adapters.c.champion).where(registry_adapters.c.name == check_name(name)))
        found = row.first()
        if found is None:
            names = list(conn.scalars(select(registry_adapters.c.name).order_by(registry_adapters.c.name)))
            raise AdapterNotFoundError(f"adapter {name!r} not found; existing adapters: {_shorten(names)}")
        return found.champion

    def _version_numbers(self, conn: Connection, name: str) -> list[int]:
        query = select(registry_versions.c.version).where(registry_versions.c.name == name)
        return list(conn.scalars(query.order_by(registry_versions.c.version)))

    def _record(self, row: Row[Any], champion: int | None) -> AdapterVersion:
        name, version, metadata, manifest, created_at = row
        return AdapterVersion(name, version, self.copies.path(name, version), json.loads(metadata),
                              json.loads(manifest), created_at, version == champion)

    def _get(self, conn: Connection, name: str, version: int) -> AdapterVersion:
        champion = self._require_adapter(conn, name)
        row = conn.execute(select(*_VERSION_COLUMNS).where(
            registry_versions.c.name == name, registry_versions.c.version == check_version(version))).first()
        if row is None:
            existing = self._version_numbers(conn, name)
            raise AdapterNotFoundError(
                f"adapter {name!r} has no version {version}; existing versions: {_shorten(existing)}"
            )
        return self._record(row, champion)

    # ---------------------------------------------------------------- register

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A locked dir under ``<home>/tmp``, after sweeping the dirs there whose owner died (their lock is free)."""
        sweep(self.tmp_dir)
        with staging_dir(self.tmp_dir) as stage:
            yield stage

    def register(self, name: str, src_dir: str | Path, *, metadata: Mapping[str, Any] | None = None) -> AdapterVersion:
        """Stage, validate, fsync and upload every file first; only then insert the row, so no reader anywhere ever
        sees half an adapter."""
        check_name(name)
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapterError(f"adapter directory {src} does not exist or is not a directory")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidAdapterError(f"metadata argument must be a mapping, got {type(metadata).__name__}")
        with staging_dir(self.tmp_dir) as stage:
            copy_tree_durable(src, stage)
            merged = merge_metadata(stage, validate_staged(src, stage), metadata)
            fsync_dir(stage)
            _crash_point("after_stage")
            manifest = self.store.put_tree(stage)  # hashes each staged file; each upload read back and verified
            _crash_point("after_upload")
            record = self._insert_version(name, merged, manifest)
            _crash_point("after_commit")
            try:
                self.copies.adopt(stage, name, record.version)  # the staged dir is this home's copy: no download
            except OSError as err:  # the version is registered: its copy is fetched from the store on first use
                log.warning("adapter %s v%s: the staged copy did not become the local copy (%s)", name,
                            record.version, err)
        return record

    def _insert_version(self, name: str, metadata: dict[str, Any], manifest: dict[str, str]) -> AdapterVersion:
        """Pick the next number under the write lock and insert the row, in one transaction."""
        with self._write("before_commit") as conn:
            row = conn.execute(select(registry_adapters.c.last_version, registry_adapters.c.champion)
                               .where(registry_adapters.c.name == name)).first()
            version, champion, now = (row.last_version + 1 if row else 1), (row.champion if row else None), _now()
            if row is None:
                conn.execute(insert(registry_adapters).values(name=name, last_version=version, created_at=now))
            else:
                conn.execute(update(registry_adapters).where(registry_adapters.c.name == name)
                             .values(last_version=version))
            conn.execute(insert(registry_versions).values(
                name=name, version=version, metadata=json.dumps(metadata, sort_keys=True),
                manifest=json.dumps(manifest, sort_keys=True), created_at=now))
            changed(conn)
        return AdapterVersion(name, version, self.copies.path(name, version), metadata, manifest, now,
                              version == champion)

    # ---------------------------------------------------------------- champion changes

    def _set_champion(self, conn: Connection, name: str, version: int, previous: int | None, action: str) -> None:
        conn.execute(update(registry_adapters).where(registry_adapters.c.name == name).values(champion=version))
        conn.execute(insert(registry_promotions).values(
            name=name, version=version, previous=previous, action=action, promoted_at=_now()))
        changed(conn)

    def promote(self, name: str, version: int, *, verify: bool = True) -> AdapterVersion:
        """Make ``version`` champion; re-promoting the current champion is a no-op (no history row, no bump).

        With `verify` (the default) every file is re-hashed first (fetched first if this home has no copy): a corrupt
        version raises CorruptAdapterError and the champion stays as it was."""
        if verify:
            self.verify(name, version)
        with self._write("promote_before_commit") as conn:
            record = self._get(conn, name, version)
            if not record.is_champion:
                self._set_champion(conn, name, version, self._require_adapter(conn, name), "promote")
        return replace(record, is_champion=True)

    def _champion_stack(self, conn: Connection, name: str) -> list[int]:
        """Replay history as a stack (promote pushes, rollback pops back to its target) so repeated
        rollbacks walk further back instead of toggling between the last two champions."""
        stack: list[int] = []
        rows = conn.execute(select(registry_promotions.c.version, registry_promotions.c.action)
                            .where(registry_promotions.c.name == name).order_by(registry_promotions.c.id))
        for version, action in rows:
            if action == "promote":
                stack.append(version)
                continue
            while stack and stack[-1] != version:
                stack.pop()
        return stack

    def rollback(self, name: str) -> AdapterVersion:
        """Return to the previous champion; versions deleted since are skipped (they cannot be served)."""
        with self._write("rollback_before_commit") as conn:
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
        p = registry_promotions.c
        with self.database.read() as conn:
            self._require_adapter(conn, name)
            rows = conn.execute(select(p.name, p.version, p.previous, p.promoted_at, p.action)
                                .where(p.name == name).order_by(p.id)).all()
        return [Promotion(*row) for row in rows]

    # ---------------------------------------------------------------- reads (rows only: nothing is downloaded)

    def list_adapters(self) -> list[AdapterInfo]:
        with self.database.read() as conn:
            champions = dict(conn.execute(select(registry_adapters.c.name, registry_adapters.c.champion)
                                          .order_by(registry_adapters.c.name)).all())
            rows = conn.execute(select(*_VERSION_COLUMNS).order_by(registry_versions.c.name,
                                                                   registry_versions.c.version)).all()
        by_name: dict[str, list[AdapterVersion]] = {name: [] for name in champions}
        for row in rows:
            by_name[row.name].append(self._record(row, champions[row.name]))
        return [AdapterInfo(name, champions[name], versions) for name, versions in by_name.items()]

    def get(self, name: str, version: int) -> AdapterVersion:
        with self.database.read() as conn:
            return self._get(conn, name, version)

    def champion(self, name: str) -> AdapterVersion | None:
        with self.database.read() as conn:
            current = self._require_adapter(conn, name)
            return None if current is None else self._get(conn, name, current)

    def generation(self) -> int:
        """One primary-key read of a one-row table; workers poll this and reload only when it changes."""
        with self.database.read() as conn:
            value = conn.scalar(select(registry_generation.c.value).where(registry_generation.c.id == 1))
        return int(value or 0)

    # ---------------------------------------------------------------- local copies

    def local(self, record: AdapterVersion) -> Path:
        """The dir holding `record`'s files on this home, fetched (every file verified) when it has none yet; an
        existing copy is returned as it is (verify() re-hashes it)."""
        return self.copies.ensure(record.name, record.version, record.sha256)

    def path(self, name: str, version: int) -> Path:
        return self.local(self.get(name, version))

    def verify(self, name: str, version: int) -> AdapterVersion:
        """Re-hash every recorded file of this home's copy (fetched first when missing); raise CorruptAdapterError
        listing each missing or changed one."""
        record = self.get(name, version)
        path = self.local(record)
        problems: list[tuple[str, str, str]] = []
        for rel, expected in sorted(record.sha256.items()):
            file = path / rel
            actual = file_sha256(file) if file.is_file() else "<missing>"
            if actual != expected:
                problems.append((rel, expected, actual))
        if problems:
            raise CorruptAdapterError(name, version, problems)
        return record

    # ---------------------------------------------------------------- delete

    def delete(self, name: str, version: int) -> None:
        """Drop the row (commit), then this home's copy: a kill in between leaves a row-less dir the next open
        sweeps. The store's objects stay (see the module docstring)."""
        with self._write("delete_before_commit") as conn:
            record = self._get(conn, name, version)
            if record.is_champion:
                raise ChampionDeleteError(
                    f"cannot delete adapter {name!r} version {version}: it is the current champion; "
                    "promote another version (or roll back) first"
                )
            conn.execute(delete(registry_versions).where(registry_versions.c.name == name,
                                                         registry_versions.c.version == version))
            changed(conn)
        _crash_point("delete_after_commit")
        self.copies.remove(name, version)


# --------------------------------------------------------------------------------------------- factory


def default_home() -> Path:
    """ADAPTSERVE_HOME, else ./.adaptserve (read at call time so tests and CLIs can set the variable)."""
    return settings.load().home


def open_registry(url_or_path: str | Path | None = None) -> AdapterRegistry:
    """The registry of a home, given as a path or a ``sqlite:///path`` URL naming that directory.

    ``sqlite:///rel/dir`` is relative and ``sqlite:////abs/dir`` absolute (SQLAlchemy's convention). Where the rows
    and files live is not part of it: ADAPTSERVE_DATABASE_URL and ADAPTSERVE_ARTIFACTS_URL say, for every home.
    """
    if url_or_path is None or isinstance(url_or_path, Path):
        return Registry(url_or_path)
    scheme, sep, rest = str(url_or_path).partition("://")
    if not sep:
        return Registry(url_or_path)
    if scheme.lower() != "sqlite":
        raise UnsupportedBackendError(
            f"registry backend {scheme!r} is not supported yet (in {url_or_path!r}): open a registry by its home "
            "directory; a shared database and artifact store are set with ADAPTSERVE_DATABASE_URL and "
            "ADAPTSERVE_ARTIFACTS_URL"
        )
    if not rest.startswith("/") or rest == "/":
        raise UnsupportedBackendError(f"malformed sqlite registry URL {url_or_path!r}; expected sqlite:///path")
    return Registry(rest[1:])
