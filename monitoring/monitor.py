"""The drift monitor inside the service: capture predictions off the hot path, check windows, keep a history.

* record(): the request thread only hands (ids, images, probs, embeddings) to a bounded queue (microseconds); a
  daemon thread samples by prediction id, computes the image statistics (monitoring.image_stats, stacked per
  drained group of batches), builds PredictionRecords and hands them to an AsyncCapture writing the capture table of
  the state database (monitoring.capture; bounded per adapter and in time; shared by every replica on one
  ADAPTSERVE_DATABASE_URL, so a check sees all traffic).
* check(adapter): the adapter's latest `window` records of one version (the champion unless given) against that
  version's `reference.npz` (written by monitoring.reference; the base model's own reference for "base") with a cached
  monitoring.detectors.DriftDetector, run with numpy's BLAS on one thread (monitoring.blas); tens of milliseconds.
  Every result goes to the drift history (monitoring.history), to the Prometheus gauges of monitoring.metrics
  and, every REPORT_EVERY-th check of an adapter, to an Evidently report (`<home>/reports/<adapter>/*.html` plus
  the workspace `<home>/evidently`), written by a background thread because it takes seconds.
* start(): scheduled checks every interval_s, each adapter's by ONE monitor of all the workers and replicas on the
  database: at every tick a monitor checks only the adapters whose lease it wins for the interval
  (monitoring.leases); another takes an adapter over when its holder closes or stops renewing.

Threads start lazily and stop in close(): the recorder and the report writer are models.background
BackgroundWorkers (as is AsyncCapture's database writer); the scheduler is a timer loop. Importing this module
imports neither torch nor prometheus_client.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.artifact_store import ArtifactError, from_settings
from models.background import BackgroundWorker
from models.files import file_sha256
from models.registry import NAME_PATTERN, CorruptAdapterError
from monitoring.accuracy import AccuracyEstimator, read_estimator
from monitoring.blas import one_blas_thread
from monitoring.capture import AsyncCapture, CaptureStore, keep_sample, make_records
from monitoring.config import MonitorConfig
from monitoring.detectors import REFERENCE_FILE, DriftDetector, ReferenceSet
from monitoring.errors import NoReferenceError, NotEnoughRecordsError, UnknownAdapterError
from monitoring.history import DriftHistory, iso_utc
from monitoring.image_stats import batch_image_stats
from monitoring.leases import DriftLeases

_NAME_RE = re.compile(NAME_PATTERN)
_REPORT_RE = re.compile(r"[0-9A-Za-z_-]{1,64}\.html")  # <time>-<check id>.html: _write_report names them
log = logging.getLogger(__name__)

BASE = "base"  # engine key ("base", 0): traffic served by the plain base model
Key = tuple[str, int]
_MAX_DETECTORS = 64  # cached (adapter, version) detectors; each holds its reference (~1 MB at 500 x 512)
_REPORT_QUEUE = 4  # reports waiting for the reporter thread; more are skipped (logged), never queued without bound
_DRAIN = 256  # queued batches the capture thread turns into records at once
RESULT_KEYS = ("adapter", "version", "drift", "score", "threshold", "p_value", "window_size", "checked_at",
               "features", "report", "mean_confidence", "estimated_accuracy", "accuracy_estimate")


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
        from monitoring import metrics  # here, not at import: it loads prometheus_client, which only a worker may

        self.home = Path(home)
        self.registry = registry
        self.base_dir = Path(base_dir)
        self.cfg = cfg or MonitorConfig.from_env()
        self.classes = _class_names(self.base_dir)
        self.store = CaptureStore(self.home, self.cfg.max_per_adapter, self.cfg.retention_s)
        self.checks = DriftHistory(self.home)
        self.leases = DriftLeases(self.home, self.cfg.interval_s)
        self._metrics = metrics
        self._capture: AsyncCapture | None = None
        self._recorder: BackgroundWorker[_Batch] | None = None
        self._start_lock = threading.Lock()
        self.dropped = 0  # predictions dropped because the capture queue was full
        self.failed = 0  # predictions whose records could not be built (logged)
        self._detectors: OrderedDict[Key, DriftDetector] = OrderedDict()
        self._estimators: dict[Key, AccuracyEstimator | None] = {}  # beside each cached detector
        self._detector_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._reporter: BackgroundWorker[tuple[int, Key, ReferenceSet]] | None = None
        self._stop = threading.Event()
        self._scheduler: threading.Thread | None = None
        self._last_checked: dict[str, tuple[Key, str]] = {}
        self._leading: set[str] = set()  # adapters whose lease this monitor has won (logged once each)
        self.scheduled_checks = 0
        self._closed = False

    # ----------------------------------------------------------------------------------- capture

    def record(self, adapter: str, version: int, prediction_ids: Sequence[str], images: Sequence[Image.Image],
               probs: np.ndarray, embeddings: np.ndarray) -> None:
        """Hand one served batch to the capture thread; never blocks (a full queue drops it, counted).

        The request path pays for one small object and one put_nowait. The arrays and images are kept by reference
        until the capture thread is done with them: the caller must not modify them afterwards.
        """
        if self._closed:
            return
        recorder = self._recorder or self._start_recorder()
        if recorder is None or recorder.submit(_Batch(adapter, int(version), prediction_ids, images, probs,
                                                      embeddings, time.time())):
            return
        self.dropped += len(prediction_ids)
        self._metrics.CAPTURE_DROPPED.inc(len(prediction_ids))

    def _start_recorder(self) -> BackgroundWorker[_Batch] | None:
        with self._start_lock:
            if self._recorder is None and not self._closed:
                self._capture = AsyncCapture(self.store, sample_rate=1.0, max_queue=max(10000, self.cfg.window * 4))
                # whatever is waiting, up to _DRAIN batches, without lingering: one stacked statistics pass and one
                # database write for all of them
                self._recorder = BackgroundWorker("adaptserve-drift-capture", self._submit,
                                                  maxsize=self.cfg.queue_size, max_batch=_DRAIN)
            return self._recorder

    def _sampled(self, batch: _Batch) -> _Batch | None:
        if self.cfg.sample >= 1.0:
            return batch
        keep = [i for i, pid in enumerate(batch.ids) if keep_sample(pid, self.cfg.sample)]
        if not keep:
            return None
        return _Batch(batch.adapter, batch.version, [batch.ids[i] for i in keep], [batch.images[i] for i in keep],
                      np.asarray(batch.probs)[keep], np.asarray(batch.embeddings)[keep], batch.created_at)

    def _submit(self, batches: list[_Batch]) -> None:
        """Sample, compute image statistics and records, queue them for the database writer; a bad batch is logged
        and counted in `failed`, never raised (capture must go on)."""
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
        stats = batch_image_stats([im for b in batches for im in b.images])
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
        """Wait until everything recorded before this call is in the capture store and queued reports are written;
        False on timeout. For tests and shutdown; the service never needs it."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        recorder, capture, reporter = self._recorder, self._capture, self._reporter
        # in data-path order: the recorder hands its records to the capture writer before that one is flushed
        return ((recorder is None or not recorder.unfinished or recorder.flush(left()))
                and (capture is None or capture.flush(left()))
                and (reporter is None or not reporter.unfinished or reporter.flush(left())))

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
        try:  # no download for a version without a reference; else fetched when this replica has no copy yet
            path = self.registry.local(version) / REFERENCE_FILE if REFERENCE_FILE in version.sha256 else None
        except CorruptAdapterError as err:  # UnfetchableAdapterError: the store has no verified copy either
            raise NoReferenceError(str(err)) from None
        if path is None or not path.is_file():
            raise NoReferenceError(f"adapter {key[0]!r} version {key[1]} has no drift reference ({REFERENCE_FILE}): "
                                   "it was published without reference samples or before drift monitoring; "
                                   "register it again with `adaptserve adapters register` to add one.")
        if file_sha256(path) != version.sha256[REFERENCE_FILE]:
            raise NoReferenceError(f"adapter {key[0]!r} version {key[1]}: {REFERENCE_FILE} does not match the sha256 "
                                   "recorded at registration (corrupted or replaced); register the version again.")
        return path

    def detector(self, key: Key) -> DriftDetector:
        """The (cached) DriftDetector of one adapter version, built from its reference on first use."""
        with self._detector_lock:
            detector = self._detectors.get(key)
            if detector is None:
                path = self._reference_path(key)
                reference = ReferenceSet.load(path)
                self._estimators[key] = read_estimator(path)
                try:
                    with one_blas_thread():
                        detector = DriftDetector(reference, self.cfg.detector_config())
                except ValueError as err:
                    raise NoReferenceError(f"{key[0]} v{key[1]}: {err}") from None
                self._detectors[key] = detector
                while len(self._detectors) > _MAX_DETECTORS:
                    self._estimators.pop(self._detectors.popitem(last=False)[0], None)
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
        result.update(adapter=adapter, version=key[1], checked_at=iso_utc(checked_at), report=None,
                      mean_confidence=float(window.confidence.mean()), estimated_accuracy=None, accuracy_estimate=None)
        estimator = self._estimators.get(key)
        if estimator is not None:  # monitoring/accuracy.py; None for a version registered without a holdout
            estimate = estimator.estimate(window.confidence, window.classes)
            result.update(estimated_accuracy=estimate["estimated_accuracy"], accuracy_estimate=estimate)
        check_id, n_checks = self.checks.add(result, checked_at)
        self._metrics.observe_check(adapter, result["drift"], result["score"], result["mean_confidence"],
                                    result["estimated_accuracy"])
        every = self.cfg.report_every
        if write_report:
            result["report"] = self._write_report(check_id, key, window)
        elif write_report is None and every and n_checks % every == 0:
            self._queue_report(check_id, key, window)
        return {k: result[k] for k in RESULT_KEYS}

    # ----------------------------------------------------------------------------------- reports

    def _queue_report(self, check_id: int, key: Key, window: ReferenceSet) -> None:
        with self._start_lock:
            if self._reporter is None and not self._closed:
                self._reporter = BackgroundWorker("adaptserve-drift-reports", self._write_reports,
                                                  maxsize=_REPORT_QUEUE)
            reporter = self._reporter
        if reporter is not None and not reporter.submit((check_id, key, window)):
            log.warning("drift monitor: %d reports already waiting; no report for check %d of %s", _REPORT_QUEUE,
                        check_id, key[0])

    def _write_reports(self, items: list[tuple[int, Key, ReferenceSet]]) -> None:
        for item in items:  # one at a time (max_batch 1): each takes seconds
            self._write_report(*item)

    def _write_report(self, check_id: int, key: Key, window: ReferenceSet) -> str | None:
        """Evidently HTML at <home>/reports/<adapter>/<time>-<check id>.html plus a workspace snapshot."""
        from monitoring.reports import prune_reports, write_report  # here, not at import: it loads evidently

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
        self.checks.set_report(check_id, str(out), self._share_report(out))
        prune_reports(out.parent, self.cfg.report_keep)
        return str(out)

    def _share_report(self, path: Path) -> str | None:
        """Upload a report to the artifact store, so that every replica can serve it; its sha256, or None when the
        upload failed (this replica still serves it from its own home)."""
        try:
            return from_settings().put_file(path)
        except Exception:
            log.exception("drift monitor: report %s not uploaded to the artifact store", path.name)
            return None

    def report_path(self, adapter: str) -> Path | None:
        """The adapter's latest Evidently HTML report, or None. Only a file under ``<home>/reports/<adapter>/`` is
        ever returned: the name comes from a client, so it is checked before it becomes part of a path."""
        if not isinstance(adapter, str) or not _NAME_RE.fullmatch(adapter):
            raise UnknownAdapterError(f"invalid adapter name {adapter!r}: must match {NAME_PATTERN}")
        root = (self.home / "reports" / adapter).resolve()
        latest = self.checks.latest_report_object(adapter)
        if latest is not None:
            path, digest = Path(latest[0]), latest[1]
            if path.is_file() and path.resolve().parent == root:
                return path
            if digest and _REPORT_RE.fullmatch(path.name):  # written by another replica: fetched, verified
                fetched = self._fetch_report(digest, root / path.name)
                if fetched is not None:
                    return fetched
        files = sorted(root.glob("*.html"), key=lambda f: (f.stat().st_mtime, f.name))
        return files[-1] if files else None

    def _fetch_report(self, digest: str, dest: Path) -> Path | None:
        from monitoring.reports import prune_reports  # here, as above; evidently itself only loads to write one

        try:
            from_settings().get_file(digest, dest)
        except (ArtifactError, OSError, ValueError):
            log.exception("drift monitor: report %s (sha256 %s) not fetched from the artifact store", dest.name,
                          digest)
            return None
        prune_reports(dest.parent, self.cfg.report_keep)
        return dest if dest.is_file() else None

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
        """Whether this monitor runs the scheduled checks of at least one adapter (holds a live lease)."""
        return bool(self.leases.held())

    def start(self) -> DriftMonitor:
        """Export the latest stored check of every adapter to the gauges, then start scheduled checks (every
        interval_s; 0 disables them). Idempotent."""
        for adapter in self.checks.adapters():
            latest = self.checks.latest(adapter)
            if latest is not None:
                self._metrics.set_latest(adapter, latest["drift"], latest["score"], latest["mean_confidence"],
                                         latest.get("estimated_accuracy"))
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
                self.run_scheduled()
            except Exception:  # keep scheduling: a transient database error must not end monitoring
                log.exception("drift monitor: scheduled checks failed")

    def run_scheduled(self, now: float | None = None) -> list[dict[str, Any]]:
        """One round of scheduled checks at `now` (default time.time()): every captured adapter whose lease this
        monitor wins for the interval (monitoring.leases), whose champion has enough records and new ones since this
        monitor's last scheduled check of it. Reports go to the background thread. Returns the results."""
        results = []
        for adapter in self.store.adapters():
            if self._stop.is_set():
                break
            # renewed at every tick, new records or not: the holder stays the one that knows what it last checked
            if not self.leases.acquire(adapter, now):
                continue
            if adapter not in self._leading:
                self._leading.add(adapter)
                log.info("drift monitor: %s runs the scheduled drift checks of %s", self.leases.holder, adapter)
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
        """Stop the scheduler, write what is queued, stop the threads, give back the drift leases."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout)
        if self._recorder is not None and not self._recorder.close(timeout):
            log.warning("drift monitor: capture thread still busy after %ss; the batches it holds are lost", timeout)
        if self._capture is not None:
            self._capture.close(timeout)
        if self._reporter is not None:
            self._reporter.close(timeout)
        try:
            self.leases.release()  # another worker or replica takes the adapters over at its next tick
        except Exception:  # closing goes on: unreleased leases are taken over once they run out
            log.exception("drift monitor: could not give back the drift leases of %s", self.leases.holder)
        self.store.close()
        self.checks.close()

    def __enter__(self) -> DriftMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
