"""The drift -> retrain policy: when a drift check becomes a retrain job. What matters is accuracy, not any change
of the inputs: a shift the model shrugs off starts nothing.

`DriftPolicy.evaluate(adapter)` says "start a job" (with the reason) only when all three hold:

* the latest drift check of the adapter's champion says the version lost at least ``min_drop`` points against its
  clean holdout: measured from labels of its served predictions when there are MEASURED_MIN_LABELS of them, else
  estimated without labels (monitoring/accuracy.py). A version without an estimator (registered without a
  labelled holdout) falls back to the drift flag, and so does ``min_drop`` 0. The check must be made after the last
  promotion (a check made before it judged the old champion);
* at least ``min_labels`` labels arrived since the last job that trained (succeeded or rejected; a failed job
  consumed nothing): retraining on the labels the last job already saw cannot fix anything;
* ``cooldown_s`` passed since the last drift-started job, so a drift that persists while labels trickle in does not
  start a job per check.

The job runner (`pipelines.runner`) asks it every ``policy_interval_s`` for every registered adapter. Its thresholds
are the settings ADAPTSERVE_RETRAIN_MIN_LABELS, ADAPTSERVE_RETRAIN_COOLDOWN_S and ADAPTSERVE_RETRAIN_MIN_DROP
(`DriftPolicy.from_env`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models import settings
from models.state import open_state
from monitoring.history import DriftHistory
from pipelines.jobs import JobStore
from pipelines.label_db import measured_accuracy

MEASURED_MIN_LABELS = 20  # labels of a version's served predictions before they, not the estimate, say its accuracy


def _epoch(value: Any) -> float | None:
    """checked_at as epoch seconds, from an ISO string (naive = UTC) or a number."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    parsed = datetime.fromisoformat(str(value))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@dataclass
class DriftPolicy:
    """When drift starts a retrain job. ``evaluate`` returns the reason, or None to wait."""

    home: Path = field(metadata={"help": "ADAPTSERVE_HOME: monitor.db, the labels and the state database"})
    min_labels: int = field(
        default=settings.default("retrain_min_labels"), metadata={"help": settings.help_text("retrain_min_labels")}
    )
    cooldown_s: float = field(
        default=settings.default("retrain_cooldown_s"), metadata={"help": settings.help_text("retrain_cooldown_s")}
    )
    latest_drift: Callable[[str], Mapping[str, Any] | None] | None = field(
        default=None, metadata={"help": "adapter -> latest drift check; default monitoring.history.DriftHistory"}
    )
    count_labels: Callable[[str, float | None], int] | None = field(
        default=None, metadata={"help": "(adapter, since) -> new labels; default pipelines.labels.LabelStore.count"}
    )
    min_drop: float = field(
        default=settings.default("retrain_min_drop"), metadata={"help": settings.help_text("retrain_min_drop")}
    )
    measured: Callable[[str, int], Mapping[str, Any]] | None = field(
        default=None, metadata={"help": "(adapter, version) -> {accuracy, labels}; default from the label store"}
    )
    jobs: JobStore | None = field(default=None, metadata={"help": "job history; default JobStore(home)"})
    clock: Callable[[], float] = field(default=time.time, metadata={"help": "epoch seconds now (tests fake it)"})

    def __post_init__(self) -> None:
        if self.min_labels < 0 or self.cooldown_s < 0:
            raise ValueError(
                f"min_labels and cooldown_s must be >= 0, got {self.min_labels} and {self.cooldown_s} "
                f"({settings.env_name('retrain_min_labels')}, {settings.env_name('retrain_cooldown_s')}); "
                "use 0 to start a job on every flagged drift check"
            )

    @classmethod
    def from_env(cls, home: str | Path, environ: Mapping[str, str] | None = None, **readers: Any) -> DriftPolicy:
        """The policy the settings describe (SettingsError naming a bad variable); `readers` as in the fields."""
        s = settings.load(environ)
        return cls(Path(home), min_labels=s.retrain_min_labels, cooldown_s=s.retrain_cooldown_s,
                   min_drop=s.retrain_min_drop, **readers)

    def _drift_reader(self) -> Callable[[str], Mapping[str, Any] | None]:
        if self.latest_drift is None:
            self.latest_drift = DriftHistory(self.home).latest
        return self.latest_drift

    def _label_counter(self) -> Callable[[str, float | None], int]:
        if self.count_labels is None:
            # deferred: pipelines.labels imports torch (preprocessing); a runner that never checks drift never pays it
            from pipelines.labels import LabelStore

            store = LabelStore(self.home)
            self.count_labels = lambda adapter, since: store.count(adapter, since=since)
        return self.count_labels

    def _measured(self, adapter: str, version: int) -> Mapping[str, Any]:
        if self.measured is None:
            database = open_state(self.home)
            self.measured = lambda a, v: measured_accuracy(database, a, v)
        return self.measured(adapter, version)

    def accuracy_drop(self, check: Mapping[str, Any]) -> tuple[float, str] | None:
        """(points lost against the clean holdout, how it is known) for the check's version; None when neither labels
        nor an estimate say it."""
        estimate = check.get("accuracy_estimate") or {}
        holdout = estimate.get("holdout_accuracy")
        if holdout is None:
            return None
        measured = self._measured(str(check["adapter"]), int(check["version"])) if "version" in check else {}
        if measured.get("accuracy") is not None and measured.get("labels", 0) >= MEASURED_MIN_LABELS:
            return (100 * (holdout - measured["accuracy"]),
                    f"measured {measured['accuracy']:.1%} from {measured['labels']} labels")
        return 100 * (holdout - estimate["estimated_accuracy"]), f"estimated {estimate['estimated_accuracy']:.1%}"

    def _job_store(self) -> JobStore:
        if self.jobs is None:
            self.jobs = JobStore(self.home)
        return self.jobs

    def evaluate(self, adapter: str) -> str | None:
        """The latest check says the version lost >= min_drop points (or, without an estimate or with min_drop 0,
        flagged drift), AND >= min_labels labels since the last retrain that trained (succeeded or rejected; a
        failed one consumed nothing), AND cooldown_s since the last drift-started job. A check made before the last
        promotion judged the old champion, so it starts nothing."""
        check = self._drift_reader()(adapter)
        if not check:
            return None
        drop = self.accuracy_drop(check) if self.min_drop > 0 else None
        if drop is None:
            if not check.get("drift"):
                return None
            what = (f"drift flagged by the check at {check.get('checked_at')} (score {check.get('score')}, threshold "
                    f"{check.get('threshold')})")
        else:
            points, how = drop
            if points < self.min_drop:
                return None  # the inputs may have moved; the accuracy did not
            what = (f"accuracy {how} at the check at {check.get('checked_at')}: {points:.1f} points below the "
                    f"holdout's (>= {self.min_drop:g}); drift {'flagged' if check.get('drift') else 'not flagged'}")
        jobs, now = self._job_store(), self.clock()
        last_drift_job = jobs.latest(adapter, trigger="drift")
        if last_drift_job is not None and now - last_drift_job.created_at < self.cooldown_s:
            return None
        trained = jobs.last_finished(adapter, states=("succeeded", "rejected"))
        since = None if trained is None else trained.finished_at
        checked_at = _epoch(check.get("checked_at"))
        if trained is not None and trained.state == "succeeded" and (checked_at or 0.0) < trained.finished_at:
            return None
        labels = self._label_counter()(adapter, since)
        if labels < self.min_labels:
            return None
        return f"{what}; {labels} new labels (>= {self.min_labels})"
