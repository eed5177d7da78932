"""The drift-check history: every check's result in SQLite (`<home>/monitor.db`), written by the monitor and read
by anyone (the service's routes, the retrain job runner in another process) without the registry, torch or
Prometheus."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.sqlite import transaction

_SCHEMA = """
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
_COLUMNS = ("adapter, version, checked_at, drift, score, threshold, p_value, window_size, features, report, "
            "mean_confidence")


def iso_utc(epoch: float) -> str:
    """A check's time as results carry it: ISO 8601 in UTC, milliseconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _row_to_result(row: Sequence[Any]) -> dict[str, Any]:
    adapter, version, checked_at, drift, score, threshold, p_value, window_size, features, report, mean_conf = row
    return {
        "adapter": adapter, "version": int(version), "drift": bool(drift), "score": float(score),
        "threshold": float(threshold), "p_value": float(p_value), "window_size": int(window_size),
        "checked_at": iso_utc(checked_at), "features": json.loads(features), "report": report,
        "mean_confidence": None if mean_conf is None else float(mean_conf),
    }


class DriftHistory:
    """Drift checks in SQLite (`<home>/monitor.db`, WAL): the monitor writes, anyone reads, from any process.

    Results are dicts in the /drift response shape: adapter, version, drift, score, threshold, p_value,
    window_size, checked_at (ISO 8601, UTC), features, report (HTML path or None) and mean_confidence.
    Check ids grow with time, so "latest" is the highest id of an adapter.
    """

    def __init__(self, home: str | Path, timeout_s: float = 30.0) -> None:
        self.path = Path(home) / "monitor.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)

    def add(self, result: dict[str, Any], checked_at: float) -> tuple[int, int]:
        """Store one check; returns (its id, how many checks the adapter now has, this one included)."""
        row = (result["adapter"], int(result["version"]), float(checked_at), int(bool(result["drift"])),
               float(result["score"]), float(result["threshold"]), float(result["p_value"]),
               int(result["window_size"]), json.dumps(result["features"]), result.get("report"),
               result.get("mean_confidence"))
        with self._lock, transaction(self._conn) as conn:
            cur = conn.execute(f"INSERT INTO drift_checks ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
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
        rows = self._rows(f"SELECT {_COLUMNS} FROM drift_checks WHERE adapter = ? ORDER BY id DESC LIMIT 1",
                          (adapter,))
        return _row_to_result(rows[0]) if rows else None

    def history(self, adapter: str, limit: int = 200) -> list[dict[str, Any]]:
        """The adapter's latest `limit` checks, oldest first."""
        rows = self._rows(f"SELECT {_COLUMNS} FROM drift_checks WHERE adapter = ? ORDER BY id DESC LIMIT ?",
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
