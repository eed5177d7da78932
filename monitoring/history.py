"""The drift-check history: every check's result in the drift_checks table of the state database
(monitoring.tables), written by the monitor and read by anyone (the service's routes, the retrain job runner in
another process, any replica on the same ADAPTSERVE_DATABASE_URL) without the registry, torch or Prometheus."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from models.db import redact
from models.legacy import read_rows, retire
from models.state import open_state
from monitoring.tables import HISTORY_LOCK, drift_checks

log = logging.getLogger(__name__)

LEGACY_FILE = "monitor.db"  # where a home kept its checks before the state database
_T = drift_checks
_FIELDS = ("adapter", "version", "checked_at", "drift", "score", "threshold", "p_value", "window_size", "features",
           "report", "mean_confidence")
_COLUMNS = (*(_T.c[name] for name in _FIELDS), _T.c.estimate)  # estimate: not in a legacy monitor.db


def iso_utc(epoch: float) -> str:
    """A check's time as results carry it: ISO 8601 in UTC, milliseconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _row_to_result(row: Sequence[Any]) -> dict[str, Any]:
    adapter, version, checked_at, drift, score, threshold, p_value, window_size, features, report, mean_conf, est = row
    estimate = None if est is None else json.loads(est)
    return {
        "adapter": adapter, "version": int(version), "drift": bool(drift), "score": float(score),
        "threshold": float(threshold), "p_value": float(p_value), "window_size": int(window_size),
        "checked_at": iso_utc(checked_at), "features": json.loads(features), "report": report,
        "mean_confidence": None if mean_conf is None else float(mean_conf),
        "estimated_accuracy": None if estimate is None else estimate["estimated_accuracy"],
        "accuracy_estimate": estimate,
    }


class DriftHistory:
    """Drift checks in the home's state database (models.state.open_state): the monitor writes, anyone reads, from
    any process.

    Results are dicts in the /drift response shape: adapter, version, drift, score, threshold, p_value,
    window_size, checked_at (ISO 8601, UTC), features, report (HTML path or None) and mean_confidence.
    Check ids grow with time (writers take HISTORY_LOCK one at a time), so "latest" is the highest id of an adapter.
    Writes are non-durable (models.db `durable=False`): a kill -9 loses nothing committed, a power loss may lose the
    last checks. Opening imports a legacy `<home>/monitor.db` once.
    """

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.database = open_state(self.home)
        self._closed = False
        self._import_legacy()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self._check_open()
        with self.database.write(lock=HISTORY_LOCK, durable=False) as conn:
            yield conn

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"DriftHistory({self.home}) is closed; open a new one.")

    def _import_legacy(self) -> None:
        """Copy `<home>/monitor.db` in once (new ids, in the old id order), then rename it. A check whose adapter and
        time are already there (an earlier, interrupted import) is not copied again."""
        path = self.home / LEGACY_FILE
        if not path.is_file():
            return
        with self._write() as conn:
            rows = read_rows(path, "drift_checks", _FIELDS, "id")
            if rows is None:  # another process imported it while this one waited for the lock
                return
            present = set(conn.execute(select(_T.c.adapter, _T.c.checked_at).where(
                _T.c.adapter.in_({r["adapter"] for r in rows}))).all())
            new = [row | {"drift": bool(row["drift"])} for row in rows
                   if (row["adapter"], row["checked_at"]) not in present]
            if new:
                conn.execute(insert(_T), new)
        log.info("drift history: imported %d of %d checks from %s into %s; the file is now %s", len(new), len(rows),
                 path, redact(self.database.url), retire(path))

    def add(self, result: dict[str, Any], checked_at: float) -> tuple[int, int]:
        """Store one check; returns (its id, how many checks the adapter now has, this one included)."""
        values = (result["adapter"], int(result["version"]), float(checked_at), bool(result["drift"]),
                  float(result["score"]), float(result["threshold"]), float(result["p_value"]),
                  int(result["window_size"]), json.dumps(result["features"]), result.get("report"),
                  result.get("mean_confidence"))
        with self._write() as conn:
            estimate = result.get("accuracy_estimate")
            row = dict(zip(_FIELDS, values, strict=True)) | {"estimate": None if estimate is None else
                                                             json.dumps(estimate, sort_keys=True)}
            check_id = conn.execute(insert(_T).values(row)
                                    .returning(_T.c.id)).scalar_one()
            count = conn.execute(select(func.count()).where(_T.c.adapter == result["adapter"])).scalar_one()
        return int(check_id), int(count)

    def set_report(self, check_id: int, report: str, digest: str | None = None) -> None:
        """The check's report: its path under the home that wrote it, and its object in the artifact store."""
        with self._write() as conn:
            conn.execute(update(_T).where(_T.c.id == check_id).values(report=report, report_sha256=digest))

    def _rows(self, query: Any) -> list[Sequence[Any]]:
        self._check_open()
        with self.database.read() as conn:
            return list(conn.execute(query).all())

    def latest(self, adapter: str) -> dict[str, Any] | None:
        rows = self._rows(select(*_COLUMNS).where(_T.c.adapter == adapter).order_by(_T.c.id.desc()).limit(1))
        return _row_to_result(rows[0]) if rows else None

    def history(self, adapter: str, limit: int = 200) -> list[dict[str, Any]]:
        """The adapter's latest `limit` checks, oldest first."""
        rows = self._rows(select(*_COLUMNS).where(_T.c.adapter == adapter).order_by(_T.c.id.desc())
                          .limit(max(int(limit), 0)))
        return [_row_to_result(r) for r in reversed(rows)]

    def latest_report(self, adapter: str) -> str | None:
        found = self.latest_report_object(adapter)
        return found[0] if found else None

    def latest_report_object(self, adapter: str) -> tuple[str, str | None] | None:
        """(path under the home that wrote it, sha256 of its object in the artifact store or None) of the adapter's
        latest report."""
        rows = self._rows(select(_T.c.report, _T.c.report_sha256)
                          .where(_T.c.adapter == adapter, _T.c.report.is_not(None)).order_by(_T.c.id.desc()).limit(1))
        return (rows[0][0], rows[0][1]) if rows else None

    def adapters(self) -> list[str]:
        return [r[0] for r in self._rows(select(_T.c.adapter).distinct().order_by(_T.c.adapter))]

    def close(self) -> None:
        """Refuse further use; the state database itself stays open for the process's other stores."""
        self._closed = True
