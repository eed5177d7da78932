"""Prometheus metrics of the service (served by BentoML's /metrics).

Import this module only inside a worker (the service's __init__): prometheus_client decides at import
time whether it runs in multiprocess mode, and BentoML sets that up after importing the service file.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("adaptserve_requests", "Prediction requests", ["adapter", "version", "status"])
LATENCY = Histogram(
    "adaptserve_request_latency_seconds",
    "Prediction latency (preprocess + batch wait + inference)",
    ["adapter", "version"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter("adaptserve_predictions", "Predicted images by class", ["adapter", "version", "label"])
BATCH_SIZE = Histogram("adaptserve_batch_size", "Images per engine call", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ENGINE = Gauge("adaptserve_engine_info", "Inference engine in use", ["engine"], multiprocess_mode="mostrecent")
ADAPTER_LOADS = Counter("adaptserve_adapter_loads", "Adapter versions loaded", ["adapter"])
LOAD_FAILURES = Counter("adaptserve_adapter_load_failures", "Adapter versions refused at load", ["adapter"])
EVICTIONS = Counter("adaptserve_adapter_evictions", "Adapter versions evicted from the LRU")
SWAPS = Counter("adaptserve_swaps", "Champion changes applied by a worker", ["adapter"])
SWAP_LATENCY = Histogram(
    "adaptserve_swap_latency_seconds", "Load time of a new champion before it is swapped in", buckets=LATENCY_BUCKETS
)
SERVED_INT8 = Gauge(
    "adaptserve_served_int8",
    "1 when the adapter version is served by the int8 model (engine onnx-int8), 0 when by fp32",
    ["adapter", "version"],
    multiprocess_mode="mostrecent",
)
INT8_ACCURACY_DELTA = Gauge(
    "adaptserve_int8_accuracy_delta",
    "Top-1 accuracy of the int8 model minus fp32, measured on labelled holdout images when it was built",
    ["adapter", "version"],
    multiprocess_mode="mostrecent",
)
DEGRADED = Gauge(
    "adaptserve_adapter_degraded",
    "1 while the adapter's champion cannot be loaded by this worker (it serves an earlier champion, or nothing)",
    ["adapter"],
    multiprocess_mode="max",
)
CHAMPION = Gauge(
    "adaptserve_champion_version", "Champion version per adapter", ["adapter"], multiprocess_mode="mostrecent"
)


def record_swap(adapter: str, version: int | None, seconds: float) -> None:
    SWAPS.labels(adapter=adapter).inc()
    SWAP_LATENCY.observe(seconds)
    CHAMPION.labels(adapter=adapter).set(-1 if version is None else version)


def observe_request(key: tuple[str, int], seconds: float, labels: list[str]) -> None:
    adapter, version = key[0], str(key[1])
    REQUESTS.labels(adapter=adapter, version=version, status="ok").inc()
    LATENCY.labels(adapter=adapter, version=version).observe(seconds)
    for label in labels:
        PREDICTIONS.labels(adapter=adapter, version=version, label=label).inc()
RETRAIN_JOBS = Gauge(
    "adaptserve_retrain_jobs",
    "Retrain jobs by adapter, trigger (manual/schedule/drift) and state (queued/running/succeeded/rejected/failed)",
    ["adapter", "trigger", "state"],
    multiprocess_mode="mostrecent",
)


def record_precision(key: tuple[str, int], served: dict | None) -> None:
    """What the engine serves `key` with (OnnxEngine.served); nothing for engines without precisions."""
    if not served:
        return
    adapter, version = key[0], str(key[1])
    SERVED_INT8.labels(adapter=adapter, version=version).set(1 if served["precision"] == "int8" else 0)
    if served.get("int8"):
        INT8_ACCURACY_DELTA.labels(adapter=adapter, version=version).set(served["int8"]["delta"])
