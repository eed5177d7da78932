"""Prediction capture: the durable bounded store (on SQLite and PostgreSQL) and the non-blocking async writer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from models.state import close_all
from monitoring.capture import (
    AsyncCapture,
    CaptureStore,
    PredictionRecord,
    entropy_and_confidence,
    keep_sample,
    make_records,
    reference_from_arrays,
)
from monitoring.detectors import DriftConfig, DriftDetector, ReferenceSet
from monitoring.image_stats import STAT_NAMES

DIM = 64
CLASSES = [f"c{i}" for i in range(5)]


def _records(n: int, adapter: str = "a", version: int = 1, start: float | None = None, seed: int = 0,
             prefix: str = "") -> list[PredictionRecord]:
    """n records one second apart, by default ending about now (inside any retention)."""
    start = time.time() - n if start is None else start
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(len(CLASSES), 0.5), n)
    records = make_records(adapter, version, [f"{prefix or adapter}-{seed}-{i}" for i in range(n)],
                           rng.normal(size=(n, DIM)).astype(np.float32) * 3, rng.random((n, len(STAT_NAMES))) * 100,
                           probs, CLASSES)
    for i, r in enumerate(records):
        r.created_at = start + i
    return records



@pytest.fixture
def home(backend: str, tmp_path: Path) -> Path:
    """A home on the test's backend (the `backend` fixture of tests/conftest.py)."""
    return tmp_path / "home"


@pytest.fixture
def store(home: Path):
    s = CaptureStore(home, max_per_adapter=100, retention_s=1e12)  # fake 1970 times stay
    yield s
    s.close()


def test_entropy_and_confidence() -> None:
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    confidence, entropy = entropy_and_confidence(probs)
    np.testing.assert_allclose(confidence, [1.0, 0.25, 0.5])
    np.testing.assert_allclose(entropy, [0.0, np.log(4), np.log(2)])
    c1, e1 = entropy_and_confidence(probs[1])
    assert c1.shape == e1.shape == (1,)


def test_reference_from_arrays_feeds_the_detector() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), 200)
    ref = reference_from_arrays(rng.normal(size=(200, DIM)), rng.random((200, 6)), probs)
    np.testing.assert_array_equal(ref.classes, probs.argmax(axis=1))
    np.testing.assert_allclose(ref.confidence, probs.max(axis=1))
    assert len(ref) == 200 and ref.embeddings.dtype == np.float32
    DriftDetector(ref, DriftConfig(min_window=100, reference_size=100))  # accepted as a reference


def test_round_trip_and_embedding_precision(store: CaptureStore) -> None:
    records = _records(50)
    records[7].embedding[3] = 1e6  # beyond float16: that record is kept as float32
    assert store.add_many(records) == 50
    assert store.add_many(records[:10]) == 0  # known ids are ignored (idempotent retries)
    got = store.get(records[7].prediction_id)
    assert got is not None and got.embedding[3] == np.float32(1e6)
    back = store.get(records[0].prediction_id)
    assert back is not None
    for field in ("prediction_id", "adapter", "version", "created_at", "confidence", "entropy", "predicted", "label"):
        assert getattr(back, field) == getattr(records[0], field)
    np.testing.assert_array_equal(back.stats, records[0].stats)  # stats are float64 exact
    assert back.embedding.dtype == np.float32
    np.testing.assert_allclose(back.embedding, records[0].embedding, rtol=2**-11, atol=1e-7)  # float16 rounding
    assert store.get("missing") is None

    window = store.window("a", 20)
    assert isinstance(window, ReferenceSet) and window.embeddings.shape == (20, DIM)
    expected = records[-20:]  # the newest 20, oldest first
    np.testing.assert_array_equal(window.classes, [r.predicted for r in expected])
    np.testing.assert_allclose(window.confidence, [r.confidence for r in expected])
    np.testing.assert_allclose(window.embeddings, np.stack([r.embedding for r in expected]), rtol=2**-11, atol=1e-7)
    assert [r.prediction_id for r in store.window_records("a", 20)] == [r.prediction_id for r in expected]
    assert len(store.window("a", 20, since=records[45].created_at)) == 5
    assert len(store.window("nobody", 10)) == 0


def test_non_finite_records_are_skipped(store: CaptureStore) -> None:
    records = _records(4)
    records[1].embedding[0] = np.nan
    records[2].entropy = float("inf")
    assert store.add_many(records) == 2
    assert len(store.window("a", 10)) == 2  # the window stays a valid ReferenceSet


def test_float32_storage_is_exact(home: Path) -> None:
    with CaptureStore(home, embedding_dtype="float32") as s:
        records = _records(5)
        s.add_many(records)
        np.testing.assert_array_equal(s.window("a", 5).embeddings, np.stack([r.embedding for r in records]))


def test_versions_and_adapters(store: CaptureStore) -> None:
    store.add_many(_records(30, version=1) + _records(20, version=2, start=2e6, seed=1) + _records(5, adapter="b"))
    assert store.adapters() == ["a", "b"]
    assert store.count("a") == 50 and store.count("b") == 5
    assert len(store.window("a", 100, version=1)) == 30
    assert len(store.window("a", 100, version=2)) == 20


def test_bounded_per_adapter(store: CaptureStore) -> None:
    for chunk in range(10):
        store.add_many(_records(50, start=1e6 + chunk * 50, seed=chunk))
        assert store.count("a") <= 110  # max_per_adapter plus the 10% amortisation slack
    store.add_many(_records(30, adapter="b"))
    store.prune()
    assert store.count("a") == 100 and store.count("b") == 30
    window = store.window_records("a", 1000)
    assert [r.prediction_id for r in window] == [f"a-{chunk}-{i}" for chunk in (8, 9) for i in range(50)]
    times = [r.created_at for r in window]
    assert times == sorted(times) and times[-1] == 1e6 + 499 and times[0] == 1e6 + 400  # the newest 100 kept


def test_retention_pruning_with_fake_timestamps(home: Path) -> None:
    now = time.time()
    with CaptureStore(home, max_per_adapter=1000, retention_s=3600) as s:
        s.add_many(_records(10, start=now - 7200) + _records(10, start=now - 60, seed=1))
        # the write itself expires old rows (the retention check is due on the first write)
        assert s.count("a") == 10
        s.add_many(_records(5, start=now - 5000, seed=2))
        assert s.prune(now=now) == 5 and s.count("a") == 10
        assert s.prune(now=now + 3600) == 10 and s.adapters() == []


def test_survives_restart(home: Path) -> None:
    records = _records(40)
    s = CaptureStore(home, max_per_adapter=50, retention_s=1e12)
    s.add_many(records)
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.count("a")
    close_all()  # a new process: a new engine on the same database
    with CaptureStore(home, max_per_adapter=50, retention_s=1e12) as reopened:
        assert reopened.count("a") == 40
        np.testing.assert_allclose(reopened.window("a", 40).confidence, [r.confidence for r in records])
        reopened.add_many(_records(40, start=2e6, seed=1))  # the reopened store knows its counts: trims at 55
        reopened.prune()
        assert reopened.count("a") == 50


def test_async_flush_writes_everything(store: CaptureStore) -> None:
    capture = AsyncCapture(store, flush_interval_s=0.05)
    records = _records(90)
    for r in records[:40]:
        capture.submit(r)
    capture.submit(records[40:])
    assert capture.flush(10)
    assert capture.written == capture.submitted == 90 and capture.dropped == 0 and store.count("a") == 90
    assert capture.close() and capture.pending() == 0
    assert capture.submit(_records(3, seed=5)) == 0  # closed: nothing queued any more


class _StalledStore:
    """A store whose writes block until released: the queue fills up behind it."""

    path = Path("stalled")

    def __init__(self) -> None:
        self.release = threading.Event()
        self.rows: list[PredictionRecord] = []

    def add_many(self, records: list[PredictionRecord]) -> int:
        self.release.wait(10)
        self.rows.extend(records)
        return len(records)


def test_submit_never_blocks_and_counts_drops() -> None:
    stalled = _StalledStore()
    capture = AsyncCapture(stalled, max_queue=20, flush_interval_s=0.0, max_batch=5)  # type: ignore[arg-type]
    records = _records(200)
    start = time.perf_counter()
    queued = sum(capture.submit(r) for r in records)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5  # 200 submits against a stalled writer: no waiting
    assert capture.dropped > 0 and queued + capture.dropped == 200 and capture.submitted == queued
    assert queued <= 20 + 5  # the queue plus the batch the writer holds
    assert not capture.flush(timeout=0.05)  # still stalled: flush times out instead of hanging
    stalled.release.set()
    assert capture.flush(10) and capture.written == queued and len(stalled.rows) == queued
    capture.close()


def test_failed_writes_are_counted_and_the_writer_survives() -> None:
    class Broken(_StalledStore):
        def add_many(self, records: list[PredictionRecord]) -> int:
            raise OSError("disk full")

    capture = AsyncCapture(Broken(), flush_interval_s=0.0)  # type: ignore[arg-type]
    capture.submit(_records(10))
    assert capture.flush(10) and capture.failed == 10 and capture.written == 0
    capture.submit(_records(3, seed=1))
    assert capture.flush(10) and capture.failed == 13
    capture.close()


def test_deterministic_sampling() -> None:
    ids = [f"req-{i}" for i in range(10_000)]  # sequential ids: the hash must still spread them evenly
    kept = [keep_sample(i, 0.2) for i in ids]
    assert abs(sum(kept) / len(ids) - 0.2) < 0.02
    assert kept == [keep_sample(i, 0.2) for i in ids]  # same id, same decision
    assert all(keep_sample(i, 1.0) for i in ids[:10]) and not any(keep_sample(i, 0.0) for i in ids[:10])
    kept_more = [keep_sample(i, 0.5) for i in ids]
    assert all(b for a, b in zip(kept, kept_more, strict=True) if a)  # nested: a higher rate keeps a superset


def test_sampled_capture(store: CaptureStore) -> None:
    capture = AsyncCapture(store, sample_rate=0.3, flush_interval_s=0.0)
    records = _records(100)
    capture.submit(records)
    assert capture.flush(10)
    expected = [r.prediction_id for r in records if keep_sample(r.prediction_id, 0.3)]
    assert capture.offered == 100 and capture.written == len(expected) == store.count("a")
    assert {r.prediction_id for r in store.window_records("a", 100)} == set(expected)
    capture.close()


def test_thread_safety_four_submitters(home: Path) -> None:
    with CaptureStore(home, max_per_adapter=10_000) as s:
        capture = AsyncCapture(s, flush_interval_s=0.01)
        batches = [_records(500, adapter=f"ad{t % 2}", seed=t, prefix=f"t{t}") for t in range(4)]
        threads = [threading.Thread(target=lambda b=b: [capture.submit(r) for r in b]) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        reader = s.window("ad0", 100)  # reads interleave safely with the writer
        assert len(reader) <= 100
        assert capture.flush(20)
        assert capture.submitted == capture.written == 2000 and capture.dropped == 0
        assert s.count("ad0") == s.count("ad1") == 1000
        capture.close()
