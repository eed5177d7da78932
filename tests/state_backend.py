"""How a store test picks its backend from `db_url` (tests/conftest.py): the one place that knows what each needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text, update

from models import migrations
from models.db import Database, url_for_home
from models.registry_tables import REGISTRY_LOCK, TABLES, registry_adapters, registry_generation
from models.state import open_state


def use_backend(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite: ADAPTSERVE_DATABASE_URL unset, so each home has its own state.db (upgraded on first open). PostgreSQL:
    every home on `db_url`, upgraded as `adaptserve db upgrade` would (a store checks a server's schema, it does not
    create it). Call `models.state.close_all()` when the test ends: PostgreSQL's connection slots are few."""
    if db_url.startswith("postgresql"):
        migrations.upgrade(db_url)
        monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", db_url)
    else:
        monkeypatch.delenv("ADAPTSERVE_DATABASE_URL", raising=False)


def use_artifacts(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`dir`: ADAPTSERVE_ARTIFACTS_URL unset (each home's <home>/artifacts); `s3`: a fresh bucket on moto's server
    (the `s3_url` fixture, which also points the AWS_* variables at it). Returns the URL, or "dir"."""
    if kind == "s3":
        url = str(request.getfixturevalue("s3_url"))
        monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", url)
        return url
    monkeypatch.delenv("ADAPTSERVE_ARTIFACTS_URL", raising=False)
    return kind


def carry_registry(home: Path) -> None:
    """Copy the registry rows of `home`'s own `<home>/state.db` into the database the environment names now, for a
    home built on its embedded SQLite default (the session's service home) that a test then serves from another
    database. A no-op when that is the same database or already holds adapters (a second copy of the same home)."""
    target = open_state(home)
    source = Database(url_for_home(home))
    try:
        if source.url == target.url:
            return
        with source.read() as conn:
            rows = {table: [dict(row._mapping) for row in conn.execute(select(table))] for table in TABLES}
        with target.write(lock=REGISTRY_LOCK) as conn:
            if conn.execute(select(func.count()).select_from(registry_adapters)).scalar_one():
                return
            for table in TABLES:
                if table is registry_generation:
                    conn.execute(update(table).values(value=rows[table][0]["value"]))
                elif rows[table]:
                    conn.execute(insert(table), rows[table])
            if conn.dialect.name == "postgresql":  # explicit ids do not move the sequence the next insert uses
                conn.execute(text("SELECT setval(pg_get_serial_sequence('registry_promotions', 'id'), "
                                  "(SELECT coalesce(max(id), 0) + 1 FROM registry_promotions), false)"))
    finally:
        source.dispose()
