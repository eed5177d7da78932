"""The monitoring stores on the state database, on SQLite and PostgreSQL: the schema against revision 0004, the
one-time import of a legacy capture.db / monitor.db, a capture batch killed half-way, and the drift leases.

Run as a script, this file is the child process of the kill -9 test:
    python tests/test_monitor_db.py die-mid-batch HOME   (one batch committed, then SIGKILL inside the next one)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from models.db import metadata
from models.state import close_all
from monitoring import capture
from monitoring.capture import CaptureStore, PredictionRecord, make_records
from monitoring.history import DriftHistory
from monitoring.image_stats import STAT_NAMES
from monitoring.leases import DriftLeases
from monitoring.tables import TABLES

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
CLASSES = ["c0", "c1", "c2"]

# The legacy files' schemas as capture.py and history.py created them before the state database
OLD_CAPTURE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records ("
    " seq INTEGER PRIMARY KEY,"
    " prediction_id TEXT NOT NULL UNIQUE,"
    " adapter TEXT NOT NULL,"
    " version INTEGER NOT NULL,"
    " created_at REAL NOT NULL,"
    " predicted INTEGER NOT NULL,"
    " label TEXT NOT NULL,"
    " confidence REAL NOT NULL,"
    " entropy REAL NOT NULL,"
    " stats BLOB NOT NULL,"
    " emb_dtype TEXT NOT NULL,"
    " embedding BLOB NOT NULL);"
    "CREATE INDEX IF NOT EXISTS records_by_adapter_time ON records (adapter, created_at);"
    "PRAGMA user_version=1;"
)
OLD_HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS drift_checks (
    id INTEGER PRIMARY KEY,
    adapter TEXT NOT NULL,
    version INTEGER NOT NULL,
    checked_at REAL NOT NULL,
    drift INTEGER NOT NULL,
    score REAL NOT NULL,
    threshold REAL NOT NULL,
    p_value REAL NOT NULL,
    window_size INTEGER NOT NULL,
    features TEXT NOT NULL,
    report TEXT,
    mean_confidence REAL
);
CREATE INDEX IF NOT EXISTS drift_checks_by_adapter ON drift_checks (adapter, id);
"""



@pytest.fixture
def home(backend: str, tmp_path: Path) -> Path:
    """A home on the test's backend (the `backend` fixture of tests/conftest.py)."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def _records(n: int, adapter: str = "a", seed: int = 0, start: float = 1e6) -> list[PredictionRecord]:
    rng = np.random.default_rng(seed)
    records = make_records(adapter, 1, [f"{adapter}-{seed}-{i}" for i in range(n)],
                           rng.normal(size=(n, DIM)).astype(np.float32), rng.random((n, len(STAT_NAMES))),
                           rng.dirichlet(np.ones(len(CLASSES)), n), CLASSES)
    for i, r in enumerate(records):
        r.created_at = start + i
    return records


# ------------------------------------------------------------------------------------------------------ schema


def _mine(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return table is None or table.name in {t.name for t in TABLES}


def test_the_revision_creates_the_tables_as_declared(home: Path) -> None:
    store = CaptureStore(home)
    with store.database.read() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _mine, "compare_type": True})
        assert compare_metadata(context, metadata) == []


# --------------------------------------------------------------------------------------------- legacy imports


def _old_capture_db(path: Path, records: list[PredictionRecord]) -> None:
    """A capture.db as the SQLite store wrote it: float16 embeddings, float64 stats, rows in seq order."""
    with closing(sqlite3.connect(path)) as old:
        old.executescript(OLD_CAPTURE_SCHEMA)
        old.executemany(
            "INSERT INTO records (prediction_id, adapter, version, created_at, predicted, label, confidence, entropy, "
            "stats, emb_dtype, embedding) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(r.prediction_id, r.adapter, r.version, r.created_at, r.predicted, r.label, r.confidence, r.entropy,
              r.stats.astype("<f8").tobytes(), "f2", r.embedding.astype("<f2").tobytes()) for r in records])
        old.commit()


def test_a_legacy_capture_db_is_imported_once(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = _records(30) + _records(5, adapter="b", seed=1)
    _old_capture_db(home / "capture.db", records)
    with caplog.at_level(logging.INFO, logger="monitoring.capture"):
        store = CaptureStore(home, max_per_adapter=100, retention_s=1e12)
    assert [m for m in caplog.messages if "imported" in m] == [
        f"capture: imported 35 of 35 records from {home / 'capture.db'} into {store.database.url.render_as_string()}"
        "; the file is now capture.db.imported"]
    assert not (home / "capture.db").exists() and (home / "capture.db.imported").is_file()
    assert store.adapters() == ["a", "b"] and store.count("a") == 30 and store.count("b") == 5
    window = store.window_records("a", 100)
    assert [r.prediction_id for r in window] == [r.prediction_id for r in records[:30]]
    np.testing.assert_allclose(window[3].embedding, records[3].embedding, rtol=2**-11, atol=1e-7)
    np.testing.assert_array_equal(window[3].stats, records[3].stats)
    assert store.add_many(_records(3, seed=2, start=2e6)) == 3  # the store goes on after an import

    # killed between the commit and the rename: the file is back, its rows are there already
    (home / "capture.db.imported").rename(home / "capture.db")
    close_all()
    again = CaptureStore(home, max_per_adapter=100, retention_s=1e12)
    assert again.count("a") == 33 and again.count("b") == 5
    assert (home / "capture.db.imported").is_file() and not (home / "capture.db").exists()


def test_a_legacy_monitor_db_is_imported_once(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [("site-a", 1, 1000.0 + i, i % 2, 0.5 + i, 2.0, 0.01, 200,
             json.dumps({"embedding": {"moved": bool(i % 2)}}), None if i < 2 else f"/r/{i}.html", 0.9)
            for i in range(3)]
    with closing(sqlite3.connect(home / "monitor.db")) as old:
        old.executescript(OLD_HISTORY_SCHEMA)
        old.executemany("INSERT INTO drift_checks (adapter, version, checked_at, drift, score, threshold, p_value, "
                        "window_size, features, report, mean_confidence) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        old.commit()
    with caplog.at_level(logging.INFO, logger="monitoring.history"):
        history = DriftHistory(home)
    assert len([m for m in caplog.messages if "imported 3 of 3 checks" in m]) == 1
    checks = history.history("site-a")
    assert [c["drift"] for c in checks] == [False, True, False] and [c["score"] for c in checks] == [0.5, 1.5, 2.5]
    assert checks[1]["features"] == {"embedding": {"moved": True}} and history.latest_report("site-a") == "/r/2.html"
    assert history.add({**checks[-1], "score": 9.0}, 2000.0)[1] == 4  # new checks come after the imported ones
    assert history.latest("site-a")["score"] == 9.0  # type: ignore[index]

    (home / "monitor.db.imported").rename(home / "monitor.db")  # killed before the rename
    close_all()
    assert len(DriftHistory(home).history("site-a")) == 4 and not (home / "monitor.db").exists()


# ------------------------------------------------------------------------------------------------------ kill -9


def test_a_batch_killed_half_way_leaves_none_of_it(home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, __file__, "die-mid-batch", str(home)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert (child.returncode, child.stdout) == (-signal.SIGKILL, "committed\ninside\n"), child.stderr
    store = CaptureStore(home, max_per_adapter=100, retention_s=1e12)
    assert (store.count("a"), store.count("b")) == (20, 0)  # the first batch; of the second, not even a's rows
    assert store.add_many(_records(20, seed=1) + _records(20, adapter="b", seed=1)) == 40  # the retry goes in


def _die_mid_batch(home: str) -> None:
    store = CaptureStore(home, max_per_adapter=100, retention_s=1e12)
    store.add_many(_records(20))
    print("committed", flush=True)
    real = capture._insert_new

    def insert_then_die(conn: Any, rows: list[dict[str, Any]]) -> int:
        inserted = real(conn, rows)  # adapter a's rows are in the transaction; b's never get there
        print("inside", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        return inserted

    capture._insert_new = insert_then_die  # type: ignore[assignment]
    store.add_many(_records(20, seed=1) + _records(20, adapter="b", seed=1))


# ------------------------------------------------------------------------------------------------------- leases


def test_a_lease_is_won_once_per_interval_and_kept_by_its_holder(home: Path) -> None:
    a = DriftLeases(home, 10.0, holder="A")
    b = DriftLeases(home, 10.0, holder="B")
    steps = [  # (who, when, wins)
        (a, 100.0, True),   # a new adapter: the first to ask
        (b, 100.0, False),  # the same interval: taken
        (a, 105.0, False),  # nobody wins an interval twice, the holder neither
        (b, 110.0, False),  # the interval is over, but the holder is alive: it has priority
        (a, 110.0, True),   # the holder renews for [110, 120)
        (b, 125.0, False),  # A is late, not yet past the takeover time (10 s after its lease ran out)
        (b, 130.0, True),   # A stopped renewing: B takes over
        (a, 131.0, False),
    ]
    assert [who.acquire("site-a", now) for who, now, _ in steps] == [wins for _, _, wins in steps]
    assert (a.held(131.0), b.held(131.0), a.holder_of("site-a")) == ([], ["site-a"], "B")
    assert b.release() == 1 and b.held(131.0) == [] and b.holder_of("site-a") == ""
    assert not a.acquire("site-a", 135.0)  # given back, but B's interval [130, 140) still stands
    assert a.acquire("site-a", 140.0) and a.held(140.0) == ["site-a"]
    assert a.acquire("site-b", 140.0) and a.held(140.0) == ["site-a", "site-b"]  # one lease per adapter
    assert b.holder_of("site-c") is None


def test_racing_holders_win_an_interval_once(home: Path) -> None:
    leases = [DriftLeases(home, 10.0, holder=f"h{i}") for i in range(6)]
    start, results = threading.Barrier(len(leases)), []

    def race(lease: DriftLeases) -> None:
        start.wait()
        results.append([lease.acquire("site-a", 1000.0 + t) for t in (0.0, 0.5)])

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(won for row in results for won in row) == 1 and len(results) == len(leases)


def test_a_lease_defaults_to_the_wall_clock_and_a_takeover_of_at_least_10_s(home: Path) -> None:
    lease = DriftLeases(home, 0.5)
    assert lease.takeover_s == 10.0 and DriftLeases(home, 30.0).takeover_s == 30.0
    assert lease.acquire("site-a") and not lease.acquire("site-a")
    time.sleep(0.6)
    assert lease.acquire("site-a") and lease.held() == ["site-a"]
    with pytest.raises(ValueError, match="interval_s must be >= 0, got -1"):
        DriftLeases(home, -1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["die-mid-batch"]:
        _die_mid_batch(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} die-mid-batch HOME")
