"""The adapter registry's tables in the state database (`models.db.metadata`).

Revision 0005_registry (models/migrations/versions) creates them exactly as declared here; tests/test_registry_db.py
checks that the two agree on SQLite and PostgreSQL. Times are ISO 8601 strings in UTC (microseconds), as the
registry's records (`AdapterVersion.created_at`, `Promotion.promoted_at`) have always carried them.

* registry_adapters: one row per adapter name, kept after its last version is deleted, so `last_version` (the
  highest number ever given out) makes sure a number is never reused; `champion` is NULL until a promote.
* registry_versions: one row per live version; `metadata` is the merged metadata.json and `manifest` the
  {relative path: sha256} of every file (JSON text): the objects in the artifact store that make the version.
* registry_promotions: every champion change in order (`id`); rollback replays it as a stack.
* registry_generation: one row (id 1) whose value every change moves on; serving workers poll it.

Every write holds REGISTRY_LOCK (models.db) and ends with `changed(conn)`: the generation moves and a notification
goes out on models.notify.REGISTRY inside the same transaction, so both happen if and only if the change commits.
"""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    insert,
    update,
)

from models import notify
from models.db import metadata

REGISTRY_LOCK = "registry"  # the write lock (models.db) of every registry change, of every home on the database
ACTIONS = ("promote", "rollback")
_NAME = 64  # models.registry_interface.NAME_PATTERN: at most 64 characters

registry_adapters = Table(
    "registry_adapters", metadata,
    Column("name", String(_NAME), primary_key=True),
    Column("last_version", Integer, nullable=False),
    Column("champion", Integer),
    Column("created_at", Text, nullable=False),
)  # fmt: skip

registry_versions = Table(
    "registry_versions", metadata,
    Column("name", String(_NAME), ForeignKey("registry_adapters.name"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("manifest", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    PrimaryKeyConstraint("name", "version"),
)  # fmt: skip

registry_promotions = Table(
    "registry_promotions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(_NAME), ForeignKey("registry_adapters.name"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("previous", Integer),
    Column("action", String(16), nullable=False),
    Column("promoted_at", Text, nullable=False),
    CheckConstraint("action IN ('promote', 'rollback')", name="action"),
    Index("ix_registry_promotions_name_id", "name", "id"),
)  # fmt: skip

registry_generation = Table(
    "registry_generation", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
)  # fmt: skip

TABLES = (registry_adapters, registry_versions, registry_promotions, registry_generation)


def changed(conn: Connection) -> None:
    """Inside a write of REGISTRY_LOCK: move the generation on and tell every listener to look (on commit only)."""
    moved = conn.execute(update(registry_generation).where(registry_generation.c.id == 1).values(
        value=registry_generation.c.value + 1))
    if not moved.rowcount:  # the revision inserts the row; a hand-made database may lack it
        conn.execute(insert(registry_generation).values(id=1, value=1))
    notify.publish(conn, notify.REGISTRY)
