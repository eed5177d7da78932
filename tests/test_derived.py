"""Derived files (models/derived.py) are built once for every replica sharing a state database and an artifact
store, on SQLite and PostgreSQL, on a directory and an S3 store: home A builds, home B fetches; two processes racing
build once; a builder killed mid-build leaves no row and its lease runs out; a corrupt object is refused; a failure is
not cached; and a Runtime on a second home serves the base without exporting or quantizing it again.

Run as a script, this file is the child process of the race and crash tests (it waits for a line on stdin first):
    python tests/test_derived.py build HOME KEY COUNTER NAP_S LEASE_S   (get_or_build once; prints the file's sha256)
    python tests/test_derived.py hang HOME KEY COUNTER NAP_S LEASE_S    (starts building, prints "building", hangs)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select
from state_backend import carry_registry

from models import migrations
from models.artifact_store import ArtifactError, ArtifactStore, LocalArtifactStore
from models.db import metadata
from models.derived import TABLES, DerivedBusy, DerivedError, DerivedFiles, derived_files
from models.files import file_sha256
from models.metadata import BASE
from models.state import close_all

ROOT = Path(__file__).resolve().parents[1]
KEY = "onnx:digits@test:0123abcd:base:32:opset17-torch-test"


# ------------------------------------------------------------------------------------------------------- fixtures


def _share(db_url: str, store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every home of the test on one database and one artifact store, as replicas on several machines are (SQLite
    too: a file every home names, upgraded on first open like the embedded default)."""
    if db_url.startswith("postgresql"):
        migrations.upgrade(db_url)
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", db_url)
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", store_url)


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    yield
    close_all()  # every database the test opened: PostgreSQL's connection slots are few


@pytest.fixture(params=["dir", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_url"))  # also points the AWS_* variables at moto's server
    return str(tmp_path / "shared-artifacts")


@pytest.fixture
def shared(db_url: str, store_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    _share(db_url, store_url, monkeypatch)
    return store_url


def _derived(tmp_path: Path, home: str, **kwargs: Any) -> DerivedFiles:
    return DerivedFiles.for_home(tmp_path / home, poll_s=0.05, **kwargs)


def _payload(key: str) -> bytes:
    return f"built from {key}\n".encode() * 1000


def _counting_build(counter: Path, key: str, nap_s: float = 0.0, hang: bool = False):
    """A build that appends its pid to `counter` (a line per build, across processes), then writes the key's bytes."""
    def build(path: Path) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        if hang:
            print("building", flush=True)
            time.sleep(600)
        time.sleep(nap_s)
        path.write_bytes(_payload(key))

    return build


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _builds(counter: Path) -> list[int]:
    return [int(line) for line in counter.read_text().split()] if counter.exists() else []


def _corrupt(store: ArtifactStore, digest: str) -> None:
    """Replace a stored object's bytes in place (a damaged disk or bucket)."""
    key = store.key(digest)
    if isinstance(store, LocalArtifactStore):
        os.chmod(key, 0o644)  # objects are stored read-only
    store.fs.pipe_file(key, b"not what was built")


# --------------------------------------------------------------------------------------------------------- schema


def _mine(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return table is None or table.name in {t.name for t in TABLES}


def test_the_revision_creates_the_tables_as_declared(db_url: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _share(db_url, str(tmp_path / "artifacts"), monkeypatch)
    derived = _derived(tmp_path, "a")
    with derived.database.read() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _mine, "compare_type": True})
        assert compare_metadata(context, metadata) == []


# ------------------------------------------------------------------------------------------------ build once, share


def test_home_a_builds_and_home_b_fetches_without_building(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b")
    counter = tmp_path / "builds"
    dest_a, dest_b = tmp_path / "a" / "cache" / "f.onnx", tmp_path / "b" / "cache" / "f.onnx"

    assert a.get_or_build(KEY, _counting_build(counter, KEY), dest_a) == dest_a
    assert b.get_or_build(KEY, _counting_build(counter, KEY), dest_b) == dest_b
    assert _builds(counter) == [os.getpid()]  # once, by A
    assert dest_a.read_bytes() == dest_b.read_bytes() == _payload(KEY)
    [(name, row)] = b.rows(KEY).items()
    assert (name, row.digest, row.size) == ("file", file_sha256(dest_b), len(_payload(KEY)))
    assert row.built_by.startswith(a.holder + "/") and b.lease(KEY) is None
    assert b.store.exists(row.digest) and b.store.url == shared

    assert a.get_or_build(KEY, _counting_build(counter, KEY), dest_a) == dest_a  # the local copy: nothing fetched
    assert len(_builds(counter)) == 1
    no_tmp = [p.name for p in dest_b.parent.iterdir()]
    assert no_tmp == ["f.onnx"]  # the build directory and the fetch's temporary file are gone


def test_a_different_key_builds_a_new_file(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b")
    counter, other = tmp_path / "builds", KEY.replace("0123abcd", "4567ef01")  # another base's weights
    first = a.get_or_build(KEY, _counting_build(counter, KEY), tmp_path / "a" / "1.onnx")
    second = b.get_or_build(other, _counting_build(counter, other), tmp_path / "b" / "2.onnx")
    assert len(_builds(counter)) == 2 and second.read_bytes() == _payload(other) != first.read_bytes()
    assert a.rows(other)["file"].built_by.startswith(b.holder + "/")
    assert a.rows(KEY)["file"].digest != a.rows(other)["file"].digest


def test_the_local_copy_is_verified_on_every_use(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b")
    counter, dest = tmp_path / "builds", tmp_path / "b" / "f.onnx"
    a.get_or_build(KEY, _counting_build(counter, KEY), tmp_path / "a" / "f.onnx")
    b.get_or_build(KEY, _counting_build(counter, KEY), dest)
    dest.write_bytes(b"damaged on this replica's disk")
    assert b.get_or_build(KEY, _counting_build(counter, KEY), dest).read_bytes() == _payload(KEY)
    assert len(_builds(counter)) == 1  # fetched again, verified, not rebuilt


def test_a_corrupt_object_is_refused_and_not_served(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b")
    counter, dest_a, dest_b = tmp_path / "builds", tmp_path / "a" / "f.onnx", tmp_path / "b" / "f.onnx"
    a.get_or_build(KEY, _counting_build(counter, KEY), dest_a)
    digest = a.rows(KEY)["file"].digest
    _corrupt(a.store, digest)

    with pytest.raises(ArtifactError, match=rf"^artifact sha256:{digest} in {re.escape(shared)} is corrupt: its bytes "
                                            rf"hash to sha256:{_sha(b'not what was built')}; not served$"):
        b.get_or_build(KEY, _counting_build(counter, KEY), dest_b)
    assert not dest_b.exists() and list(dest_b.parent.iterdir()) == []
    assert len(_builds(counter)) == 1  # refused, not silently rebuilt over a row that says otherwise
    # A's own copy still verifies against the row, so A keeps serving it
    assert a.get_or_build(KEY, _counting_build(counter, KEY), dest_a).read_bytes() == _payload(KEY)


def test_a_replica_on_the_same_database_but_another_store_is_told_to_share_the_store(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _share(db_url, str(tmp_path / "store-a"), monkeypatch)
    a = _derived(tmp_path, "a")
    a.get_or_build(KEY, _counting_build(tmp_path / "builds", KEY), tmp_path / "a" / "f.onnx")
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", str(tmp_path / "store-b"))
    b = _derived(tmp_path, "b")
    row = b.rows(KEY)["file"]
    with pytest.raises(ArtifactError) as refused:
        b.get_or_build(KEY, _counting_build(tmp_path / "builds", KEY), tmp_path / "b" / "f.onnx")
    assert str(refused.value) == (
        f"derived file 'file' of '{KEY}' was built by {row.built_by}, but LocalArtifactStore("
        f"'{tmp_path / 'store-b'}') has no object sha256:{row.digest}: replicas that share a state database must "
        "share its artifact store too (set ADAPTSERVE_ARTIFACTS_URL on each)")
    assert len(_builds(tmp_path / "builds")) == 1 and not (tmp_path / "b" / "f.onnx").exists()


def test_a_failed_build_is_not_cached_and_the_next_caller_builds(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b")
    counter, dest = tmp_path / "builds", tmp_path / "a" / "f.onnx"

    def crash(path: Path) -> None:
        _counting_build(counter, KEY)(path)
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="^exporter crashed$"):
        a.get_or_build(KEY, crash, dest)
    with pytest.raises(DerivedError, match=f"^the build of '{KEY}' wrote no file$"):
        a.get_or_build(KEY, lambda path: None, dest)
    assert a.rows(KEY) == {} and a.lease(KEY) is None and not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == []  # no build directory left
    b.get_or_build(KEY, _counting_build(counter, KEY), tmp_path / "b" / "f.onnx")
    assert len(_builds(counter)) == 2 and a.rows(KEY)["file"].built_by.startswith(b.holder + "/")


def test_several_files_of_one_build_are_published_together(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b")
    key = "int8:" + "ab" * 32 + ":qdq:cal64"
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "model.int8.onnx").write_bytes(b"int8 graph")
        (tmp / "int8.json").write_text('{"accuracy_int8": 0.99}')

    names = ("model.int8.onnx", "int8.json")
    got_a = a.get_or_build_files(key, build, {n: tmp_path / "a" / f"x.{n}" for n in names})
    got_b = b.get_or_build_files(key, build, {n: tmp_path / "b" / f"x.{n}" for n in names})
    assert len(calls) == 1 and sorted(b.rows(key)) == ["int8.json", "model.int8.onnx"]
    assert [got_b[n].read_bytes() for n in names] == [got_a[n].read_bytes() for n in names] == [
        b"int8 graph", b'{"accuracy_int8": 0.99}']


def test_a_caller_waits_for_a_live_builder_at_most_wait_s(shared: str, tmp_path: Path) -> None:
    a, b = _derived(tmp_path, "a"), _derived(tmp_path, "b", wait_s=0.3)
    started, finish = threading.Event(), threading.Event()

    def slow(path: Path) -> None:
        started.set()
        finish.wait(30)
        path.write_bytes(_payload(KEY))

    builder = threading.Thread(target=a.get_or_build, args=(KEY, slow, tmp_path / "a" / "f.onnx"))
    builder.start()
    assert started.wait(30)
    holder = a.lease(KEY).holder
    began = time.monotonic()
    busy = rf"^derived files of '{KEY}': still being built by {re.escape(holder)} after 0.3 s of waiting; "
    with pytest.raises(DerivedBusy, match=busy + r"not built here \(try again later\)$"):
        b.get_or_build(KEY, _counting_build(tmp_path / "builds", KEY), tmp_path / "b" / "f.onnx")
    assert 0.3 <= time.monotonic() - began < 5
    finish.set()
    builder.join(30)
    assert b.get_or_build(KEY, lambda path: None, tmp_path / "b" / "f.onnx").read_bytes() == _payload(KEY)
    assert not (tmp_path / "builds").exists()


# ----------------------------------------------------------------------------------------------- other processes


def _child(role: str, home: Path, counter: Path, nap_s: float = 0.0, lease_s: float = 60.0) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, __file__, role, str(home), KEY, str(counter), str(nap_s), str(lease_s)],
                             env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"  # it has opened the database
    return child


def _go(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()


def test_two_processes_racing_build_once(shared: str, tmp_path: Path) -> None:
    counter = tmp_path / "builds"
    children = [_child("build", tmp_path / home, counter, nap_s=1.0) for home in ("a", "b")]
    for child in children:
        _go(child)
    digests = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        digests.append(out.strip())
    [builder] = _builds(counter)
    assert builder in {c.pid for c in children}
    assert digests[0] == digests[1] == _sha(_payload(KEY))
    row = _derived(tmp_path, "c").rows(KEY)["file"]
    assert row.digest == digests[0] and f":{builder}:" in row.built_by


def test_a_builder_killed_mid_build_leaves_no_row_and_its_lease_runs_out(shared: str, tmp_path: Path) -> None:
    counter, lease_s, cache = tmp_path / "builds", 2.0, tmp_path / "a" / "cache"
    child = _child("hang", tmp_path / "a", counter, lease_s=lease_s)
    _go(child)
    assert child.stdout is not None and child.stdout.readline() == "building\n"
    b = _derived(tmp_path, "b")
    lease = b.lease(KEY)
    assert lease is not None and f":{child.pid}:" in lease.holder
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert b.rows(KEY) == {}
    remaining = b.lease(KEY).until - time.time()  # the dead builder's lease still stands: nobody may take it yet
    assert 0 < remaining <= lease_s
    [left] = cache.iterdir()  # its half-done build directory
    assert left.name.startswith(f".derived-{socket.gethostname()}-{child.pid}-")

    began = time.monotonic()
    dest = b.get_or_build(KEY, _counting_build(counter, KEY), tmp_path / "b" / "f.onnx")
    waited = time.monotonic() - began
    assert remaining - 0.2 <= waited <= remaining + 3  # it waited for the lease to run out, then built
    assert _builds(counter) == [child.pid, os.getpid()]
    assert dest.read_bytes() == _payload(KEY) and b.rows(KEY)["file"].built_by.startswith(b.holder + "/")
    assert b.lease(KEY) is None

    restarted = _derived(tmp_path, "a")  # the dead builder's home again: fetches, and a build there tidies up
    restarted.get_or_build(KEY, _counting_build(counter, KEY), cache / "f.onnx")
    restarted.get_or_build(KEY.replace("base", "adapter-1"), _counting_build(counter, KEY), cache / "g.onnx")
    assert sorted(p.name for p in cache.iterdir()) == ["f.onnx", "g.onnx"] and len(_builds(counter)) == 3


def test_db_copy_moves_the_derived_rows_with_their_objects() -> None:
    """`adaptserve db copy` copies every table registered when it runs: the derived ones too, in a fresh process."""
    code = ("import pipelines.db_cli; from models.state_copy import copied_tables; "
            "print([t.name for t in copied_tables()])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                         capture_output=True, timeout=120, check=True).stdout
    assert "'derived_files'" in out and "'derived_leases'" in out


# ---------------------------------------------------------------------------------------------- the serving engine


@pytest.fixture
def shared_dir(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    _share(db_url, str(tmp_path / "shared-artifacts"), monkeypatch)
    return db_url


def _count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """How often the engine calls each of its functions `names` (export_onnx, build_int8) from now on."""
    # the service (torch, ONNX Runtime) only in the engine tests: the child processes of this file do not need it
    import service.engine

    calls = dict.fromkeys(names, 0)

    def counted(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in names:
        monkeypatch.setattr(service.engine, name, counted(name, getattr(service.engine, name)))
    return calls


def test_a_runtime_on_a_second_home_does_not_export_or_quantize_the_base_again(
    shared_dir: str, source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the service only in the engine tests: the child processes this file runs as do not need it
    from service.config import ServiceConfig
    from service.runtime import Runtime

    calls = _count_calls(monkeypatch, "export_onnx", "build_int8")

    def runtime(home: str) -> Runtime:
        return Runtime(ServiceConfig(home=tmp_path / home, base_model=source_model, engine="onnx-int8",
                                     monitor=False, feedback_max=0, threads=1))

    began = time.perf_counter()
    a = runtime("a")
    first_s = time.perf_counter() - began
    assert calls == {"export_onnx": 1, "build_int8": 1}
    began = time.perf_counter()
    b = runtime("b")
    second_s = time.perf_counter() - began
    assert calls == {"export_onnx": 1, "build_int8": 1}  # B fetched both
    assert b.engine.served[BASE] == a.engine.served[BASE] and b.engine.served[BASE]["precision"] == "int8"
    assert second_s < first_s, (first_s, second_s)

    cached = {home: sorted((tmp_path / home / "onnx-cache").rglob("*.*")) for home in ("a", "b")}
    assert [p.name for p in cached["a"]] == [p.name for p in cached["b"]] and len(cached["a"]) == 3
    assert [file_sha256(p) for p in cached["a"]] == [file_sha256(p) for p in cached["b"]]
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(a.engine.run(x, [BASE] * 3)[0], b.engine.run(x, [BASE] * 3)[0])
    a.close()
    b.close()

    # the int8 file damaged in the store: a third replica serves fp32 and says why; nothing is rebuilt
    int8 = next(p for p in cached["a"] if p.name.endswith(".int8.onnx"))
    _corrupt(LocalArtifactStore(tmp_path / "shared-artifacts"), file_sha256(int8))
    c = runtime("c")
    served = c.engine.served[BASE]
    assert served["precision"] == "fp32" and calls == {"export_onnx": 1, "build_int8": 1}
    assert served["reason"].startswith(f"int8 files not fetched: artifact sha256:{file_sha256(int8)} in ")
    assert served["reason"].endswith("is corrupt: its bytes hash to "
                                     f"sha256:{_sha(b'not what was built')}; not served")
    c.close()


def test_a_version_without_its_onnx_file_is_exported_once_for_every_replica(
    shared_dir: str, source_model: Path, service_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the service only in the engine tests: the child processes this file runs as do not need it
    from models.artifacts import load_model
    from models.registry import open_registry
    from service.engine import OnnxEngine

    carry_registry(service_home)  # the session's home registered its versions on its own embedded database
    registry = open_registry(service_home)
    versions = {}
    for key in [("site-a", 1), ("site-a", 2)]:  # copies as a registry without pre-built ONNX files would hold them
        versions[key] = tmp_path / f"{key[0]}-v{key[1]}"
        shutil.copytree(registry.path(*key), versions[key], ignore=shutil.ignore_patterns("model.onnx"))
    calls = _count_calls(monkeypatch, "export_onnx")

    def engine(home: str) -> OnnxEngine:
        built = OnnxEngine(*load_model(source_model), tmp_path / home / "onnx-cache", threads=1,
                           derived=_derived(tmp_path, home))
        for key, path in versions.items():
            built.load(key, path)
        return built

    a = engine("a")
    assert calls == {"export_onnx": 3}  # the base and both versions: another adapter is another key
    b = engine("b")
    assert calls == {"export_onnx": 3}
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    for key in versions:
        np.testing.assert_array_equal(a.run(x, [key] * 2)[0], b.run(x, [key] * 2)[0])
    assert np.abs(b.run(x, [("site-a", 1)] * 2)[0] - b.run(x, [("site-a", 2)] * 2)[0]).max() > 1e-3
    with a.derived.database.read() as conn:
        keys = sorted(conn.scalars(select(derived_files.c.key)))
    assert [k.split(":")[3].split("-")[0] for k in keys] == ["adapter", "adapter", "base"]


# ------------------------------------------------------------------------------------------------ child processes


def _main(argv: list[str]) -> int:
    role, home, key, counter, nap_s, lease_s = argv
    derived = DerivedFiles.for_home(Path(home), lease_s=float(lease_s), poll_s=0.05)
    print("ready", flush=True)
    sys.stdin.readline()
    build = _counting_build(Path(counter), key, float(nap_s), hang=role == "hang")
    print(file_sha256(derived.get_or_build(key, build, Path(home) / "cache" / "f.onnx")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
