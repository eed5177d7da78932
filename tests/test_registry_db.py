"""The registry on the state database and the artifact store: revision 0005 creates the tables
models/registry_tables.py declares (SQLite and PostgreSQL); two homes (two replicas) on one PostgreSQL database and
one S3 bucket share one registry; a version is fetched only when its files are needed, and every fetched file is
verified; a damaged or missing object is refused; every change notifies listeners on PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from safetensors.numpy import save_file
from sqlalchemy.engine import make_url
from state_backend import use_backend

from models import notify
from models.artifact_store import ArtifactStore, LocalArtifactStore
from models.db import metadata
from models.registry import CorruptAdapterError, Registry, UnfetchableAdapterError
from models.registry_tables import TABLES
from models.state import close_all


@pytest.fixture
def shared(postgres_url: str, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every home of the test on one PostgreSQL database and one S3 bucket: what replicas on two machines share."""
    use_backend(postgres_url, monkeypatch)
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", s3_url)
    yield postgres_url
    close_all()


def make_adapter(root: Path, seed: int) -> Path:
    """A small PEFT-shaped dir whose every file differs by seed (no torch needed)."""
    src = root / f"src-{seed}"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (src / "metadata.json").write_text(json.dumps({"classes": ["0", "1"], "seed": seed}))
    save_file({"w": np.full((8, 8), seed, dtype=np.float32)}, str(src / "adapter_model.safetensors"))
    (src / "model.onnx").write_bytes(f"onnx of {seed}".encode() * 100)  # what publish adds: built once, stored once
    return src


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copies(home: Path) -> list[str]:
    """The version dirs a home holds (its local copies)."""
    return sorted(p.relative_to(home / "adapters").as_posix() for p in (home / "adapters").glob("*/[0-9]*"))


def _mine(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return table is None or table.name in {t.name for t in TABLES}


def test_the_revision_creates_the_tables_as_declared(tmp_path: Path, backend: str) -> None:
    registry = Registry(tmp_path / "home")
    with registry.database.read() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _mine, "compare_type": True})
        assert compare_metadata(context, metadata) == []
    assert registry.generation() == 0, "the revision inserts the one generation row"


def test_two_replicas_share_one_registry(tmp_path: Path, shared: str, s3_url: str) -> None:
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    first = a.register("cam", make_adapter(tmp_path, 1))
    second = a.register("cam", make_adapter(tmp_path, 2))
    assert copies(a.home) == ["cam/1", "cam/2"], "a register's staged dir is its home's copy"

    [info] = b.list_adapters()
    assert (info.name, [v.version for v in info.versions]) == ("cam", [1, 2])
    assert replace(b.get("cam", 2), path=second.path) == a.get("cam", 2) and b.champion("cam") is None
    assert b.get("cam", 2).path == b.home / "adapters" / "cam" / "2"
    assert copies(b.home) == [], "reading rows downloads nothing"

    assert b.verify("cam", 2).path == tmp_path / "b" / "adapters" / "cam" / "2"
    assert tree(b.home / "adapters" / "cam" / "2") == tree(second.path) == tree(make_adapter(tmp_path / "x", 2))
    assert b.promote("cam", 1).is_champion  # verifies first: fetches v1 to this home
    assert copies(b.home) == ["cam/1", "cam/2"]
    champion = a.champion("cam")
    assert champion is not None and champion.version == 1
    assert a.generation() == b.generation() == 3

    a.delete("cam", 2)
    assert versions(b) == [1] and (b.home / "adapters" / "cam" / "2").is_dir(), "B's copy stays until B reopens"
    assert copies(Registry(b.home).home) == ["cam/1"], "the next open sweeps the copy of a deleted version"
    assert all(a.store.exists(d) for d in second.sha256.values()), "objects stay: another version may share them"
    assert b.register("cam", make_adapter(tmp_path, 3)).version == 3
    assert versions(a) == [1, 3] and a.verify("cam", 3).sha256 == b.get("cam", 3).sha256
    assert first.sha256["adapter_config.json"] == a.get("cam", 3).sha256["adapter_config.json"], "one object, shared"
    assert a.store.url == b.store.url == s3_url


def versions(registry: Registry) -> list[int]:
    return [v.version for info in registry.list_adapters() for v in info.versions]


def test_registers_from_two_replicas_get_distinct_versions(tmp_path: Path, shared: str) -> None:
    replicas = [Registry(tmp_path / "a"), Registry(tmp_path / "b")]
    sources = [make_adapter(tmp_path, i) for i in range(6)]
    got: list[int] = []
    errors: list[BaseException] = []

    def register(i: int) -> None:
        try:
            got.append(replicas[i % 2].register("cam", sources[i]).version)
        except Exception as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and sorted(got) == [1, 2, 3, 4, 5, 6]
    assert replicas[0].generation() == 6
    for version in range(1, 7):  # whichever replica registered it, the other fetches and verifies it
        replicas[0].verify("cam", version)
        replicas[1].verify("cam", version)


def _damage(store: ArtifactStore, digest: str, data: bytes | None) -> None:
    """Overwrite (or, with None, remove) a stored object behind the store's back."""
    if isinstance(store, LocalArtifactStore):
        Path(store.key(digest)).chmod(0o644)
    if data is None:
        store.fs.rm(store.key(digest))
    else:
        store.fs.pipe_file(store.key(digest), data)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_object_is_refused_at_fetch(tmp_path: Path, backend: str, artifacts: str, damage: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(tmp_path / "home")
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", registry.store.url)  # "dir": one directory for every home
    record = registry.register("cam", make_adapter(tmp_path, 1))
    registry.promote("cam", 1)
    registry.register("cam", make_adapter(tmp_path, 2))
    digest = registry.get("cam", 2).sha256["adapter_model.safetensors"]
    evil = b"poisoned weights"
    _damage(registry.store, digest, evil if damage == "corrupt" else None)
    other = Registry(tmp_path / "other") if backend.startswith("postgresql") else registry
    if other is registry:  # one home of its own database: its copy goes, so the next verify must fetch
        shutil.rmtree(registry.home / "adapters" / "cam" / "2")
    store = registry.store.url
    reason = (f"artifact sha256:{digest} in {store} is corrupt: its bytes hash to "
              f"sha256:{hashlib.sha256(evil).hexdigest()}; not served" if damage == "corrupt"
              else f"no artifact sha256:{digest} in {store}")
    for refused in (lambda: other.verify("cam", 2), lambda: other.promote("cam", 2), lambda: other.path("cam", 2)):
        with pytest.raises(UnfetchableAdapterError) as err:
            refused()
        assert isinstance(err.value, CorruptAdapterError) and err.value.status_code == 409
        assert str(err.value) == ("adapter 'cam' version 2 is corrupt: this home has no copy of it and the artifact "
                                  f"store refused it: {reason}")
    assert not (other.home / "adapters" / "cam" / "2").exists()
    assert [p.name for p in (other.home / "adapters" / "cam").iterdir() if p.name != "1"] == [], "no half copy"
    champion = other.champion("cam")
    assert champion is not None and champion.version == 1 and other.verify("cam", 1).sha256 == record.sha256


def test_every_change_notifies_listeners(tmp_path: Path, shared: str) -> None:
    registry = Registry(tmp_path / "home")
    url = make_url(shared).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {notify.REGISTRY}")
        registry.register("cam", make_adapter(tmp_path, 1))
        registry.register("cam", make_adapter(tmp_path, 2))
        registry.promote("cam", 2)
        registry.promote("cam", 2)  # no change: no notification
        registry.delete("cam", 1)
        heard = [n.channel for n in listener.notifies(timeout=2.0)]
    assert heard == [notify.REGISTRY] * 4
