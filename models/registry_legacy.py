"""The one-time import of a legacy registry: ``<home>/registry.db`` (the SQLite file the registry kept before the
state database did) with its files under ``<home>/adapters/<name>/<version>/``.

On the first open of a registry for a home that still has registry.db (models.registry.Registry):

1. every file of every version is put to the artifact store (each upload verified by the store), outside any
   database lock: objects are content-addressed, so an upload that is never followed by a row is harmless;
2. in one write transaction (REGISTRY_LOCK) the adapters (last_version, champion, created_at), their versions
   (metadata, manifest = the recorded sha256 of each file, created_at) and their promotion history (in order) are
   copied, and the generation moves;
3. the file is renamed ``registry.db.imported`` (its -wal and -shm too, if any are left: models/legacy.py).

The version dirs stay where they are: they are this home's local copies (models/registry_local.py). A file whose
bytes no longer match the sha256 recorded for it is not uploaded and its version keeps the recorded manifest: this
home's copy fails verify() as it did before, and another home cannot fetch it; the import says how many.

An adapter already in the database with the legacy file's created_at was imported before (a process killed between
the commit and the rename, two processes opening at once): it is skipped. One with the same name and another
created_at belongs to another registry: the import refuses (LegacyImportError) and changes nothing, since merging
two version histories of one name would give one number two meanings. A copy that fails part-way leaves the
database and the file as they were.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select

from models.artifact_store import ArtifactStore, check_relpath
from models.db import Database, redact
from models.files import file_sha256
from models.legacy import read_rows, retire
from models.registry_errors import LegacyImportError
from models.registry_tables import (
    REGISTRY_LOCK,
    changed,
    registry_adapters,
    registry_promotions,
    registry_versions,
)

log = logging.getLogger("adaptserve.registry")

LEGACY_FILE = "registry.db"


@dataclass
class _Legacy:
    """The rows of a registry.db, as dicts of its columns, in the order they were written."""

    adapters: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)


def import_legacy(database: Database, store: ArtifactStore, home: Path, crash: Callable[[str], None]) -> None:
    """Import `<home>/registry.db` once (see the module docstring); a no-op (one stat) when the home has none.

    `crash(phase)` is the registry's test-only kill point (models.registry CRASH_PHASES)."""
    path = home / LEGACY_FILE
    if not path.is_file():
        return
    old = _read(path)
    if old is None:
        return
    damaged = _upload(store, home / "adapters", old.versions)
    with database.write(lock=REGISTRY_LOCK) as conn:
        if not path.is_file():  # another process imported it while this one uploaded or waited for the lock
            return
        names = _new_names(conn, old.adapters, path, database)
        _copy(conn, old, names)
        crash("import_before_commit")
    crash("import_after_commit")
    retired = retire(path)
    versions = sum(1 for row in old.versions if row["name"] in names)
    log.info("imported %d adapter(s) with %d version(s) from %s into %s and %s; the file is now %s%s", len(names),
             versions, path, redact(database.url), store.url, retired,
             f"; {damaged} version(s) whose files no longer match their sha256 were imported as recorded "
             "(verify refuses them, as before)" if damaged else "")


def _read(path: Path) -> _Legacy | None:
    """The old file's rows; None when another process retired it meanwhile."""
    adapters = read_rows(path, "adapters", ("name", "last_version", "champion", "created_at"), "name")
    versions = read_rows(path, "versions", ("name", "version", "metadata", "sha256", "created_at"), "name, version")
    promotions = read_rows(path, "promotions", ("name", "version", "previous", "action", "promoted_at"), "id")
    if adapters is None or versions is None or promotions is None:
        return None
    return _Legacy(adapters, versions, promotions)


def _upload(store: ArtifactStore, adapters: Path, versions: list[dict[str, Any]]) -> int:
    """Put each recorded file whose bytes still match its sha256; the number of versions with one that does not."""
    damaged = 0
    for row in versions:
        vdir, intact = adapters / row["name"] / str(row["version"]), True
        for rel, digest in json.loads(row["sha256"]).items():
            try:
                file = vdir.joinpath(*check_relpath(rel).parts)
            except ValueError:
                intact = False
                continue
            if not file.is_file() or file_sha256(file) != digest:
                intact = False
                continue
            store.put_file(file)
        damaged += not intact
    return damaged


def _new_names(conn: Connection, adapters: list[dict[str, Any]], path: Path, database: Database) -> set[str]:
    """The legacy adapters not in the database yet; LegacyImportError when one's name belongs to another registry."""
    existing = dict(conn.execute(select(registry_adapters.c.name, registry_adapters.c.created_at)).all())
    clashes = [row["name"] for row in adapters if existing.get(row["name"], row["created_at"]) != row["created_at"]]
    if clashes:
        raise LegacyImportError(
            f"cannot import the legacy registry {path}: adapter(s) {clashes} already exist in the state database "
            f"{redact(database.url)} with another history (registered there by another home); nothing was imported. "
            "Delete or rename them there, or move this file aside to start this home without its versions")
    return {row["name"] for row in adapters if row["name"] not in existing}


def _copy(conn: Connection, old: _Legacy, names: set[str]) -> None:
    adapters = [{key: row[key] for key in ("name", "last_version", "champion", "created_at")}
                for row in old.adapters if row["name"] in names]
    if not adapters:
        return
    conn.execute(insert(registry_adapters), adapters)
    versions = [{"name": row["name"], "version": row["version"], "metadata": row["metadata"],
                 "manifest": row["sha256"], "created_at": row["created_at"]}
                for row in old.versions if row["name"] in names]
    if versions:
        conn.execute(insert(registry_versions), versions)
    for row in old.promotions:  # one by one: the new ids must keep the old order, which rollback replays
        if row["name"] in names:
            conn.execute(insert(registry_promotions).values(
                **{key: row[key] for key in ("name", "version", "previous", "action", "promoted_at")}))
    changed(conn)
