"""How a store test picks its backend from `db_url` (tests/conftest.py): the one place that knows what each needs."""

from __future__ import annotations

import pytest

from models import migrations


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
