"""Prediction capture: one monitoring record per prediction, stored durably and off the request's hot path.

Each record holds what the drift monitor compares with an adapter version's reference set: the penultimate-layer
embedding from the same forward pass, the image statistics (STAT_NAMES), top-1 confidence, entropy and the
predicted class, plus adapter, version, time and prediction id.

* CaptureStore: the capture_records table of the state database (monitoring.tables), bounded per adapter
  (max_per_adapter newest rows, retention_s), so a restart finds the recent windows where it left them, and every
  replica on one ADAPTSERVE_DATABASE_URL sees the others' traffic. window() returns a ReferenceSet for
  DriftDetector.check.
* AsyncCapture: the request thread only samples (deterministically by prediction id) and enqueues; a daemon
  thread (models.background.BackgroundWorker) batches the inserts. submit() never blocks: when the bounded queue
  is full, records are dropped and counted, because losing monitoring samples is better than slowing down or
  failing predictions.

Embedding precision: stored as float16 by default. That halves the database (512-d: 1 KiB instead of 2 KiB per
record, ~5 MB per 5000-record adapter) and the I/O of every window read, at a relative rounding error of at most
2^-11 (~5e-4) per value; the drift tests work on PCA projections whose between-window differences are orders of
magnitude larger, and penultimate-layer activations (post-ReLU pooled features, typically 0..~20) sit well inside
float16's range. A record whose embedding does not fit float16 (|x| > 65504) is stored as float32 instead, so
nothing ever turns into inf; pass embedding_dtype="float32" to store everything at full precision.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, func, select

from models.background import BackgroundWorker
from models.db import redact
from models.legacy import read_rows, retire
from models.state import open_state
from monitoring.detectors import ReferenceSet
from monitoring.image_stats import STAT_NAMES
from monitoring.tables import CAPTURE_LOCK, capture_records, insert_new
from monitoring.uncertainty import entropy_and_confidence, top2_margin

log = logging.getLogger(__name__)

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_DTYPE_CODES = {"float16": "f2", "float32": "f4"}
LEGACY_FILE = "capture.db"  # where a home kept its records before the state database
_T = capture_records
# a stored record's fields in the order _decode and _to_reference read them
_FIELDS = ("prediction_id", "adapter", "version", "created_at", "predicted", "label", "confidence", "entropy", "stats",
           "emb_dtype", "embedding")
_COLUMNS = tuple(_T.c[name] for name in _FIELDS)


# --------------------------------------------------------------------------------------------- records


@dataclass
class PredictionRecord:
    """Monitoring features of one prediction (what DriftDetector compares), with its identity and time.

    embedding: float32 (d,) penultimate-layer features from the same forward pass as the prediction;
    stats: float64 (len(STAT_NAMES),) image statistics in STAT_NAMES order; confidence: top-1 probability;
    entropy: of the predicted distribution in nats; predicted: class index; label: its class name.
    """

    prediction_id: str
    adapter: str
    version: int
    created_at: float
    embedding: np.ndarray
    stats: np.ndarray
    confidence: float
    entropy: float
    predicted: int
    label: str
    margin: float = float("nan")  # top-1 minus top-2 probability (label requests' uncertainty); NaN: not known

    def __post_init__(self) -> None:
        self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        self.stats = np.asarray(self.stats, dtype=np.float64).reshape(-1)
        if len(self.stats) != len(STAT_NAMES):
            raise ValueError(f"stats must have {len(STAT_NAMES)} values in STAT_NAMES order {STAT_NAMES}, "
                             f"got {len(self.stats)}; compute them with monitoring.image_stats.batch_image_stats.")


def reference_from_arrays(embeddings: np.ndarray, stats: np.ndarray, probs: np.ndarray) -> ReferenceSet:
    """An adapter version's ReferenceSet from its training/validation data, built when the version is registered.

    The caller runs the model once over the data: embeddings (n, d) penultimate-layer features, probs (n, classes)
    softmax outputs, stats (n, len(STAT_NAMES)) from batch_image_stats; confidence, entropy and the predicted
    classes are derived here exactly as for served predictions, so reference and traffic are comparable.
    """
    confidence, entropy = entropy_and_confidence(probs)
    classes = np.asarray(probs).reshape(len(confidence), -1).argmax(axis=1)
    return ReferenceSet(embeddings, stats, confidence, entropy, classes)


def make_records(
    adapter: str,
    version: int,
    prediction_ids: Sequence[str],
    embeddings: np.ndarray,
    stats: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    created_at: float | None = None,
) -> list[PredictionRecord]:
    """PredictionRecords for one served batch: confidence, entropy, margin and class are computed vectorised from
    probs."""
    confidence, entropy = entropy_and_confidence(probs)
    margin = top2_margin(probs)
    predicted = np.asarray(probs).reshape(len(confidence), -1).argmax(axis=1)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    stats = np.asarray(stats, dtype=np.float64)
    if not len(prediction_ids) == len(embeddings) == len(stats) == len(confidence):
        raise ValueError(f"got {len(prediction_ids)} ids, {len(embeddings)} embeddings, {len(stats)} stats rows and "
                         f"{len(confidence)} probability rows; pass one of each per prediction.")
    now = time.time() if created_at is None else created_at
    return [
        PredictionRecord(pid, adapter, int(version), now, embeddings[i], stats[i], float(confidence[i]),
                         float(entropy[i]), int(predicted[i]), str(class_names[predicted[i]]), float(margin[i]))
        for i, pid in enumerate(prediction_ids)
    ]


def _finite(r: PredictionRecord) -> bool:
    return bool(np.isfinite(r.embedding).all() and np.isfinite(r.stats).all()
                and np.isfinite(r.confidence) and np.isfinite(r.entropy))


def keep_sample(prediction_id: str, sample_rate: float) -> bool:
    """Deterministic sampling: the same prediction id is always kept or always skipped at a given rate.

    blake2b, not Python's hash() (salted per process) nor crc32 (linear, so sequential ids sample unevenly).
    """
    if sample_rate >= 1.0:
        return True
    if sample_rate <= 0.0:
        return False
    digest = hashlib.blake2b(prediction_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < sample_rate * 18446744073709551616.0  # 2**64


# ----------------------------------------------------------------------------------------------- store


class CaptureStore:
    """Durable, bounded store of PredictionRecords: the capture_records table of the home's state database
    (models.state.open_state: every replica on one ADAPTSERVE_DATABASE_URL shares it), thread-safe.

    Bounds, per adapter: at most max_per_adapter newest records (by created_at) and none older than retention_s.
    Pruning is amortised: an adapter is trimmed when it exceeds max_per_adapter by prune_slack (10% by default),
    so it holds at most max_per_adapter * (1 + prune_slack) rows between trims; records past retention are
    deleted at most every retention_check_s during writes. prune() does both now.

    Durability: each batch is one non-durable write (models.db `durable=False`): a committed batch survives a crash
    or kill -9 of the process, a power loss may lose the last few batches (monitoring data, not the registry).
    Writers of every process take the CAPTURE_LOCK one at a time; each prunes on its own view of the counts (one
    trim recounts from the table). Opening imports a legacy `<home>/capture.db` once.
    """

    def __init__(
        self,
        home: str | Path,
        max_per_adapter: int = 5000,
        retention_s: float = 7 * 86400,
        *,
        embedding_dtype: str = "float16",
        prune_slack: float = 0.1,
        retention_check_s: float | None = None,
    ) -> None:
        if max_per_adapter < 1 or retention_s <= 0 or prune_slack < 0:
            raise ValueError(f"need max_per_adapter >= 1, retention_s > 0 and prune_slack >= 0, got "
                             f"{max_per_adapter}, {retention_s} and {prune_slack}.")
        if embedding_dtype not in _DTYPE_CODES:
            raise ValueError(f"embedding_dtype must be one of {sorted(_DTYPE_CODES)}, got {embedding_dtype!r}.")
        self.home = Path(home)
        self.max_per_adapter = int(max_per_adapter)
        self.retention_s = float(retention_s)
        self.embedding_dtype = embedding_dtype
        self._trim_at = self.max_per_adapter + max(1, int(self.max_per_adapter * prune_slack))
        self._retention_check_s = min(60.0, self.retention_s / 10) if retention_check_s is None else retention_check_s
        self._last_retention = 0.0
        self._lock = threading.Lock()  # this process's counts and retention clock change with each commit
        self._closed = False
        self.database = open_state(self.home)
        self._import_legacy()
        with self.database.read() as conn:
            self._counts = {a: n for a, n in conn.execute(select(_T.c.adapter, func.count()).group_by(_T.c.adapter))}

    # --------------------------------------------------------------------------------------- plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"CaptureStore({self.home}) is closed; open a new one.")

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write of this store; the caller holds self._lock (the counts it changes are published after commit)."""
        self._check_open()
        with self.database.write(lock=CAPTURE_LOCK, durable=False) as conn:
            yield conn

    def _read(self) -> AbstractContextManager[Connection]:
        self._check_open()
        return self.database.read()

    def _import_legacy(self) -> None:
        """Copy `<home>/capture.db` (the table `records`) in once, then rename it; one stat when there is none."""
        path = self.home / LEGACY_FILE
        if not path.is_file():
            return
        with self._lock, self._write() as conn:
            rows = read_rows(path, "records", _FIELDS, "seq")
            if rows is None:  # another process imported it while this one waited for the lock
                return
            copied = _insert_new(conn, rows)  # a prediction id already there (an earlier, interrupted import) stays
        log.info("capture: imported %d of %d records from %s into %s; the file is now %s", copied, len(rows), path,
                 redact(self.database.url), retire(path))

    def _encode(self, r: PredictionRecord) -> dict[str, Any]:
        code = _DTYPE_CODES[self.embedding_dtype]
        if code == "f2" and r.embedding.size and float(np.abs(r.embedding).max()) > _FLOAT16_MAX:
            code = "f4"  # would overflow to inf in float16
        values = (r.prediction_id, r.adapter, int(r.version), float(r.created_at), int(r.predicted), str(r.label),
                  float(r.confidence), float(r.entropy), r.stats.astype("<f8").tobytes(), code,
                  r.embedding.astype("<" + code).tobytes())
        margin = float(r.margin) if np.isfinite(r.margin) else None
        return dict(zip(_FIELDS, values, strict=True)) | {"margin": margin}

    @staticmethod
    def _embeddings(codes: Sequence[str], blobs: Sequence[bytes]) -> np.ndarray:
        """(n, d) float32 from stored blobs; one frombuffer over the joined bytes when all share a dtype."""
        if not blobs:
            return np.zeros((0, 0), dtype=np.float32)
        if len(set(codes)) == 1:
            flat = np.frombuffer(b"".join(blobs), dtype="<" + codes[0]).astype(np.float32)
            rows = [flat]
            dims = {len(b) // int(codes[0][1]) for b in blobs}
        else:
            rows = [np.frombuffer(b, dtype="<" + c).astype(np.float32) for c, b in zip(codes, blobs, strict=True)]
            dims = {len(r) for r in rows}
        if len(dims) != 1:
            raise ValueError(f"the selected records have embeddings of different sizes {sorted(dims)} (different "
                             "model versions); pass version= to read one version's records.")
        return (rows[0] if len(rows) == 1 else np.concatenate(rows)).reshape(len(blobs), dims.pop())

    @staticmethod
    def _decode(row: Sequence[Any]) -> PredictionRecord:
        pid, adapter, version, created_at, predicted, label, confidence, entropy, stats, code, blob = row
        return PredictionRecord(pid, adapter, version, created_at, np.frombuffer(blob, dtype="<" + code),
                                np.frombuffer(stats, dtype="<f8"), confidence, entropy, predicted, label)

    # ------------------------------------------------------------------------------------------ writes

    def add_many(self, records: Iterable[PredictionRecord]) -> int:
        """Insert records in one transaction; returns how many were new.

        A known prediction_id is ignored (retries are idempotent); records with NaN/inf features are skipped.
        """
        by_adapter: dict[str, list[dict[str, Any]]] = {}
        skipped = 0
        for r in records:
            if not _finite(r):
                skipped += 1  # a NaN would make every window containing it unusable (ReferenceSet rejects it)
                continue
            by_adapter.setdefault(r.adapter, []).append(self._encode(r))
        if skipped:
            log.warning("capture: skipped %d records with NaN or inf features", skipped)
        if not by_adapter:
            return 0
        inserted = 0
        with self._lock:
            counts, now = dict(self._counts), time.time()
            expire = now - self._last_retention >= self._retention_check_s
            with self._write() as conn:
                for adapter, rows in by_adapter.items():
                    new = _insert_new(conn, rows)
                    counts[adapter] = counts.get(adapter, 0) + new
                    inserted += new
                    if counts[adapter] > self._trim_at:
                        self._trim(conn, adapter, counts)
                if expire:
                    self._expire(conn, now, counts)
            self._counts = counts
            if expire:
                self._last_retention = now
        return inserted

    def add(self, record: PredictionRecord) -> int:
        return self.add_many([record])

    def _trim(self, conn: Connection, adapter: str, counts: dict[str, int]) -> int:
        """Delete all but the newest max_per_adapter records of an adapter (index range scan + primary key deletes);
        recounts it. Returns rows deleted."""
        older = (select(_T.c.seq).where(_T.c.adapter == adapter)
                 .order_by(_T.c.created_at.desc(), _T.c.seq.desc()).offset(self.max_per_adapter))
        deleted = conn.execute(delete(_T).where(_T.c.seq.in_(older.scalar_subquery()))).rowcount
        counts[adapter] = conn.execute(select(func.count()).where(_T.c.adapter == adapter)).scalar_one()
        return deleted

    def _expire(self, conn: Connection, now: float, counts: dict[str, int]) -> int:
        """Delete every record older than retention_s; returns rows deleted."""
        cutoff, total = now - self.retention_s, 0
        for adapter in conn.scalars(select(_T.c.adapter).distinct()).all():
            deleted = conn.execute(delete(_T).where(_T.c.adapter == adapter, _T.c.created_at < cutoff)).rowcount
            if deleted:
                counts[adapter] = max(counts.get(adapter, 0) - deleted, 0)
                total += deleted
        return total

    def prune(self, now: float | None = None) -> int:
        """Apply both bounds now (retention relative to `now`, default time.time()); returns rows deleted."""
        with self._lock:
            counts = dict(self._counts)
            with self._write() as conn:
                deleted = self._expire(conn, time.time() if now is None else now, counts)
                for adapter in conn.scalars(select(_T.c.adapter).distinct()).all():
                    deleted += self._trim(conn, adapter, counts)
            self._counts = counts
        return deleted

    # ------------------------------------------------------------------------------------------- reads

    def _select(self, adapter: str, n: int, version: int | None, since: float | None) -> list[Sequence[Any]]:
        query = select(*_COLUMNS).where(_T.c.adapter == adapter)
        if version is not None:
            query = query.where(_T.c.version == int(version))
        if since is not None:
            query = query.where(_T.c.created_at >= float(since))
        query = query.order_by(_T.c.created_at.desc(), _T.c.seq.desc()).limit(max(int(n), 0))
        with self._read() as conn:
            rows = list(conn.execute(query).all())
        rows.reverse()  # oldest first
        return rows

    def window(self, adapter: str, n: int, version: int | None = None, since: float | None = None) -> ReferenceSet:
        """The adapter's most recent n records (of one version, created at or after `since`) as a ReferenceSet,
        oldest first: the `window` argument of DriftDetector.check. Fewer than n rows when fewer exist."""
        return self._to_reference(self._select(adapter, n, version, since))

    def window_records(
        self, adapter: str, n: int, version: int | None = None, since: float | None = None
    ) -> list[PredictionRecord]:
        """Same selection as window(), as PredictionRecords (with prediction ids and times), oldest first."""
        return [self._decode(row) for row in self._select(adapter, n, version, since)]

    def _to_reference(self, rows: list[Sequence[Any]]) -> ReferenceSet:
        n = len(rows)
        if n == 0:
            return ReferenceSet(np.zeros((0, 0), np.float32), np.zeros((0, len(STAT_NAMES))), np.zeros(0),
                                np.zeros(0), np.zeros(0, np.int64))
        columns = list(zip(*rows, strict=True))
        stats = np.frombuffer(b"".join(columns[8]), dtype="<f8").reshape(n, -1)
        return ReferenceSet(
            embeddings=self._embeddings(columns[9], columns[10]),
            stats=stats,
            confidence=np.asarray(columns[6], dtype=np.float64),
            entropy=np.asarray(columns[7], dtype=np.float64),
            classes=np.asarray(columns[4], dtype=np.int64),
        )

    def get(self, prediction_id: str) -> PredictionRecord | None:
        with self._read() as conn:
            row = conn.execute(select(*_COLUMNS).where(_T.c.prediction_id == prediction_id)).first()
        return None if row is None else self._decode(row)

    def count(self, adapter: str) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).where(_T.c.adapter == adapter)).scalar_one())

    def adapters(self) -> list[str]:
        with self._read() as conn:
            return list(conn.scalars(select(_T.c.adapter).distinct().order_by(_T.c.adapter)).all())

    def close(self) -> None:
        """Refuse further use; the state database itself stays open for the process's other stores."""
        self._closed = True

    def __enter__(self) -> CaptureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert rows in bulk (batched multi-row INSERTs), skipping known prediction ids; returns how many were new.

    RETURNING counts what went in: an executemany's rowcount is not reliable on every driver.
    """
    if not rows:
        return 0
    statement = insert_new(conn, _T, "prediction_id").returning(_T.c.seq)
    return len(conn.execute(statement, rows).all())


# ------------------------------------------------------------------------------------------ async writer


class AsyncCapture:
    """Writes records to a CaptureStore from a daemon thread, so a request only pays for sampling and enqueueing.

    The thread is a models.background.BackgroundWorker: submit() never blocks; records beyond max_queue pending
    ones are dropped and counted in `dropped`. The writer takes whatever is queued, waits at most flush_interval_s
    for more (up to max_batch), and inserts the batch in one transaction; a failed batch is logged and counted in
    `failed`, and the writer carries on.
    Counters: `offered` (passed to submit), `submitted` (sampled in and queued), `dropped` (queue full),
    `written` (inserted), `failed`. Call close() at shutdown: it writes what is queued, then stops the thread
    (the store stays open; its owner closes it).
    """

    def __init__(
        self,
        store: CaptureStore,
        sample_rate: float = 1.0,
        max_queue: int = 10000,
        flush_interval_s: float = 0.2,
        max_batch: int = 1000,
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0 or max_queue < 1 or flush_interval_s < 0 or max_batch < 1:
            raise ValueError(f"need 0 <= sample_rate <= 1, max_queue >= 1, flush_interval_s >= 0 and max_batch >= 1, "
                             f"got {sample_rate}, {max_queue}, {flush_interval_s} and {max_batch}.")
        self.store = store
        self.sample_rate = float(sample_rate)
        self.flush_interval_s = float(flush_interval_s)
        self.max_batch = int(max_batch)
        self.offered = 0
        self._offered_lock = threading.Lock()
        self._writer: BackgroundWorker[PredictionRecord] = BackgroundWorker(
            "adaptserve-capture", self._write, maxsize=max_queue, max_batch=self.max_batch,
            linger_s=self.flush_interval_s)

    @property
    def submitted(self) -> int:
        return self._writer.submitted

    @property
    def dropped(self) -> int:
        return self._writer.dropped

    @property
    def written(self) -> int:
        return self._writer.handled

    @property
    def failed(self) -> int:
        return self._writer.failed

    def submit(self, records: PredictionRecord | Iterable[PredictionRecord]) -> int:
        """Sample and enqueue records without ever blocking; returns how many were queued.

        Cost per record: one blake2b of the id (skipped at sample_rate 1) and one put_nowait; a record that finds
        the queue full (the writer is behind, e.g. a stalled disk) is dropped and counted.
        """
        if type(records) is PredictionRecord:
            records = (records,)
        elif not isinstance(records, list | tuple):
            records = list(records)  # type: ignore[arg-type]
        with self._offered_lock:
            self.offered += len(records)
        rate = self.sample_rate
        kept = records if rate >= 1.0 else [r for r in records if keep_sample(r.prediction_id, rate)]
        return self._writer.submit_many(kept)

    def _write(self, batch: list[PredictionRecord]) -> None:
        self.store.add_many(batch)  # raising counts the batch as failed (logged by the worker); capture goes on

    def pending(self) -> int:
        """Records queued or being written."""
        return max(self._writer.unfinished, 0)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every record submitted before this call is written (or failed); False on timeout."""
        return self.pending() == 0 or self._writer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop accepting records, write what is queued, stop the writer; True when everything was written."""
        return self._writer.close(timeout)

    def stats(self) -> dict[str, int]:
        return {"offered": self.offered, "submitted": self.submitted, "dropped": self.dropped,
                "written": self.written, "failed": self.failed, "queued": self._writer.pending}
