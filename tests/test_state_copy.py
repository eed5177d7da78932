"""`adaptserve db copy`: an embedded home (SQLite + a local artifact directory) built through the stores, copied to a
real PostgreSQL database (a SQLite file too) and a real S3-compatible store (moto), then compared table by table over
`models.db.metadata`, so a table added later is covered without touching this file. Also: the stores read the same
state on the destination and insert after it (sequences), a second copy is refused, a copy killed among its row
batches leaves no rows and a rerun completes, the dry run writes nothing and the copy only reads the source, a store
that cannot be reached stops the copy before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.filesize import decimal
from safetensors.numpy import save as save_safetensors
from servers import free_port  # tests/ is on sys.path (rootdir)
from sqlalchemy import Table, inspect, select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from models import migrations
from models.artifact_store import LocalArtifactStore, open_store
from models.db import Database, redact, url_for_home
from models.derived import DerivedFiles
from models.registry import open_registry
from models.state import close_all
from models.state_copy import CRASH_ENV, copied_tables, list_objects, occupied, seeded_keys
from monitoring.capture import CaptureStore, PredictionRecord, make_records
from monitoring.history import DriftHistory
from monitoring.image_stats import STAT_NAMES
from monitoring.leases import DriftLeases
from pipelines import db_cli
from pipelines.jobs import JobStore
from pipelines.label_trust import Trust
from pipelines.labels import LabelStore
from pipelines.schedules import ScheduleStore
from service.inputs import InputCache

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
ADAPTERS = ["site-a", "site-b", "site-c"]
DIM = 16
LEGACY_CHECKS = """
CREATE TABLE drift_checks (id INTEGER PRIMARY KEY, adapter TEXT NOT NULL, version INTEGER NOT NULL,
    checked_at REAL NOT NULL, drift INTEGER NOT NULL, score REAL NOT NULL, threshold REAL NOT NULL,
    p_value REAL NOT NULL, window_size INTEGER NOT NULL, features TEXT NOT NULL, report TEXT, mean_confidence REAL);
"""
# rows per table of the home `built_home` makes; a table it leaves empty fails the copy test (see there)
EXPECTED_ROWS = {
    "adaptserve_info": 2, "jobs": 2, "schedules": 2, "jobs_state": 1, "labels": 2, "label_events": 3,
    "label_conflicts": 1, "feedback_inputs": 3, "feedback_input_counts": 2, "capture_records": 30,
    "drift_checks": 4, "drift_leases": 1, "derived_files": 2, "derived_leases": 1,
}


@dataclass
class BuiltHome:
    path: Path
    objects: dict[str, bytes]  # sha256 -> bytes, every object put through the store
    conflicted: str  # the label id with a pending conflict


@pytest.fixture(autouse=True)
def _embedded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts from an embedded home: no server database, no remote store in the environment."""
    for name in ("ADAPTSERVE_DATABASE_URL", "ADAPTSERVE_ARTIFACTS_URL", CRASH_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    close_all()  # PostgreSQL's connection slots are few


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def records(n: int, seed: int, start: float) -> list[PredictionRecord]:
    rng = np.random.default_rng(seed)
    made = make_records("site-a", 1, [f"p{seed}-{i}" for i in range(n)], rng.normal(size=(n, DIM)).astype(np.float32),
                        rng.random((n, len(STAT_NAMES))), rng.dirichlet(np.ones(len(CLASSES)), n), CLASSES)
    for i, r in enumerate(made):
        r.created_at = start + i
    return made


def check(score: float) -> dict[str, Any]:
    return {"adapter": "site-a", "version": 1, "drift": score > 1, "score": score, "threshold": 1.0, "p_value": 0.01,
            "window_size": 200, "features": {"embedding": {"moved": score > 1}}, "mean_confidence": 0.9}


def tiny_adapter(tmp_path: Path) -> Path:
    """A PEFT-shaped directory the registry accepts (as tests/test_registry.py makes them), without torch."""
    src = tmp_path / "adapter-src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (src / "adapter_model.safetensors").write_bytes(save_safetensors({"w": np.eye(4, dtype=np.float32)}))
    (src / "metadata.json").write_text(json.dumps({"backbone": "resnet18", "classes": CLASSES}))
    return src


@pytest.fixture
def built_home(tmp_path: Path) -> BuiltHome:
    """A home with real content in every store, a legacy monitor.db the copy's opening must import, and objects."""
    home = tmp_path / "home"
    jobs = JobStore(home, known_adapters=ADAPTERS)
    queued = jobs.submit("site-a", "manual", "by hand")
    jobs.submit("site-b", "drift", "drifted")
    jobs.claim_next(pid=123, runner_id="r1")
    jobs.finish(queued.id, "succeeded", {"version": 2, "gate": {"passed": True}})
    jobs.claim_next(pid=123, runner_id="r1")  # site-b's: running, with its runner and lease
    schedules = ScheduleStore(home, known_adapters=ADAPTERS)
    for cron in ("0 * * * *", "30 2 * * *", "15 * * * 1"):
        schedules.add("site-a", cron)
    schedules.delete(3)  # sqlite_sequence remembers 3: the destination must not hand out 3 again

    labels = LabelStore(home)
    labels.add("site-a", image(1), "cat", CLASSES, "feedback", "p1-0", sender="token:a")
    conflicted = labels.add("site-a", image(1), "dog", CLASSES, "feedback", sender="token:b").label_id
    labels.add("site-a", image(2), "fox", CLASSES, "upload", trust=Trust.TRUSTED, sender="cli:data-add")
    InputCache(home).put_many("site-a", 1, ["p1-0", "p1-1", "p1-2"], [image(3), image(4), image(5)])
    CaptureStore(home, max_per_adapter=100, retention_s=1e12).add_many(records(30, seed=1, start=1e9))
    history = DriftHistory(home)
    history.add(check(0.5), 2e9)
    history.add(check(1.5), 2e9 + 60)
    shared = DerivedFiles.for_home(home, holder="h2")
    shared.get_or_build_files("int8:test", lambda tmp: [(tmp / n).write_text(n) for n in ("model", "report")],
                              {"model": tmp_path / "int8" / "m", "report": tmp_path / "int8" / "r"})
    shared._acquire("onnx:test", "h2/killed")  # the lease a builder killed mid-build leaves (until it runs out)
    DriftLeases(home, 60.0, holder="h1").acquire("site-a", now=2e9)
    registry = open_registry(home)  # its rows in state.db, its files in home/artifacts
    registry.promote("site-a", registry.register("site-a", tiny_adapter(tmp_path)).version)

    store = LocalArtifactStore(home / "artifacts")
    blobs = [b"model weights " * 1000, os.urandom(300_000), b""]
    objects = {}
    for i, blob in enumerate(blobs):
        (tmp_path / f"blob{i}").write_bytes(blob)
        objects[store.put_file(tmp_path / f"blob{i}")] = blob
    with closing(sqlite3.connect(home / "monitor.db")) as old:  # last: only the copy's opening imports it
        old.executescript(LEGACY_CHECKS)
        old.executemany("INSERT INTO drift_checks (adapter, version, checked_at, drift, score, threshold, p_value, "
                        "window_size, features, report, mean_confidence) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        [("site-b", 1, 1e9 + i, i, 0.5 + i, 1.0, 0.2, 100, "{}", None, 0.8) for i in range(2)])
        old.commit()
    close_all()
    return BuiltHome(home, objects, conflicted)


def copy(dest: str, artifacts: str, *extra: str) -> Any:
    return CliRunner().invoke(db_cli.app, ["copy", "--to-database", dest, "--to-artifacts", artifacts, *extra])


def rows(url: str, table: Table) -> list[tuple[Any, ...]]:
    database = Database(url)
    try:
        with database.read() as conn:
            if not inspect(conn).has_table(table.name):
                return []
            return [tuple(r) for r in conn.execute(select(table).order_by(*table.primary_key.columns))]
    finally:
        database.dispose()


def holds_no_rows(url: str) -> None:
    """Only what an upgrade seeds, if anything: the state a killed or refused copy must leave behind."""
    database = Database(url)
    try:
        with database.read() as conn:
            assert occupied(conn) == {}
    finally:
        database.dispose()
    for table in copied_tables():
        assert len(rows(url, table)) == len(seeded_keys().get(table.name, ())), table.name


# ---------------------------------------------------------------------------------------------------- the copy


def test_a_home_is_copied_whole(built_home: BuiltHome, db_url: str, s3_url: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """To PostgreSQL and to a SQLite file (db_url): the copy is generic over the backend."""
    home, source, dest_url = built_home.path, url_for_home(built_home.path), db_url
    result = copy(dest_url, s3_url, "--home", str(home), "--batch-rows", "7")
    assert result.exit_code == 0, result.output
    assert (home / "monitor.db.imported").is_file() and not (home / "monitor.db").exists()

    copied = {t.name: rows(source, t) for t in copied_tables()}
    empty = sorted(name for name, found in copied.items() if not found)
    assert empty == [], "give these tables rows in built_home, so the copy test covers them"
    assert {name: len(found) for name, found in copied.items() if name in EXPECTED_ROWS} == EXPECTED_ROWS
    for table in copied_tables():
        assert rows(dest_url, table) == copied[table.name], table.name

    source_store, dest_store = LocalArtifactStore(home / "artifacts"), open_store(s3_url)
    objects = list_objects(source_store)  # the test's own, and whatever a store put there (a registry's files)
    assert set(built_home.objects) <= {d for d, _ in objects} and list_objects(dest_store) == objects
    for digest, _ in objects:  # fetched and verified from S3
        copied_bytes = dest_store.get_file(digest, tmp_path / "fetched").read_bytes()
        assert copied_bytes == source_store.get_file(digest, tmp_path / "source").read_bytes()
        assert copied_bytes == built_home.objects.get(digest, copied_bytes)

    shown, size = redact(dest_url), decimal(sum(n for _, n in objects))
    assert (f"objects: {len(objects)} in {home / 'artifacts'}; copied {len(objects)} ({size}) to {s3_url}, 0 already "
            "there") in result.output
    assert f"  ADAPTSERVE_DATABASE_URL={shown}\n  ADAPTSERVE_ARTIFACTS_URL={s3_url}\n" in result.output
    assert "schedules.id next 4" in result.output
    for name, n in EXPECTED_ROWS.items():  # the summary's table: one line per table, the rows right-aligned
        assert re.search(rf"^│ {name} +│ +{n} │$", result.output, re.MULTILINE), name

    # a second copy is refused, names what is there and changes nothing
    again = copy(dest_url, s3_url, "--home", str(home))
    held = ", ".join(f"{t.name} {len(copied[t.name]) - len(seeded_keys().get(t.name, ()))}" for t in copied_tables()
                     if len(copied[t.name]) > len(seeded_keys().get(t.name, ())))
    name = make_url(dest_url).database
    start_over = (f"remove {name} or name another file" if dest_url.startswith("sqlite") else
                  f"drop and recreate the database (`dropdb {name} && createdb {name}`) or pass --to-database an "
                  "empty one")
    assert (again.exit_code, again.output) == (1, f"error: destination {shown} already holds rows ({held}); no rows "
                                                  "were written: db copy writes only into an empty database. To start "
                                                  f"over, {start_over}\n")
    assert {t.name: rows(dest_url, t) for t in copied_tables()} == copied
    looked = copy(dest_url, s3_url, "--home", str(home), "--dry-run")  # the plan, then the same refusal
    assert looked.exit_code == 1
    tail = rf"\ndry run: nothing written \(\d+\.\d s\)\n{re.escape(again.output)}$"
    assert re.search(tail, looked.output), looked.output

    # the stores of a replica on the destination read the same state, and go on from it
    before_jobs = JobStore(home, known_adapters=ADAPTERS).list()
    before_labels = LabelStore(home)
    history_before = before_labels.history(built_home.conflicted)
    conflicts_before = before_labels.conflicts("site-a", unresolved_only=False)
    close_all()
    monkeypatch.setenv("ADAPTSERVE_DATABASE_URL", dest_url)
    monkeypatch.setenv("ADAPTSERVE_ARTIFACTS_URL", s3_url)
    replica = tmp_path / "replica"
    jobs = JobStore(replica, known_adapters=ADAPTERS)
    assert jobs.list() == before_jobs and [j.state for j in before_jobs] == ["running", "succeeded"]
    labels = LabelStore(replica)
    assert labels.history(built_home.conflicted) == history_before and len(history_before) == 2
    assert labels.conflicts("site-a", unresolved_only=False) == conflicts_before and len(conflicts_before) == 1

    assert jobs.submit("site-c").adapter == "site-c"
    assert ScheduleStore(replica, known_adapters=ADAPTERS).add("site-b", "0 3 * * *").id == 4
    assert labels.add("site-b", image(9), "cat", CLASSES, "feedback", sender="token:c").outcome == "added"
    assert len(labels.history(built_home.conflicted)) == 2  # events of another example did not collide
    assert DriftHistory(replica).add(check(0.7), 3e9) == (5, 3)  # id 5: after the copied 4; site-a's third check
    captured = CaptureStore(replica, max_per_adapter=100, retention_s=1e12)
    assert captured.add_many(records(2, seed=9, start=3e9)) == 2 and captured.count("site-a") == 32
    assert InputCache(replica).put_many("site-a", 1, ["p9-0"], [image(6)]) == 1
    registry = open_registry(replica)  # the registry's rows came with the copy, its files from S3 on first use
    champion = registry.champion("site-a")
    assert champion is not None and registry.verify("site-a", champion.version).path.is_dir()
    assert [p.action for p in registry.history("site-a")] == ["promote"]
    (tmp_path / "next").mkdir()
    assert registry.register("site-a", tiny_adapter(tmp_path / "next")).version == 2


def test_a_copy_killed_among_its_row_batches_leaves_no_rows_and_a_rerun_completes(
        built_home: BuiltHome, postgres_url: str, s3_url: str) -> None:
    env = {**os.environ, CRASH_ENV: "3", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-m", "pipelines.cli", "db", "copy", "--to-database", postgres_url,
                            "--to-artifacts", s3_url, "--home", str(built_home.path), "--batch-rows", "2"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert migrations.current(postgres_url) == migrations.head()  # the upgrade had committed, no row had
    holds_no_rows(postgres_url)
    dest_store = open_store(s3_url)
    objects = list_objects(LocalArtifactStore(built_home.path / "artifacts"))
    assert list_objects(dest_store) == objects and len(objects) >= 3  # objects go first, and stay: content-addressed

    result = copy(postgres_url, s3_url, "--home", str(built_home.path))
    assert result.exit_code == 0, result.output
    assert f"copied 0 (0 bytes) to {s3_url}, {len(objects)} already there" in result.output
    for table in copied_tables():
        assert rows(postgres_url, table) == rows(url_for_home(built_home.path), table), table.name


def test_a_dry_run_writes_nothing_and_the_copy_only_reads_the_source(built_home: BuiltHome, postgres_url: str,
                                                                     s3_url: str) -> None:
    result = copy(postgres_url, s3_url, "--home", str(built_home.path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"would copy from {built_home.path} to {redact(postgres_url)}" in result.output
    objects = list_objects(LocalArtifactStore(built_home.path / "artifacts"))
    assert (f"objects: {len(objects)} in {built_home.path / 'artifacts'}; would copy {len(objects)} "
            f"({decimal(sum(n for _, n in objects))}) to {s3_url}, 0 already there") in result.output
    assert (f"destination schema: revision none (empty); a copy upgrades it to {migrations.head()} first\n"
            "dry run: nothing written") in result.output
    assert migrations.current(postgres_url) is None and list_objects(open_store(s3_url)) == []
    database = Database(postgres_url)
    assert inspect(database.engine).get_table_names() == []
    database.dispose()

    # the copy after it leaves the source as the dry run's opening left it (its legacy import done)
    source = url_for_home(built_home.path)
    before = {t.name: rows(source, t) for t in copied_tables()}
    assert copy(postgres_url, s3_url, "--home", str(built_home.path)).exit_code == 0
    assert {t.name: rows(source, t) for t in copied_tables()} == before
    assert list_objects(LocalArtifactStore(built_home.path / "artifacts")) == objects


@pytest.mark.parametrize(("args", "env", "message"), [
    pytest.param(["--to-database", "mysql://app@db/state", "--to-artifacts", "/tmp/x"], {},
                 "error: --to-database='mysql://app@db/state': unsupported backend 'mysql'; use sqlite:///PATH or "
                 "postgresql+psycopg://USER:PASSWORD@HOST/DB\n", id="unsupported-database"),
    pytest.param(["--to-database", "postgresql://u@h/db", "--to-artifacts", "ftp://host/x"], {},
                 "error: --to-artifacts='ftp://host/x': unsupported store; use a directory or s3://BUCKET/PREFIX\n",
                 id="unsupported-store"),
    pytest.param(["--to-database", "postgresql://u:pw@h/db", "--to-artifacts", "/tmp/x"],
                 {"ADAPTSERVE_DATABASE_URL": "postgresql+psycopg://u:pw@h/db"},
                 "error: the destination is this home's own database (postgresql+psycopg://u:***@h/db): unset "
                 "ADAPTSERVE_DATABASE_URL to copy the embedded home at {home}\n", id="destination-is-the-source"),
    pytest.param(["--to-database", "postgresql://u@h/db", "--to-artifacts", "/tmp/x"], {},
                 "error: no home at {home}: name the state directory to copy with --home or ADAPTSERVE_HOME\n",
                 id="no-such-home"),
])
def test_a_copy_that_cannot_go_ahead_says_why(args: list[str], env: dict[str, str], message: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(db_cli.app, ["copy", *args, "--home", str(tmp_path / "h")])
    assert (result.exit_code, result.output) == (1 if "own database" in message else 2,
                                                 message.format(home=tmp_path / "h"))
    assert not (tmp_path / "h").exists()


def test_an_unreachable_store_stops_the_copy_before_anything_is_written(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "h").mkdir()
    result = copy(postgres_url, "s3://nowhere/artifacts", "--home", str(tmp_path / "h"))
    assert (result.exit_code, result.output) == (1, (
        "error: artifact store s3://nowhere/artifacts: EndpointConnectionError: Could not connect to the endpoint "
        f'URL: "http://127.0.0.1:{port}/nowhere/artifacts/sha256/00/{"0" * 64}"\n'))
    assert migrations.current(postgres_url) is None  # not even the schema
