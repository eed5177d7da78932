"""models.state: one Database per URL per process; the embedded SQLite default upgraded in place, a server checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import migrations, state
from models.db import Database
from models.migrations import SchemaError


def test_embedded_default_is_created_at_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTSERVE_DATABASE_URL", raising=False)
    db = state.open_state(tmp_path / "home")
    assert (tmp_path / "home" / "state.db").is_file()
    assert migrations.current(db) == migrations.head()
    assert state.open_state(tmp_path / "home") is db, "one Database per URL per process"
    assert state.open_state(tmp_path / "other") is not db


def test_the_database_url_setting_wins_over_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", url)
    assert state.state_url(tmp_path / "a") == state.state_url(tmp_path / "b") == url


def test_a_server_database_behind_head_is_refused(postgres_url: str, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", postgres_url)
    with pytest.raises(SchemaError, match=r"run `adaptserve db upgrade`$"):
        state.open_state(tmp_path)
    migrations.upgrade(postgres_url)
    assert migrations.current(state.open_state(tmp_path)) == migrations.head()


def test_close_all_disposes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTSERVE_DATABASE_URL", raising=False)
    first = state.open_state(tmp_path)
    state.close_all()
    second = state.open_state(tmp_path)
    assert isinstance(second, Database) and second is not first
