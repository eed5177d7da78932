"""Prometheus metrics of the drift monitor (served with the service's own on BentoML's /metrics).

Import this module only inside a worker (DriftMonitor does, in its constructor): prometheus_client decides at
import time whether it runs in multiprocess mode, and BentoML sets that up after importing the service file.
Gauges use multiprocess_mode="mostrecent": scheduled checks run in one worker and on-demand checks in any, and the
exported value is the latest one set by any of them. Names match monitoring/grafana/adaptserve.json.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DRIFT_SCORE = Gauge(
    "adaptserve_drift_score",
    "-log10 of the smallest family-wise adjusted p-value of the latest drift check (alarm at -log10(alpha))",
    ["adapter"],
    multiprocess_mode="mostrecent",
)
DRIFT_FLAG = Gauge(
    "adaptserve_drift_flag", "1 when the latest drift check alarmed, else 0", ["adapter"],
    multiprocess_mode="mostrecent",
)
DRIFT_CHECKS = Counter("adaptserve_drift_checks", "Drift checks by result (drift or ok)", ["adapter", "result"])
MEAN_CONFIDENCE = Gauge(
    "adaptserve_mean_confidence",
    "Mean top-1 confidence over the window of the latest drift check",
    ["adapter"],
    multiprocess_mode="mostrecent",
)
ESTIMATED_ACCURACY = Gauge(
    "adaptserve_estimated_accuracy",
    "Accuracy estimated without labels over the window of the latest drift check (monitoring/accuracy.py)",
    ["adapter"],
    multiprocess_mode="mostrecent",
)
CAPTURE_DROPPED = Counter(
    "adaptserve_capture_dropped", "Predictions not recorded for drift monitoring because the capture queue was full"
)


def set_latest(adapter: str, drift: bool, score: float, mean_confidence: float | None,
               estimated_accuracy: float | None = None) -> None:
    """The gauges of the adapter's latest check (also restored from the history when a worker starts)."""
    DRIFT_SCORE.labels(adapter=adapter).set(score)
    DRIFT_FLAG.labels(adapter=adapter).set(1 if drift else 0)
    if mean_confidence is not None:
        MEAN_CONFIDENCE.labels(adapter=adapter).set(mean_confidence)
    if estimated_accuracy is not None:
        ESTIMATED_ACCURACY.labels(adapter=adapter).set(estimated_accuracy)


def observe_check(adapter: str, drift: bool, score: float, mean_confidence: float,
                  estimated_accuracy: float | None = None) -> None:
    set_latest(adapter, drift, score, mean_confidence, estimated_accuracy)
    DRIFT_CHECKS.labels(adapter=adapter, result="drift" if drift else "ok").inc()
