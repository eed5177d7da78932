"""The drift monitor inside the service: capture predictions off the hot path, check windows, keep a history.

* record(): the request thread only appends (ids, images, probs, embeddings) to a bounded queue (microseconds); a
  daemon thread samples by prediction id, computes the image statistics (vectorised per drained group of batches),
  builds PredictionRecords and hands them to an AsyncCapture writing `<home>/capture.db` (bounded per adapter and
  in time).
* check(adapter): the adapter's latest `window` records of one version (the champion unless given) against that
  version's `reference.npz` (written by monitoring.reference; the base model's own reference for "base") with a cached
  monitoring.detectors.DriftDetector, run with numpy's BLAS on one thread; tens of milliseconds. Every result goes
  to `<home>/monitor.db`, to the Prometheus gauges of monitoring.metrics and, every REPORT_EVERY-th check of an
  adapter, to an Evidently report (`<home>/reports/<adapter>/*.html` plus the workspace `<home>/evidently`),
  written by a background thread because it takes seconds.
* start(): scheduled checks every interval_s in ONE process of the service: the thread that holds an exclusive
  flock on `<home>/monitor.lock` is the leader; the other workers retry at every tick and take over when the
  leader's process dies (the kernel drops its lock).

DriftHistory reads the check history without the registry, torch or Prometheus: the retrain job runner, another
process, decides on drift through it. Importing this module imports neither torch nor prometheus_client.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.registry import NAME_PATTERN
from models.sqlite import transaction
from monitoring.capture import AsyncCapture, CaptureStore, keep_sample, make_records
from monitoring.detectors import REFERENCE_FILE, DriftConfig, DriftDetector, ReferenceSet
from monitoring.image_stats import batch_image_stats

_NAME_RE = re.compile(NAME_PATTERN)
log = logging.getLogger(__name__)

BASE = "base"  # engine key ("base", 0): traffic served by the plain base model
Key = tuple[str, int]
_MAX_DETECTORS = 64  # cached (adapter, version) detectors; each holds its reference (~1 MB at 500 x 512)
_REPORT_QUEUE = 4  # reports waiting for the reporter thread; more are skipped (logged), never queued without bound


# --------------------------------------------------------------------------------------------- errors


class MonitorError(Exception):
    """Base class of the monitor's errors; `status` is the HTTP status a route should answer with."""

    status = 400

    @property
    def status_code(self) -> int:  # the name service/errors.py reads
        return self.status


class UnknownAdapterError(MonitorError, LookupError):
    """The adapter (or version) is not in the registry."""

    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotEnoughRecordsError(MonitorError):
    """A check cannot run yet: too few captured records of the version (the message says how many are needed)."""

    status = 409


class NoReferenceError(NotEnoughRecordsError):
    """The version has no usable drift reference: nothing to compare with yet, so 409 like too few records."""


# --------------------------------------------------------------------------------------------- config


def _env_number(name: str, default: float, kind: type, low: float) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return value


def _config_errors(cfg: MonitorConfig) -> list[str]:
    checks = [
        (cfg.interval_s >= 0, f"interval_s must be >= 0 (0 disables scheduled checks), got {cfg.interval_s}."),
        (cfg.min_records >= 10, f"min_records must be at least 10, got {cfg.min_records}; 100 or more keeps checks "
                                "from being noisy."),
        (cfg.window >= cfg.min_records, f"window ({cfg.window}) must be >= min_records ({cfg.min_records}); raise "
                                        "ADAPTSERVE_DRIFT_WINDOW or lower ADAPTSERVE_DRIFT_MIN_RECORDS."),
        (0.0 < cfg.alpha < 1.0, f"alpha must be between 0 and 1 (exclusive), got {cfg.alpha}; 0.01 allows 1% "
                                "false alarms per check."),
        (0.0 <= cfg.sample <= 1.0, f"sample must be between 0 and 1, got {cfg.sample}; 1 records every prediction."),
        (cfg.max_per_adapter >= cfg.window, f"max_per_adapter ({cfg.max_per_adapter}) must be >= window "
                                            f"({cfg.window}), or the window can never fill."),
        (cfg.retention_s > 0, f"retention_s must be > 0, got {cfg.retention_s}."),
        (cfg.report_every >= 0, f"report_every must be >= 0 (0 = never), got {cfg.report_every}."),
        (cfg.report_keep >= 1, f"report_keep must be at least 1, got {cfg.report_keep}."),
        (cfg.queue_size >= 1, f"queue_size must be at least 1, got {cfg.queue_size}."),
    ]
    return [message for ok, message in checks if not ok]


@dataclass(frozen=True)
class MonitorConfig:
    """Drift monitor settings; every field is an environment variable (from_env) with a default."""

    interval_s: float = field(default=30.0, metadata={
        "env": "ADAPTSERVE_DRIFT_INTERVAL_S", "help": "seconds between scheduled drift checks (0 = on demand only)"})
    window: int = field(default=500, metadata={
        "env": "ADAPTSERVE_DRIFT_WINDOW", "help": "latest records of the champion version compared per check"})
    min_records: int = field(default=100, metadata={
        "env": "ADAPTSERVE_DRIFT_MIN_RECORDS", "help": "fewest records a check accepts (fewer: 409)"})
    alpha: float = field(default=0.01, metadata={
        "env": "ADAPTSERVE_DRIFT_ALPHA", "help": "false-alarm rate per check on clean traffic"})
    sample: float = field(default=1.0, metadata={
        "env": "ADAPTSERVE_CAPTURE_SAMPLE", "help": "fraction of predictions recorded (deterministic by id)"})
    max_per_adapter: int = field(default=5000, metadata={
        "env": "ADAPTSERVE_CAPTURE_MAX_PER_ADAPTER", "help": "newest records kept per adapter"})
    retention_s: float = field(default=7 * 86400.0, metadata={
        "env": "ADAPTSERVE_CAPTURE_RETENTION_S", "help": "records older than this are deleted, s"})
    report_every: int = field(default=10, metadata={
        "env": "ADAPTSERVE_REPORT_EVERY", "help": "Evidently report every Nth check of an adapter (0 = never)"})
    report_keep: int = field(default=20, metadata={
        "env": "ADAPTSERVE_REPORT_KEEP", "help": "Evidently HTML reports kept per adapter (~4 MB each)"})
    queue_size: int = field(default=1000, metadata={
        "env": "ADAPTSERVE_CAPTURE_QUEUE", "help": "served batches waiting for capture; beyond it they are dropped"})

    def __post_init__(self) -> None:
        errors = _config_errors(self)
        if errors:
            raise ValueError(" ".join(errors))

    @classmethod
    def from_env(cls) -> MonitorConfig:
        values: dict[str, Any] = {}
        for f in fields(cls):
            kind = type(f.default)
            values[f.name] = _env_number(f.metadata["env"], f.default, kind, 0)
        return cls(**values)

    def detector_config(self) -> DriftConfig:
        return DriftConfig(alpha=self.alpha, min_window=self.min_records)


def reference_table() -> list[tuple[str, str, str]]:
    """(variable, default, help) for the README's configuration reference."""
    return [(f.metadata["env"], str(f.default), f.metadata["help"]) for f in fields(MonitorConfig)]


# --------------------------------------------------------------------------------------------- history


_HISTORY_SCHEMA = """
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
_HISTORY_COLUMNS = ("adapter, version, checked_at, drift, score, threshold, p_value, window_size, features, report, "
                    "mean_confidence")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _row_to_result(row: Sequence[Any]) -> dict[str, Any]:
    adapter, version, checked_at, drift, score, threshold, p_value, window_size, features, report, mean_conf = row
    return {
        "adapter": adapter, "version": int(version), "drift": bool(drift), "score": float(score),
        "threshold": float(threshold), "p_value": float(p_value), "window_size": int(window_size),
        "checked_at": _iso(checked_at), "features": json.loads(features), "report": report,
        "mean_confidence": None if mean_conf is None else float(mean_conf),
    }


class DriftHistory:
    """Drift checks in SQLite (`<home>/monitor.db`, WAL): the monitor writes, anyone reads, from any process.

    Results are dicts in the /drift response shape: adapter, version, drift, score, threshold, p_value,
    window_size, checked_at (ISO 8601, UTC), features, report (HTML path or None) and mean_confidence.
    """

    def __init__(self, home: str | Path, timeout_s: float = 30.0) -> None:
        self.path = Path(home) / "monitor.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_HISTORY_SCHEMA)

    def add(self, result: dict[str, Any], checked_at: float) -> tuple[int, int]:
        """Store one check; returns (its id, how many checks the adapter now has, this one included)."""
        row = (result["adapter"], int(result["version"]), float(checked_at), int(bool(result["drift"])),
               float(result["score"]), float(result["threshold"]), float(result["p_value"]),
               int(result["window_size"]), json.dumps(result["features"]), result.get("report"),
               result.get("mean_confidence"))
        with self._lock, transaction(self._conn) as conn:
            cur = conn.execute(f"INSERT INTO drift_checks ({_HISTORY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            count = conn.execute("SELECT COUNT(*) FROM drift_checks WHERE adapter = ?",
                                 (result["adapter"],)).fetchone()[0]
        return int(cur.lastrowid), int(count)

    def set_report(self, check_id: int, report: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE drift_checks SET report = ? WHERE id = ?", (report, check_id))

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def latest(self, adapter: str) -> dict[str, Any] | None:
        rows = self._rows(f"SELECT {_HISTORY_COLUMNS} FROM drift_checks WHERE adapter = ? ORDER BY id DESC LIMIT 1",
                          (adapter,))
        return _row_to_result(rows[0]) if rows else None

    def history(self, adapter: str, limit: int = 200) -> list[dict[str, Any]]:
        """The adapter's latest `limit` checks, oldest first."""
        rows = self._rows(f"SELECT {_HISTORY_COLUMNS} FROM drift_checks WHERE adapter = ? ORDER BY id DESC LIMIT ?",
                          (adapter, max(int(limit), 0)))
        return [_row_to_result(r) for r in reversed(rows)]

    def latest_report(self, adapter: str) -> str | None:
        rows = self._rows("SELECT report FROM drift_checks WHERE adapter = ? AND report IS NOT NULL "
                          "ORDER BY id DESC LIMIT 1", (adapter,))
        return rows[0][0] if rows else None

    def adapters(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT adapter FROM drift_checks ORDER BY adapter", ())]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# --------------------------------------------------------------------------------------------- threads

_blas: Any = None
_blas_lock = threading.Lock()


def one_blas_thread() -> Any:
    """Context manager: numpy's BLAS (OpenBLAS) on one thread, for a drift check or a detector fit.

    A check is a few small GEMMs; two BLAS threads on two cores that also serve inference spend more time
    synchronising than computing (measured on 2 busy cores: 200 ms per 1000 x 512 check with 2 threads, 50-60 ms
    with 1), and one thread leaves the other core to serving. The limit is process-wide while it lasts (OpenBLAS
    has one setting); serving uses ONNX Runtime's and torch's own thread pools, not numpy's. ~50 us to enter.
    """
    global _blas
    with _blas_lock:
        if _blas is None:
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController().select(user_api="blas")
    return _blas.limit(limits=1)


# --------------------------------------------------------------------------------------------- statistics


def _batch_mean_var(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean (float64) and population variance of an (n, m) float32 array: image_stats._mean_var per row."""
    mean = x.mean(axis=1, dtype=np.float64)
    centred = x - mean.astype(np.float32)[:, None]
    var = np.einsum("ij,ij->i", centred, centred) / x.shape[1]
    return mean, np.maximum(var.astype(np.float64), 0.0)


def fast_image_stats(images: Sequence[Image.Image]) -> np.ndarray:
    """monitoring.image_stats.batch_image_stats, vectorised over a batch of RGB images of one size.

    batch_image_stats costs ~20 numpy calls per image (~150 us at 32x32, almost all call overhead); stacking a
    batch makes that ~20 calls per batch. Same formulas and float32 arithmetic (equal to ~1e-6 relative; a test
    holds them together); anything but same-size RGB falls back to batch_image_stats.
    """
    if len(images) < 2 or any(im.mode != "RGB" or im.size != images[0].size for im in images):
        return batch_image_stats(images)
    width, height = images[0].size
    if width < 3 or height < 3:
        return batch_image_stats(images)
    planes = np.stack([np.asarray(im) for im in images]).transpose(0, 3, 1, 2).astype(np.float32)
    planes *= np.float32(1.0 / 255)
    r, g, b = planes[:, 0], planes[:, 1], planes[:, 2]
    luma = r * np.float32(0.299) + g * np.float32(0.587) + b * np.float32(0.114)
    n = len(images)
    brightness, luma_var = _batch_mean_var(luma.reshape(n, -1))
    lap = luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1]
    lap += luma[:, 1:-1, :-2]
    lap += luma[:, 1:-1, 2:]
    lap -= np.float32(4.0) * luma[:, 1:-1, 1:-1]
    _, sharpness = _batch_mean_var(lap.reshape(n, -1))
    mu_rg, var_rg = _batch_mean_var((r - g).reshape(n, -1))
    mu_yb, var_yb = _batch_mean_var((np.float32(0.5) * (r + g) - b).reshape(n, -1))
    colourfulness = np.sqrt(var_rg + var_yb) + 0.3 * np.sqrt(mu_rg**2 + mu_yb**2)
    return np.column_stack([brightness, np.sqrt(luma_var), sharpness, colourfulness, np.full(n, float(width)),
                            np.full(n, float(height))])


# --------------------------------------------------------------------------------------------- monitor

_STOP = object()
_DRAIN = 256  # queued batches the capture thread turns into records at once


@dataclass
class _Batch:
    """One served batch as record() received it; turned into PredictionRecords on the capture thread."""

    adapter: str
    version: int
    ids: Sequence[str]
    images: Sequence[Image.Image]
    probs: np.ndarray
    embeddings: np.ndarray
    created_at: float


def _class_names(base_dir: Path) -> list[str]:
    """Class names from the base model's model.json (adapters must share them: pipelines.release.check_fits)."""
    return list(json.loads((Path(base_dir) / "model.json").read_text())["classes"])


class DriftMonitor:
    """Capture, checks, history, reports and gauges of one service worker; see the module docstring.

    registry is a models.registry.AdapterRegistry (champion/get); base_dir the base model directory. Threads
    start lazily (capture on the first record(), the scheduler on start()); close() stops them.
    """

    def __init__(
        self, home: str | Path, registry: Any, base_dir: str | Path, cfg: MonitorConfig | None = None
    ) -> None:
        from monitoring import metrics  # here, not at import: only the worker may load prometheus_client

        self.home = Path(home)
        self.registry = registry
        self.base_dir = Path(base_dir)
        self.cfg = cfg or MonitorConfig.from_env()
        self.classes = _class_names(self.base_dir)
        self.store = CaptureStore(self.home / "capture.db", self.cfg.max_per_adapter, self.cfg.retention_s)
        self.checks = DriftHistory(self.home)
        self._metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.cfg.queue_size)
        self._capture: AsyncCapture | None = None
        self._recorder: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.dropped = 0  # predictions dropped because the capture queue was full
        self.failed = 0  # predictions whose records could not be built (logged)
        self._detectors: OrderedDict[Key, DriftDetector] = OrderedDict()
        self._detector_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._reports: queue.Queue[Any] = queue.Queue(maxsize=_REPORT_QUEUE)
        self._reporter: threading.Thread | None = None
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._last_checked: dict[str, tuple[Key, str]] = {}
        self.scheduled_checks = 0
        self._closed = False

    # ----------------------------------------------------------------------------------- capture

    def record(self, adapter: str, version: int, prediction_ids: Sequence[str], images: Sequence[Image.Image],
               probs: np.ndarray, embeddings: np.ndarray) -> None:
        """Hand one served batch to the capture thread; never blocks (a full queue drops it, counted).

        The request path pays for one tuple and one put_nowait. The arrays and images are kept by reference until
        the capture thread is done with them: the caller must not modify them afterwards.
        """
        if self._recorder is None:
            if self._closed:
                return
            self._start_recorder()
        try:
            self._queue.put_nowait(_Batch(adapter, int(version), prediction_ids, images, probs, embeddings,
                                          time.time()))
        except queue.Full:
            self.dropped += len(prediction_ids)
            self._metrics.CAPTURE_DROPPED.inc(len(prediction_ids))

    def _start_recorder(self) -> None:
        with self._start_lock:
            if self._recorder is not None or self._closed:
                return
            self._capture = AsyncCapture(self.store, sample_rate=1.0, max_queue=max(10000, self.cfg.window * 4))
            thread = threading.Thread(target=self._record_loop, name="adaptserve-drift-capture", daemon=True)
            thread.start()
            self._recorder = thread

    def _record_loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < _DRAIN:  # whatever else is waiting: one vectorised pass and one write for all
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batches: list[_Batch] = []
            for item in items:
                if isinstance(item, _Batch):
                    batches.append(item)
                    continue
                self._submit(batches)  # before a marker: flush() means everything queued before it
                batches = []
                if item is _STOP:
                    return
                item.set()  # flush marker
            self._submit(batches)

    def _sampled(self, batch: _Batch) -> _Batch | None:
        if self.cfg.sample >= 1.0:
            return batch
        keep = [i for i, pid in enumerate(batch.ids) if keep_sample(pid, self.cfg.sample)]
        if not keep:
            return None
        return _Batch(batch.adapter, batch.version, [batch.ids[i] for i in keep], [batch.images[i] for i in keep],
                      np.asarray(batch.probs)[keep], np.asarray(batch.embeddings)[keep], batch.created_at)

    def _submit(self, batches: list[_Batch]) -> None:
        """Sample, compute image statistics and records, queue them for the SQLite writer; a bad batch is logged
        and counted, never raised (capture must go on)."""
        if not batches:
            return
        try:
            records = self._records([b for b in map(self._sampled, batches) if b is not None])
        except Exception:
            self.failed += sum(len(b.ids) for b in batches)
            log.exception("drift monitor: could not build records for %d served batches", len(batches))
            return
        capture = self._capture
        assert capture is not None
        before = capture.dropped
        capture.submit(records)
        if capture.dropped > before:
            self.dropped += capture.dropped - before
            self._metrics.CAPTURE_DROPPED.inc(capture.dropped - before)

    def _records(self, batches: list[_Batch]) -> list[Any]:
        """PredictionRecords of many served batches: statistics in one vectorised pass, one make_records per
        (adapter, version), each record keeping the time its request was served."""
        if not batches:
            return []
        stats = fast_image_stats([im for b in batches for im in b.images])
        offsets = np.cumsum([0, *(len(b.ids) for b in batches)])
        groups: dict[Key, list[int]] = {}
        for i, b in enumerate(batches):
            groups.setdefault((b.adapter, b.version), []).append(i)
        records = []
        for (adapter, version), members in groups.items():
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in members])
            group = make_records(adapter, version, [pid for i in members for pid in batches[i].ids],
                                 np.concatenate([np.asarray(batches[i].embeddings) for i in members]), stats[rows],
                                 np.concatenate([np.asarray(batches[i].probs) for i in members]), self.classes)
            times = [batches[i].created_at for i in members for _ in batches[i].ids]
            for record, created_at in zip(group, times, strict=True):
                record.created_at = created_at
            records.extend(group)
        return records

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded before this call is in capture.db and queued reports are written;
        False on timeout. For tests and shutdown; the service never needs it."""
        deadline = time.monotonic() + timeout
        if self._recorder is not None and self._recorder.is_alive():
            marker = threading.Event()
            try:
                self._queue.put(marker, timeout=timeout)
            except queue.Full:
                return False
            if not marker.wait(max(deadline - time.monotonic(), 0.0)):
                return False
        if self._capture is not None and not self._capture.flush(max(deadline - time.monotonic(), 0.0)):
            return False
        if self._reporter is not None:
            return self._join_reports(deadline)
        return True

    def _join_reports(self, deadline: float) -> bool:
        while self._reports.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # ------------------------------------------------------------------------------------ checks

    def _resolve(self, adapter: str, version: int | None) -> Key:
        """(adapter, version) to check: the given version, else the champion, else the newest captured version."""
        if adapter == BASE:
            return (BASE, 0)
        try:
            if version is not None:
                self.registry.get(adapter, int(version))
                return (adapter, int(version))
            champion = self.registry.champion(adapter)
        except (KeyError, ValueError) as err:  # AdapterNotFoundError, InvalidNameError
            raise UnknownAdapterError(str(err).strip("'\"")) from None
        if champion is not None:
            return (adapter, int(champion.version))
        newest = self.store.window_records(adapter, 1)
        if not newest:
            raise NotEnoughRecordsError(f"adapter {adapter!r} has no champion and no captured records yet; a drift "
                                        f"check needs at least {self.cfg.min_records} records of one version.")
        return (adapter, int(newest[0].version))

    def _reference_path(self, key: Key) -> Path:
        if key == (BASE, 0):
            from monitoring.reference import base_reference  # imports torch: only a serving worker gets here

            try:
                return base_reference(self.base_dir, self.home)
            except FileNotFoundError as err:
                raise NoReferenceError(str(err)) from None
        try:
            version = self.registry.get(*key)
        except KeyError as err:  # deleted since the check resolved it
            raise UnknownAdapterError(str(err).strip("'\"")) from None
        path = Path(version.path) / REFERENCE_FILE
        if not path.is_file() or REFERENCE_FILE not in version.sha256:
            raise NoReferenceError(f"adapter {key[0]!r} version {key[1]} has no drift reference ({REFERENCE_FILE}): "
                                   "it was published without reference samples or before drift monitoring; "
                                   "register it again with `adaptserve adapters register` to add one.")
        if hashlib.sha256(path.read_bytes()).hexdigest() != version.sha256[REFERENCE_FILE]:
            raise NoReferenceError(f"adapter {key[0]!r} version {key[1]}: {REFERENCE_FILE} does not match the sha256 "
                                   "recorded at registration (corrupted or replaced); register the version again.")
        return path

    def detector(self, key: Key) -> DriftDetector:
        """The (cached) DriftDetector of one adapter version, built from its reference on first use."""
        with self._detector_lock:
            detector = self._detectors.get(key)
            if detector is None:
                reference = ReferenceSet.load(self._reference_path(key))
                try:
                    with one_blas_thread():
                        detector = DriftDetector(reference, self.cfg.detector_config())
                except ValueError as err:
                    raise NoReferenceError(f"{key[0]} v{key[1]}: {err}") from None
                self._detectors[key] = detector
                while len(self._detectors) > _MAX_DETECTORS:
                    self._detectors.popitem(last=False)
            self._detectors.move_to_end(key)
            return detector

    def check(self, adapter: str, write_report: bool | None = None, version: int | None = None) -> dict[str, Any]:
        """Check the adapter's latest window against its version's reference; store, export and return the result.

        version None checks the champion (newest captured version when there is none). write_report True writes
        the Evidently report now (seconds) and returns its path in "report"; None writes one in the background
        when this is the adapter's REPORT_EVERY-th check ("report" stays None here; report_path() finds it once
        written); False writes none. Raises UnknownAdapterError (404) and NotEnoughRecordsError (409).
        """
        key = self._resolve(adapter, version)
        window = self.store.window(key[0], self.cfg.window, version=key[1])
        if len(window) < self.cfg.min_records:
            raise NotEnoughRecordsError(
                f"adapter {adapter!r} version {key[1]} has {len(window)} captured records; a drift check needs at "
                f"least {self.cfg.min_records} (ADAPTSERVE_DRIFT_MIN_RECORDS). Send more traffic and retry.")
        detector = self.detector(key)
        with self._check_lock, one_blas_thread():  # one check at a time: the detector's random stream is shared
            result = detector.check(window).to_dict()
        checked_at = time.time()
        result.update(adapter=adapter, version=key[1], checked_at=_iso(checked_at), report=None,
                      mean_confidence=float(window.confidence.mean()))
        check_id, n_checks = self.checks.add(result, checked_at)
        self._metrics.observe_check(adapter, result["drift"], result["score"], result["mean_confidence"])
        every = self.cfg.report_every
        if write_report:
            result["report"] = self._write_report(check_id, key, window)
        elif write_report is None and every and n_checks % every == 0:
            self._queue_report(check_id, key, window)
        return {k: result[k] for k in ("adapter", "version", "drift", "score", "threshold", "p_value",
                                       "window_size", "checked_at", "features", "report", "mean_confidence")}

    # ----------------------------------------------------------------------------------- reports

    def _queue_report(self, check_id: int, key: Key, window: ReferenceSet) -> None:
        with self._start_lock:
            if self._reporter is None and not self._closed:
                self._reporter = threading.Thread(target=self._report_loop, name="adaptserve-drift-reports",
                                                  daemon=True)
                self._reporter.start()
        try:
            self._reports.put_nowait((check_id, key, window))
        except queue.Full:
            log.warning("drift monitor: %d reports already waiting; no report for check %d of %s", _REPORT_QUEUE,
                        check_id, key[0])

    def _report_loop(self) -> None:
        while True:
            item = self._reports.get()
            try:
                if item is _STOP:
                    return
                self._write_report(*item)
            finally:
                self._reports.task_done()

    def _write_report(self, check_id: int, key: Key, window: ReferenceSet) -> str | None:
        """Evidently HTML at <home>/reports/<adapter>/<time>-<check id>.html plus a workspace snapshot."""
        from monitoring.reports import prune_reports, write_report

        adapter, version = key
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        out = self.home / "reports" / adapter / f"{stamp}-{check_id}.html"
        try:
            write_report(self.detector(key).reference, window, out, workspace_dir=self.home / "evidently",
                         project=adapter, metadata={"adapter": adapter, "version": str(version),
                                                    "check_id": str(check_id)},
                         tags=[adapter, f"v{version}"], keep_runs=max(self.cfg.report_keep, 100))
        except Exception:  # a report is for humans: its failure must not fail the check or stop the thread
            log.exception("drift monitor: Evidently report for check %d of %s v%s failed", check_id, adapter, version)
            return None
        self.checks.set_report(check_id, str(out))
        prune_reports(out.parent, self.cfg.report_keep)
        return str(out)

    def report_path(self, adapter: str) -> Path | None:
        """The adapter's latest Evidently HTML report, or None. Only a file under ``<home>/reports/<adapter>/`` is
        ever returned: the name comes from a client, so it is checked before it becomes part of a path."""
        if not isinstance(adapter, str) or not _NAME_RE.fullmatch(adapter):
            raise UnknownAdapterError(f"invalid adapter name {adapter!r}: must match {NAME_PATTERN}")
        root = (self.home / "reports" / adapter).resolve()
        latest = self.checks.latest_report(adapter)
        if latest is not None and Path(latest).is_file() and Path(latest).resolve().parent == root:
            return Path(latest)
        files = sorted(root.glob("*.html"), key=lambda f: (f.stat().st_mtime, f.name))
        return files[-1] if files else None

    # ------------------------------------------------------------------------------------- reads

    def latest(self, adapter: str) -> dict[str, Any] | None:
        return self.checks.latest(adapter)

    def history(self, adapter: str, limit: int = 200) -> list[dict[str, Any]]:
        """The adapter's latest `limit` checks, oldest first."""
        return self.checks.history(adapter, limit)

    def adapters(self) -> list[str]:
        """Adapters with captured records or drift checks."""
        return sorted(set(self.store.adapters()) | set(self.checks.adapters()))

    def summary(self, adapter: str, bins: int = 10) -> dict[str, Any]:
        """The adapter's current window (latest `window` records, all versions) for a dashboard."""
        records = self.store.window_records(adapter, self.cfg.window)
        confidence = np.array([r.confidence for r in records], dtype=np.float64)
        counts, edges = np.histogram(confidence, bins=bins, range=(0.0, 1.0))
        return {
            "adapter": adapter,
            "window_size": len(records),
            "versions": {str(v): n for v, n in sorted(Counter(r.version for r in records).items())},
            "mean_confidence": float(confidence.mean()) if len(records) else None,
            "confidence_histogram": {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()},
            "class_counts": dict(sorted(Counter(r.label for r in records).items())),
            "latest_check": self.latest(adapter),
        }

    # ---------------------------------------------------------------------------------- schedule

    @property
    def is_leader(self) -> bool:
        return self._lock_fd is not None

    def _try_lead(self) -> bool:
        """Take the exclusive, non-blocking flock on <home>/monitor.lock; held until close() or process exit."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.home / "monitor.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        log.info("drift monitor: this process (pid %d) runs the scheduled drift checks", os.getpid())
        return True

    def start(self) -> DriftMonitor:
        """Export the latest stored check of every adapter to the gauges, then start scheduled checks (every
        interval_s; 0 disables them). Idempotent."""
        for adapter in self.checks.adapters():
            latest = self.checks.latest(adapter)
            if latest is not None:
                self._metrics.set_latest(adapter, latest["drift"], latest["score"], latest["mean_confidence"])
        with self._start_lock:
            if self.cfg.interval_s <= 0 or self._scheduler is not None or self._closed:
                return self
            self._scheduler = threading.Thread(target=self._schedule_loop, name="adaptserve-drift-scheduler",
                                               daemon=True)
            self._scheduler.start()
        return self

    def _schedule_loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                if self._try_lead():
                    self.run_scheduled()
            except Exception:  # keep scheduling: a transient database error must not end monitoring
                log.exception("drift monitor: scheduled checks failed")

    def run_scheduled(self) -> list[dict[str, Any]]:
        """One round of scheduled checks: every adapter whose champion has enough records and new ones since its
        last scheduled check. Reports go to the background thread. Returns the results."""
        results = []
        for adapter in self.store.adapters():
            if self._stop.is_set():
                break
            try:
                key = self._resolve(adapter, None)
                newest = self.store.window_records(adapter, 1, version=key[1])
                marker = (key, newest[0].prediction_id) if newest else None
                if marker is None or self._last_checked.get(adapter) == marker:
                    continue  # nothing new since the last check: it would repeat the same result
                results.append(self.check(adapter, write_report=None, version=key[1]))
                self._last_checked[adapter] = marker
                self.scheduled_checks += 1
            except (UnknownAdapterError, NotEnoughRecordsError) as err:
                log.debug("drift monitor: %s skipped: %s", adapter, err)
        return results

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler, write what is queued, stop the threads, release the leader lock."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout)
        if self._recorder is not None:
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                log.warning("drift monitor: capture queue still full after %ss; its batches are lost", timeout)
            self._recorder.join(timeout)
        if self._capture is not None:
            self._capture.close(timeout)
        if self._reporter is not None:
            try:
                self._reports.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
            self._reporter.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: another worker becomes the leader
            self._lock_fd = None
        self.store.close()
        self.checks.close()

    def __enter__(self) -> DriftMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
