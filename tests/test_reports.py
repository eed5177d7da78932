"""Evidently drift reports: HTML output, one workspace project per adapter with a snapshot per report, offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitoring.detectors import ReferenceSet
from monitoring.image_stats import STAT_NAMES
from monitoring.reports import (
    MONITORED_COLUMNS,
    _auc_threshold,
    _project,
    default_workspace,
    prune_reports,
    write_report,
)

# importing Evidently's workspace pulls in litestar and legacy modules that emit their own DeprecationWarnings
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, DIM = 200, 64


def _records(rng: np.random.Generator) -> ReferenceSet:
    classes = rng.integers(0, 5, N)
    centres = np.random.default_rng(99).normal(size=(5, DIM)) * 2
    probs = rng.dirichlet(np.full(5, 0.5), N)
    stats = np.column_stack([rng.beta(5, 5, N), rng.beta(4, 8, N), rng.gamma(2.0, 0.01, N), rng.gamma(2.0, 0.05, N),
                             np.full(N, 224.0), np.full(N, 224.0)])  # constant sizes must not break anything
    return ReferenceSet(centres[classes] + rng.normal(size=(N, DIM)), stats, probs.max(axis=1),
                        rng.random(N), classes)


def _brighter(rs: ReferenceSet, delta: float) -> ReferenceSet:
    stats = rs.stats.copy()
    stats[:, STAT_NAMES.index("brightness")] += delta
    return ReferenceSet(rs.embeddings, stats, rs.confidence, rs.entropy, rs.classes)


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"write_report tried to open a network connection: {args}")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A clean and a brightness-shifted report into one workspace project, with the network disabled."""
    out = tmp_path_factory.mktemp("reports")
    reference, current = _records(np.random.default_rng(0)), _records(np.random.default_rng(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        clean = write_report(reference, current, out / "clean.html", workspace_dir=out / "ws", project="adA",
                             metadata={"adapter": "adA", "version": "1"})
        # the same window with brighter images: only the brightness column changes
        shifted = write_report(reference, _brighter(current, 0.15), out / "shifted.html", workspace_dir=out / "ws",
                               project="adA", metadata={"adapter": "adA", "version": "1"})
        from evidently.ui.workspace import Workspace

        runs_after_two = [str(r) for r in Workspace(str(out / "ws")).list_runs(clean["project_id"])]
        third = write_report(reference, current, out / "third.html", workspace_dir=out / "ws", project="adA",
                             keep_runs=2)
    return {"dir": out, "clean": clean, "shifted": shifted, "third": third, "runs_after_two": runs_after_two}


def test_shifted_brightness_drifts_more_than_clean(reports: dict[str, Any]) -> None:
    clean, shifted = reports["clean"], reports["shifted"]
    assert set(clean["columns"]) == set(MONITORED_COLUMNS)
    assert clean["drifted_columns"] < shifted["drifted_columns"]
    assert not clean["columns"]["brightness"]["drifted"] and shifted["columns"]["brightness"]["drifted"]
    assert clean["drifted_columns"] <= 2 and not clean["dataset_drift"]
    # the embeddings are the same in both windows: same score, and no embedding drift between clean samples
    assert clean["embedding_drift_score"] == pytest.approx(shifted["embedding_drift_score"])
    assert not clean["embedding_drift"] and clean["embedding_components"] == 16


def test_html_written_atomically(reports: dict[str, Any]) -> None:
    for name in ("clean", "shifted", "third"):
        html = Path(reports[name]["html"])
        assert html.exists() and html.stat().st_size > 100_000  # the UI bundle is inlined: viewable offline
        text = html.read_text(encoding="utf-8")
        assert "<html" in text.lower() and "brightness" in text
    assert not list(reports["dir"].glob(".*.tmp"))


def test_workspace_project_reused_with_two_snapshots(reports: dict[str, Any]) -> None:
    from evidently.ui.workspace import Workspace

    clean, shifted = reports["clean"], reports["shifted"]
    assert clean["project_id"] == shifted["project_id"] and clean["snapshot_id"] != shifted["snapshot_id"]
    assert sorted(reports["runs_after_two"]) == sorted([clean["snapshot_id"], shifted["snapshot_id"]])
    workspace = Workspace(str(reports["dir"] / "ws"))
    projects = workspace.list_projects()
    assert [p.name for p in projects] == ["adA"] and str(projects[0].id) == clean["project_id"]
    # the third report ran with keep_runs=2: the oldest snapshot made room for it
    runs = sorted(str(r) for r in workspace.list_runs(projects[0].id))
    assert runs == sorted([shifted["snapshot_id"], reports["third"]["snapshot_id"]])
    dashboard = workspace.get_dashboard(projects[0].id)
    metrics = {value.metric for panel in dashboard.panels for value in panel.values}
    assert {"evidently:metric_v2:DriftedColumnsCount", "evidently:metric_v2:EmbeddingsDrift"} <= metrics
    assert len(dashboard.panels) == 5  # created once, not again for the second report
    assert [tab.title for tab in dashboard.tabs] == ["Drift"]
    assert dashboard.tabs[0].panels == [panel.id for panel in dashboard.panels]  # each panel listed once


def test_one_project_per_adapter(tmp_path: Path) -> None:
    from evidently.ui.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    a = _project(workspace, tmp_path / "ws", "adA")
    b = _project(workspace, tmp_path / "ws", "adB")
    assert a.id != b.id and _project(workspace, tmp_path / "ws", "adB").id == b.id
    assert sorted(p.name for p in workspace.list_projects()) == ["adA", "adB"]


def test_prune_reports_keeps_the_newest(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"r{i}.html").write_text("x")
        os.utime(tmp_path / f"r{i}.html", (1000 + i, 1000 + i))
    (tmp_path / "notes.txt").write_text("kept")
    assert prune_reports(tmp_path, keep=2) == 3
    assert sorted(f.name for f in tmp_path.iterdir()) == ["notes.txt", "r3.html", "r4.html"]


def test_default_workspace_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAPTSERVE_HOME", str(tmp_path / "state"))
    assert default_workspace() == (tmp_path / "state" / "evidently").resolve()


def test_auc_threshold_matches_random_auc_quantile() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(100), np.zeros(100)]
    aucs = [roc_auc_score(labels, rng.random(200)) for _ in range(2000)]
    assert _auc_threshold(200, 200) == pytest.approx(np.quantile(aucs, 0.95), abs=0.01)


def test_rejects_mismatched_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = _records(rng)
    other = ReferenceSet(rng.normal(size=(N, 8)), reference.stats, reference.confidence, reference.entropy,
                         reference.classes)
    with pytest.raises(ValueError, match="same model version"):
        write_report(reference, other, tmp_path / "x.html", workspace_dir=None, project="p")


GRAFANA_METRICS = (
    "adaptserve_drift_score", "adaptserve_drift_flag", "adaptserve_drift_checks_total", "adaptserve_predictions_total",
    "adaptserve_mean_confidence", "adaptserve_estimated_accuracy", "adaptserve_request_latency_seconds_bucket",
    "adaptserve_requests_total",
    "adaptserve_champion_version", "adaptserve_swaps_total", "adaptserve_retrain_jobs_total",
)


def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [q for p in panels for q in (p, *_all_panels(p.get("panels", [])))]  # rows may nest panels


def test_grafana_dashboard_covers_the_service_metrics() -> None:
    import json
    import re

    path = Path(__file__).resolve().parents[1] / "monitoring" / "grafana" / "adaptserve.json"
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["adapter"]["multi"]
    panels = _all_panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"adaptserve_[a-z_]+", e)}
    assert set(GRAFANA_METRICS) <= used, f"no panel shows {sorted(set(GRAFANA_METRICS) - used)}"
    assert used <= set(GRAFANA_METRICS), f"unknown metric names {sorted(used - set(GRAFANA_METRICS))}"
    assert all('adapter=~"$adapter"' in e for e in exprs)  # every query follows the adapter selector
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
    cells = set()  # panels must not overlap on the 24-column grid
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
