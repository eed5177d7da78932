"""The label store and the feedback input cache in the state database: schema, replicas, kill -9, legacy files.

Run as a script, this file is the child process of the kill -9 tests:
    python tests/test_label_state.py die-mid-add HOME     (stores a label inside its write, then SIGKILLs itself)
    python tests/test_label_state.py die-mid-put HOME     (inserts an input inside its write, then SIGKILLs itself)
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from PIL import Image
from sqlalchemy import func, inspect, select
from state_backend import use_backend

from models import migrations
from models.db import Database, metadata
from models.state import close_all
from pipelines.label_db import LABELS_LOCK
from pipelines.label_images import encode_png, example_id
from pipelines.label_trust import Trust
from pipelines.labels import LabelStore
from service.inputs import ExpiredPredictionError, InputCache, UnknownPredictionError, feedback_inputs

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
TABLES = {"labels", "label_events", "label_conflicts", "feedback_inputs", "feedback_input_counts"}


def image(seed: int, size: tuple[int, int] = (16, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def shared(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """One PostgreSQL database that every home of the test uses, as replicas behind a load balancer do."""
    use_backend(postgres_url, monkeypatch)
    yield postgres_url
    close_all()


# ------------------------------------------------------------------------------------------------------ schema


def test_the_declared_tables_are_the_migrated_ones(backend: str) -> None:
    migrations.upgrade(backend)
    database = Database(backend)

    def mine(name: str | None, type_: str, *_: object) -> bool:
        return type_ != "table" or name in TABLES

    with database.read() as conn:
        context = MigrationContext.configure(conn, opts={"include_name": mine, "include_object": lambda o, n, t, r, c:
                                                         mine(n, t), "compare_type": True})
        assert compare_metadata(context, metadata) == []
        assert TABLES <= set(inspect(conn).get_table_names())
    database.dispose()


# ---------------------------------------------------------------------------------------------------- replicas


def test_feedback_by_id_works_across_replicas(shared: str, tmp_path: Path) -> None:
    """A prediction served by replica A is labelled through replica B: B finds A's input, A sees B's label."""
    inputs_a, inputs_b = InputCache(tmp_path / "a", ttl_s=60), InputCache(tmp_path / "b", ttl_s=60)
    labels_a, labels_b = LabelStore(tmp_path / "a"), LabelStore(tmp_path / "b")
    assert inputs_a.put_many("site-a", 2, ["p1", "p2"], [image(1), image(2)], now=1000.0) == 2
    adapter, version, got = inputs_b.get("p1", now=1001.0)
    assert (adapter, version, got.tobytes()) == ("site-a", 2, image(1).tobytes())
    assert inputs_b.put_many("site-a", 2, ["p1"], [image(9)], now=1001.0) == 0  # A's id, retried through B
    result = labels_b.add(adapter, got, "dog", CLASSES, "feedback", prediction_id="p1")
    record = labels_a.get(result.label_id)
    assert (record.label, record.prediction_id, labels_a.count("site-a")) == ("dog", "p1", 1)
    # the conflict rule sees every replica's labels: the same trust through A contradicts B's
    assert labels_a.add(adapter, got, "cat", CLASSES, "feedback").conflicted
    assert labels_b.summary("site-a")["conflicts"] == 1
    # one cache, one set of bounds: B's next write expires A's inputs, and A says so
    inputs_b.put_many("site-a", 2, ["p3"], [image(3)], now=1100.0)
    with pytest.raises(ExpiredPredictionError, match="inputs are kept for 60 s"):
        inputs_a.get("p2", now=1100.0)
    assert (len(inputs_a), len(inputs_b)) == (1, 1)


# ----------------------------------------------------------------------------------------------------- kill -9


def _child(role: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, __file__, role, str(home)], env=env, text=True, capture_output=True,
                          timeout=120)


def test_kill_9_in_the_middle_of_a_label_write_leaves_nothing(backend: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    child = _child("die-mid-add", home)
    assert (child.returncode, child.stdout) == (-signal.SIGKILL, "stored\n"), child.stderr
    store = LabelStore(home)
    label_id = example_id("site-a", image(1))
    assert (store.count("site-a"), store.history(label_id), store.conflicts("site-a", unresolved_only=False)) == (
        0, [], [])  # fmt: skip
    start = time.monotonic()  # the dead writer's lock is gone: the next write goes through at once
    assert store.add("site-a", image(1), "cat", CLASSES, "feedback").outcome == "added"
    assert time.monotonic() - start < 5


def test_kill_9_in_the_middle_of_an_input_write_leaves_nothing(backend: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    child = _child("die-mid-put", home)
    assert (child.returncode, child.stdout) == (-signal.SIGKILL, "inserted\n"), child.stderr
    cache = InputCache(home)
    with pytest.raises(UnknownPredictionError):
        cache.get("p1")
    assert len(cache) == 0
    start = time.monotonic()
    assert cache.put_many("site-a", 1, ["p1"], [image(1)]) == 1 and len(cache) == 1
    assert time.monotonic() - start < 5


def _die_mid_add(home: Path) -> None:
    store = LabelStore(home)
    labelling = store._labelling("site-a", image(1), "cat", "feedback", None, None, Trust.UNTRUSTED, "anonymous")
    with store.database.write(lock=LABELS_LOCK) as conn:
        store._store(conn, labelling)  # the label, its event: all written, none committed
        print("stored", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _die_mid_put(home: Path) -> None:
    cache = InputCache(home)

    def die(conn: object, now: float) -> None:  # put_many prunes after its insert, inside the same write
        with cache.database.read() as other:  # not committed: another connection does not see it
            assert other.execute(select(func.count()).select_from(feedback_inputs)).scalar_one() == 0
        print("inserted", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    cache._prune = die  # type: ignore[method-assign]
    cache.put_many("site-a", 1, ["p1"], [image(1)])


# ---------------------------------------------------------------------------------------------- legacy files

# labels.db in its last shape (the old in-place migration had added trust, sender and outcome to the first)
LABELS_DB_LAST = """
CREATE TABLE labels (
    id TEXT PRIMARY KEY, adapter TEXT NOT NULL, label TEXT NOT NULL, source TEXT NOT NULL, prediction_id TEXT,
    split TEXT CHECK (split IS NULL OR split IN ('train', 'holdout')), created_at REAL NOT NULL,
    updated_at REAL NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, png BLOB NOT NULL,
    trust INTEGER NOT NULL DEFAULT 0, sender TEXT NOT NULL DEFAULT 'legacy'
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY, label_id TEXT NOT NULL, adapter TEXT NOT NULL, label TEXT NOT NULL, source TEXT NOT NULL,
    prediction_id TEXT, at REAL NOT NULL, trust INTEGER NOT NULL DEFAULT 0, sender TEXT NOT NULL DEFAULT 'legacy',
    outcome TEXT
);
CREATE TABLE conflicts (
    seq INTEGER PRIMARY KEY, label_id TEXT NOT NULL, adapter TEXT NOT NULL, kept_label TEXT NOT NULL,
    kept_trust INTEGER NOT NULL, offered_label TEXT NOT NULL, trust INTEGER NOT NULL, source TEXT NOT NULL,
    sender TEXT NOT NULL, prediction_id TEXT, at REAL NOT NULL,
    resolution TEXT CHECK (resolution IS NULL OR resolution IN ('outranked', 'replaced', 'settled')),
    resolved_label TEXT, resolved_at REAL
);
"""

# inputs.db as service/inputs.py wrote it
INPUTS_DB = """
CREATE TABLE inputs (
    prediction_id TEXT PRIMARY KEY, adapter TEXT NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL,
    png BLOB, dropped TEXT CHECK (dropped IS NULL OR dropped IN ('ttl', 'capacity'))
);
CREATE TABLE counts (kind TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO counts (kind, n) VALUES ('live', 1), ('dead', 1);
"""


def _legacy_labels(home: Path, sender: str, label: str = "cat", at: float = 10.0) -> str:
    """A labels.db in its last shape: image(0) labelled by `sender` at `at`, then contradicted at the same trust a
    second later (pending)."""
    home.mkdir(parents=True, exist_ok=True)
    label_id = example_id("site-a", image(0))
    with sqlite3.connect(home / "labels.db") as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # as the store kept it
        conn.executescript(LABELS_DB_LAST)
        conn.execute("INSERT INTO labels VALUES (?, 'site-a', ?, 'upload', NULL, NULL, ?, ?, 16, 16, ?, 1, ?)",
                     (label_id, label, at, at + 1, encode_png(image(0)), sender))
        conn.execute("INSERT INTO events VALUES (NULL, ?, 'site-a', ?, 'upload', NULL, ?, 1, ?, 'added')",
                     (label_id, label, at, sender))
        conn.execute("INSERT INTO events VALUES (NULL, ?, 'site-a', 'fox', 'upload', NULL, ?, 1, 'token:b', "
                     "'conflict')", (label_id, at + 1))
        conn.execute("INSERT INTO conflicts VALUES (NULL, ?, 'site-a', ?, 1, 'fox', 1, 'upload', 'token:b', NULL, ?, "
                     "NULL, NULL, NULL)", (label_id, label, at + 1))
    return label_id


def test_a_legacy_labels_db_in_its_last_shape_is_imported_with_its_conflicts(backend: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    label_id = _legacy_labels(home, "token:a")
    store = LabelStore(home)
    assert store.migrated == []  # nothing to fill in: the file had every column
    record = store.get(label_id)
    assert (record.label, record.trust, record.sender, record.conflicted) == ("cat", Trust.TRUSTED, "token:a", True)
    assert [(h["label"], h["outcome"]) for h in store.history(label_id)] == [("cat", "added"), ("fox", "conflict")]
    [pending] = store.conflicts("site-a")
    assert (pending["kept_label"], pending["offered_label"], pending["resolution"]) == ("cat", "fox", "pending")
    assert store.add("site-a", image(0), "fox", CLASSES, "upload", trust=Trust.ADMIN).outcome == "relabelled"
    assert store.conflicts("site-a") == []  # the imported conflict is settled like any other
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("labels")) == ["labels.db.imported"]


def test_a_process_killed_between_import_and_rename_imports_nothing_twice(backend: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    label_id = _legacy_labels(home, "token:a")
    shutil.copy(home / "labels.db", tmp_path / "labels.db")
    LabelStore(home)
    (tmp_path / "labels.db").rename(home / "labels.db")  # as if the rename had not happened
    store = LabelStore(home)
    assert len(store.history(label_id)) == 2 and len(store.conflicts("site-a")) == 1
    assert not (home / "labels.db").exists()


def test_legacy_labels_of_two_homes_meet_in_one_database(shared: str, tmp_path: Path) -> None:
    """The same pixels labelled in two homes' labels.db: the first import's label stays, the second's is a
    contradiction like any (the same trust: pending), and both histories are kept."""
    label_id = _legacy_labels(tmp_path / "a", "token:a", "cat")
    assert _legacy_labels(tmp_path / "b", "token:b", "dog", at=20.0) == label_id
    first, second = LabelStore(tmp_path / "a"), LabelStore(tmp_path / "b")
    assert (second.get(label_id).label, first.count("site-a")) == ("cat", 1)
    assert [h["sender"] for h in first.history(label_id)] == ["token:a", "token:b", "token:b", "token:b"]
    met = [(c["kept_label"], c["offered_label"], c["sender"], c["resolution"]) for c in first.conflicts("site-a")]
    assert sorted(met) == [("cat", "dog", "token:b", "pending"), ("cat", "fox", "token:b", "pending"),
                           ("dog", "fox", "token:b", "pending")]


def test_a_legacy_inputs_db_is_imported_once_with_its_tombstones(backend: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "inputs.db") as conn:
        conn.executescript(INPUTS_DB)
        conn.execute("INSERT INTO inputs VALUES ('p0', 'site-a', 1, 900, NULL, 'ttl')")
        conn.execute("INSERT INTO inputs VALUES ('p1', 'site-a', 3, 1000, ?, NULL)", (encode_png(image(1)),))
    cache = InputCache(home, ttl_s=3600)
    assert cache.get("p1", now=1001.0)[:2] == ("site-a", 3)
    assert cache.get("p1", now=1001.0)[2].tobytes() == image(1).tobytes()
    with pytest.raises(ExpiredPredictionError):
        cache.get("p0", now=1001.0)
    assert len(cache) == 1
    assert not (home / "inputs.db").exists() and (home / "inputs.db.imported").is_file()
    InputCache(home).put_many("site-a", 3, ["p2"], [image(2)], now=1002.0)  # the counts go on from the imported ones
    with cache.database.read() as conn:
        assert conn.execute(select(func.count()).select_from(feedback_inputs)).scalar_one() == 3
    assert len(cache) == 2


def _main(argv: list[str]) -> int:
    role, home = argv[0], Path(argv[1])
    if role == "die-mid-add":
        _die_mid_add(home)
    if role == "die-mid-put":
        _die_mid_put(home)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
