"""What GET /dashboard shows, gathered from the registry, the drift monitor and the job store.

One dict (monitoring.dashboard's documented shape); /dashboard renders it, /dashboard/data returns it as JSON
for the page's live refresh.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pipelines.label_db import measured_accuracy

log = logging.getLogger("adaptserve")


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return str(value)


def _versions(info) -> list[dict]:
    out = []
    for v in info.versions:
        meta = v.meta
        target = meta.scores("target_test")
        out.append(
            {
                "version": v.version,
                "champion": v.version == info.champion,
                "created_at": v.created_at,
                "strategy": meta.strategy,
                "metrics": {k: target[k] for k in ("accuracy", "f1") if k in target},
            }
        )
    return out


def _events(svc, name: str, history: list[dict]) -> list[dict]:
    events = []
    for p in svc.rt.registry.history(name):
        events.append({"at": p.promoted_at, "kind": p.action, "text": f"{p.action} to v{p.version}"})
    was = False
    for check in history:  # a drift event where the flag goes up, not on every alarming check
        if check.get("drift") and not was:
            events.append({"at": _iso(check["checked_at"]), "kind": "drift", "text": f"drift on v{check['version']}"})
        was = bool(check.get("drift"))
    for job in svc.jobs.list(adapter=name, limit=50):
        d = job.to_dict()
        kind = {"rejected": "rejected", "failed": "failed"}.get(d["state"], "job")
        text = f"job {d['id'][:8]} ({d['trigger']}): {d['state']}"
        events.append({"at": d.get("finished_at") or d.get("created_at"), "kind": kind, "text": text})
    return sorted(events, key=lambda e: str(e["at"]))


def _adapter(svc, info) -> dict:
    monitor = svc.rt.monitor
    history = monitor.history(info.name, limit=500) if monitor else []  # bounded: the page draws every point
    summary = monitor.summary(info.name) if monitor else {}
    latest = monitor.latest(info.name) if monitor else None
    report = monitor.report_path(info.name) if monitor else None
    return {
        "name": info.name,
        "champion": info.champion,
        "serving_version": svc.rt.champions.get(info.name),
        "status": latest,
        "measured_accuracy": measured_accuracy(svc.labels.database, info.name, latest["version"]) if latest else None,
        "history": [
            {k: c.get(k) for k in ("checked_at", "version", "score", "threshold", "drift")} for c in history
        ],
        "confidence_hist": summary.get("confidence_histogram"),
        "class_counts": summary.get("class_counts"),
        "records": summary.get("window_size"),
        "min_window": monitor.cfg.min_records if monitor else None,
        "versions": _versions(info),
        "events": _events(svc, info.name, history),
        "reports": [{"at": latest.get("checked_at") if latest else None, "url": f"/drift/report?adapter={info.name}"}]
        if report
        else [],
    }


def dashboard_data(svc) -> dict:
    adapters = []
    for info in svc.rt.registry.list_adapters():
        try:
            adapters.append(_adapter(svc, info))
        except Exception as err:  # one adapter's broken state must not blank the whole page
            log.exception("dashboard data for %s failed", info.name)
            adapters.append({"name": info.name, "champion": info.champion, "error": str(err)})
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": svc.rt.base_id,
        "engine": svc.rt.engine.name,
        "adapters": adapters,
    }
