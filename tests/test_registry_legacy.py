"""The one-time import of a legacy registry (models/registry_legacy.py): a `<home>/registry.db` as the SQLite registry
wrote it (its schema copied below, as it was) with its files under `<home>/adapters/`, on SQLite and PostgreSQL, on a
local artifact directory and S3: rows, history and numbering carried over, files in the store, imported once, a
damaged file refused as before, a name clash or a failure part-way changing nothing, a kill at each phase."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from state_backend import use_backend

from models import registry_legacy
from models.registry import (
    CRASH_ENV,
    CorruptAdapterError,
    LegacyImportError,
    Promotion,
    Registry,
    UnfetchableAdapterError,
)
from models.state import close_all

HELPER = Path(__file__).with_name("registry_crash_helper.py")
LEGACY_CRASH_PHASES = ("import_before_commit", "import_after_commit")

# models/registry.py's _SCHEMA before the registry moved to the state database (PRAGMA user_version = 1)
OLD_SCHEMA = """
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
PRAGMA user_version = 1;
"""
CAM_CREATED = "2026-01-02T03:04:05.000006+00:00"
COLD_CREATED = "2026-01-03T00:00:00.000001+00:00"
# cam: v1..v3 registered, v2 deleted; promote 1, promote 3, rollback to 1. cold: one version, never promoted.
PROMOTIONS = [
    ("cam", 1, None, "promote", "2026-01-04T00:00:00.000001+00:00"),
    ("cam", 3, 1, "promote", "2026-01-05T00:00:00.000001+00:00"),
    ("cam", 1, 3, "rollback", "2026-01-06T00:00:00.000001+00:00"),
]
LIVE = {("cam", 1), ("cam", 3), ("cold", 1)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(name: str, version: int) -> dict[str, bytes]:
    meta = {"backbone": "resnet18", "classes": ["0", "1"], "of": f"{name}/{version}"}
    return {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
            "adapter_model.safetensors": f"weights of {name} v{version}".encode() * 64,
            "metadata.json": json.dumps(meta, indent=2, sort_keys=True).encode(),
            "samples/reference.npz": f"samples of {name}".encode()}


def legacy_home(home: Path) -> Path:
    """A home as the SQLite registry left it: registry.db (WAL, like the old code's) and adapters/<name>/<version>/,
    plus a dead writer's row-less dir (adapters/cam/9) the old open would have swept."""
    adapters = home / "adapters"
    (adapters / "cam" / "9").mkdir(parents=True)
    with closing(sqlite3.connect(home / "registry.db", isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO adapters VALUES ('cam', 3, 1, ?), ('cold', 1, NULL, ?)", (CAM_CREATED, COLD_CREATED))
        for name, version in sorted(LIVE):
            files = _files(name, version)
            for rel, data in files.items():
                (adapters / name / str(version) / rel).parent.mkdir(parents=True, exist_ok=True)
                (adapters / name / str(version) / rel).write_bytes(data)
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?)", (
                name, version, json.dumps(json.loads(files["metadata.json"]), sort_keys=True),
                json.dumps({rel: _sha(data) for rel, data in files.items()}, sort_keys=True),
                f"2026-01-0{version}T12:00:00.000000+00:00"))
        db.executemany("INSERT INTO promotions (name, version, previous, action, promoted_at) VALUES (?, ?, ?, ?, ?)",
                       PROMOTIONS)
        db.execute("UPDATE state SET value = 7 WHERE key = 'generation'")
    return home


@pytest.fixture
def shared(postgres_url: str, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Several homes (replicas) on one PostgreSQL database and one S3 bucket."""
    use_backend(postgres_url, monkeypatch)
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", s3_url)
    yield s3_url
    close_all()


def _state(registry: Registry) -> tuple[object, ...]:
    """Everything the registry says, to compare before and after."""
    infos = [(i.name, i.champion, [(v.version, v.sha256, v.created_at) for v in i.versions])
             for i in registry.list_adapters()]
    return infos, [registry.history(i[0]) for i in infos], registry.generation()


def test_a_legacy_registry_is_imported_once(tmp_path: Path, backend: str, artifacts: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    home = legacy_home(tmp_path / "home")
    with caplog.at_level(logging.INFO, logger="adaptserve.registry"):
        registry = Registry(home)
    assert f"imported 2 adapter(s) with 3 version(s) from {home / 'registry.db'}" in caplog.text
    assert not (home / "registry.db").exists() and (home / "registry.db.imported").is_file()
    assert not (home / "adapters" / "cam" / "9").exists(), "a dead writer's dir is swept after the import"

    [cam, cold] = registry.list_adapters()
    assert (cam.name, cam.champion, [v.version for v in cam.versions]) == ("cam", 1, [1, 3])
    assert (cold.name, cold.champion, [v.version for v in cold.versions]) == ("cold", None, [1])
    assert registry.history("cam") == [Promotion(n, v, p, at, a) for n, v, p, a, at in PROMOTIONS]
    assert registry.get("cam", 3).created_at == "2026-01-03T12:00:00.000000+00:00"
    assert registry.get("cam", 3).metadata["of"] == "cam/3"
    for name, version in LIVE:  # the old dirs are this home's copies; every file is in the store too
        record = registry.verify(name, version)
        assert all(registry.store.exists(digest) for digest in record.sha256.values())
        assert record.sha256["samples/reference.npz"] == _sha(_files(name, version)["samples/reference.npz"])
    assert registry.generation() == 1, "the import is one change"

    assert registry.promote("cam", 3).is_champion and registry.rollback("cam").version == 1, "history replays"
    assert registry.register("cam", _adapter_dir(tmp_path)).version == 4, "numbers 2 and 3 are never given again"
    before = _state(registry)
    assert _state(Registry(home)) == before, "a second open imports nothing"


def _adapter_dir(tmp_path: Path) -> Path:
    src = tmp_path / "new-src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (src / "metadata.json").write_text(json.dumps({"classes": ["0", "1"]}))
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(src / "adapter_model.safetensors"))
    return src


def test_another_replica_fetches_the_imported_versions(tmp_path: Path, shared: str) -> None:
    home = legacy_home(tmp_path / "a")
    weights = home / "adapters" / "cam" / "3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")  # damaged on disk before the import
    recorded = _sha(_files("cam", 3)["adapter_model.safetensors"])
    a = Registry(home)
    b = Registry(tmp_path / "b")
    assert [i.name for i in b.list_adapters()] == ["cam", "cold"]
    copy = b.verify("cam", 1).path
    assert copy == tmp_path / "b" / "adapters" / "cam" / "1"
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == _files("cam", 1)

    with pytest.raises(CorruptAdapterError) as here:  # refused on its own home, as before the import
        a.verify("cam", 3)
    assert str(here.value) == (f"adapter 'cam' version 3 is corrupt: file 'adapter_model.safetensors': expected "
                               f"sha256 {recorded}, actual {_sha(weights.read_bytes())}")
    with pytest.raises(UnfetchableAdapterError) as there:  # and never reaches another replica
        b.verify("cam", 3)
    assert str(there.value) == ("adapter 'cam' version 3 is corrupt: this home has no copy of it and the artifact "
                                f"store refused it: no artifact sha256:{recorded} in {shared}")
    assert not (tmp_path / "b" / "adapters" / "cam" / "3").exists()


def test_a_name_clash_refuses_the_import_and_changes_nothing(tmp_path: Path, shared: str) -> None:
    other = Registry(tmp_path / "other")
    other.register("cam", _adapter_dir(tmp_path))
    before = _state(other)
    home = legacy_home(tmp_path / "home")
    with pytest.raises(LegacyImportError) as err:
        Registry(home)
    assert str(err.value) == (
        f"cannot import the legacy registry {home / 'registry.db'}: adapter(s) ['cam'] already exist in the state "
        f"database {other.database.url.render_as_string(hide_password=True)} with another history (registered there "
        "by another home); nothing was imported. Delete or rename them there, or move this file aside to start this "
        "home without its versions")
    assert _state(other) == before
    assert (home / "registry.db").is_file() and (home / "adapters" / "cam" / "9").is_dir(), "nothing swept either"


def test_an_import_that_fails_part_way_leaves_database_and_file(tmp_path: Path, backend: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = legacy_home(tmp_path / "home")

    def broken(*args: object) -> None:
        raise OSError("disk full")

    original = registry_legacy.changed
    monkeypatch.setattr(registry_legacy, "changed", broken)  # after every row is inserted, before the commit
    with pytest.raises(OSError, match="disk full"):
        Registry(home)
    monkeypatch.setattr(registry_legacy, "changed", original)
    assert (home / "registry.db").is_file()
    fresh = Registry(tmp_path / "fresh") if backend.startswith("postgresql") else None  # the shared database
    if fresh is not None:
        assert _state(fresh) == ([], [], 0)
    assert [i.name for i in Registry(home).list_adapters()] == ["cam", "cold"], "the next open imports it"


def _open_in_child(home: Path, crash_at: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, CRASH_ENV: crash_at}
    return subprocess.run([sys.executable, str(HELPER), str(home), "open"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("phase", LEGACY_CRASH_PHASES)
def test_a_killed_import_leaves_everything_or_nothing(tmp_path: Path, backend: str, artifacts: str,
                                                      phase: str) -> None:
    home = legacy_home(tmp_path / "home")
    proc = _open_in_child(home, phase)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (home / "registry.db").is_file(), "the file is renamed only after the commit"
    if backend.startswith("postgresql"):  # read the shared database from a home without legacy file
        seen = _state(Registry(tmp_path / "observer"))
        assert ([i[0] for i in seen[0]], seen[2]) == (([], 0) if phase == "import_before_commit" else
                                                      (["cam", "cold"], 1))
    registry = Registry(home)  # imports (before_commit) or finds it imported and only renames (after_commit)
    assert not (home / "registry.db").exists() and (home / "registry.db.imported").is_file()
    assert [(i.name, i.champion) for i in registry.list_adapters()] == [("cam", 1), ("cold", None)]
    assert len(registry.history("cam")) == 3, "no promotion imported twice"
    assert registry.generation() == 1
    for name, version in LIVE:
        registry.verify(name, version)
