"""Human-readable drift reports with Evidently (0.7 API): an HTML file per check plus a workspace history.

write_report compares a window of captured traffic with an adapter version's reference set:

* DataDriftPreset over the image statistics (STAT_NAMES), confidence, entropy and the predicted class
  (categorical), with Evidently's default per-column tests (K-S / chi-square up to 1000 reference rows,
  Wasserstein / Jensen-Shannon distances above);
* EmbeddingsDrift (evidently.metrics, the 0.7 wrapper of the legacy EmbeddingsDriftMetric) on the embeddings
  reduced to n_components principal axes of the reference, with the classifier method ("model": ROC AUC of an
  SGD classifier telling reference from current on a held-out half; drift when the AUC exceeds the 95th
  percentile of random AUCs, which Evidently's bootstrap estimates with 100 roc_auc_score calls and
  _auc_threshold computes in closed form).

The run is saved as a self-contained HTML file (atomically) and, given a workspace directory, added as a
snapshot to one Evidently project per adapter, created on first use with drift panels, so that
`evidently ui --workspace $ADAPTSERVE_HOME/evidently` shows the history.

Speed: Evidently is for humans, not for the alarm (monitoring.detectors does that in milliseconds). Two things
keep a 1000-row report in seconds: the embeddings are reduced before Evidently sees them (512 raw columns cost
~37 s), and the t-SNE picture that EmbeddingsDrift always draws is limited to embedding_plot_points rows per side
and one OpenMP thread. Evidently's t-SNE sample size is a module constant (SAMPLE_CONSTANT = 2500 per side, which
costs 15-30 s on two cores); it is lowered for the duration of a report under a lock and restored after. The drift
score itself always uses every row. Reports in one process run one at a time (they are CPU-bound anyway).
Evidently is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from models import locks
from models.paths import home
from monitoring.detectors import ReferenceSet
from monitoring.image_stats import STAT_NAMES

EMBEDDING_NAME = "embedding"
CLASS_COLUMN = "predicted_class"
NUMERIC_COLUMNS: tuple[str, ...] = (*STAT_NAMES, "confidence", "entropy")
MONITORED_COLUMNS: tuple[str, ...] = (*NUMERIC_COLUMNS, CLASS_COLUMN)
_PCA_FIT_ROWS = 2000  # more reference rows barely move the top axes; the SVD cost grows with them
_report_lock = threading.Lock()  # serialises the SAMPLE_CONSTANT patch (and CPU-heavy reports)
_project_lock = threading.Lock()


def default_workspace() -> Path:
    """$ADAPTSERVE_HOME/evidently: the directory to pass to `evidently ui --workspace`."""
    return home() / "evidently"


def _component_names(k: int) -> list[str]:
    return [f"pc_{i:02d}" for i in range(k)]


def _frames(
    reference: ReferenceSet, current: ReferenceSet, n_components: int, seed: int
) -> tuple[Any, Any, list[str]]:
    """Reference and current DataFrames: monitored columns plus the embeddings on the reference's PCA axes."""
    import pandas as pd  # heavy (~0.5 s); only a report needs it

    for name, rs in (("reference", reference), ("current", current)):
        if len(rs) < 2 or rs.embeddings.ndim != 2 or rs.embeddings.shape[1] == 0:
            raise ValueError(f"{name} has {len(rs)} records (embeddings {rs.embeddings.shape}); a report needs at "
                             "least 2 records with embeddings on each side.")
        if rs.stat_names != STAT_NAMES:
            raise ValueError(f"{name} records the statistics {rs.stat_names}, expected {STAT_NAMES}.")
    if reference.embeddings.shape[1] != current.embeddings.shape[1]:
        raise ValueError(f"reference embeddings have {reference.embeddings.shape[1]} dims, current "
                         f"{current.embeddings.shape[1]}; compare records of the same model version.")
    reduce = _pca_projection(reference.embeddings, n_components, seed)
    frames = []
    for rs in (reference, current):
        reduced = reduce(rs.embeddings)
        columns: dict[str, Any] = {name: rs.stats[:, i] for i, name in enumerate(STAT_NAMES)}
        columns["confidence"] = rs.confidence
        columns["entropy"] = rs.entropy
        columns[CLASS_COLUMN] = rs.classes.astype(str)
        components = _component_names(reduced.shape[1])
        columns.update({name: reduced[:, i].astype(np.float64) for i, name in enumerate(components)})
        frames.append(pd.DataFrame(columns))
    return frames[0], frames[1], components


def _pca_projection(reference: np.ndarray, n_components: int, seed: int) -> Any:
    """x -> (x - mean) @ axes.T onto the top principal axes of (at most 2000 rows of) the reference embeddings.

    Randomized SVD (Halko et al.) finds 16 axes of a 1000 x 512 matrix in ~30 ms; the full SVD that
    EmbeddingReducer does takes ~1.5 s on two busy cores, and the report only needs the leading axes.
    """
    from sklearn.utils.extmath import randomized_svd  # heavy (scipy); only a report needs it

    fit = np.asarray(reference, dtype=np.float32)
    if len(fit) > _PCA_FIT_ROWS:
        fit = fit[np.sort(np.random.default_rng(seed).choice(len(fit), _PCA_FIT_ROWS, replace=False))]
    mean = fit.mean(axis=0)
    k = max(1, min(n_components, len(fit) - 1, fit.shape[1]))
    _, _, axes = randomized_svd(fit - mean, k, random_state=seed)
    axes = np.ascontiguousarray(axes, dtype=np.float32)
    return lambda x: (np.asarray(x, dtype=np.float32) - mean) @ axes.T


def _auc_threshold(n_reference: int, n_current: int, quantile_z: float = 1.6448536269514722) -> float:
    """95th percentile of the ROC AUC of random scores on the classifier's held-out half (normal approximation).

    That is what Evidently's ModelDriftMethod(bootstrap=True) estimates with 100 roc_auc_score calls (~0.5 s);
    the Mann-Whitney null gives it directly: AUC ~ N(1/2, (n1 + n2 + 1) / (12 n1 n2)), n1, n2 ~ half of each side.
    """
    n1, n2 = max(n_reference / 2, 1.0), max(n_current / 2, 1.0)
    return 0.5 + quantile_z * float(np.sqrt((n1 + n2 + 1) / (12 * n1 * n2)))


@contextlib.contextmanager
def _fast_embedding_plot(points: int) -> Iterator[None]:
    """Limit EmbeddingsDrift's t-SNE picture to `points` rows per side, computed on one OpenMP thread.

    OpenMP thread limits are per calling thread, so serving threads keep theirs; BLAS pools are left alone.
    """
    from evidently.legacy.metrics.data_drift import embeddings_drift  # heavy (seconds); lazy, see the docstring

    with _report_lock:
        saved = embeddings_drift.SAMPLE_CONSTANT
        embeddings_drift.SAMPLE_CONSTANT = points
        try:
            with threadpool_limits(limits=1, user_api="openmp"):
                yield
        finally:
            embeddings_drift.SAMPLE_CONSTANT = saved


def _write_html_atomically(snapshot: Any, out_html: Path) -> None:
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_name(f".{out_html.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        snapshot.save_html(str(tmp))
        os.replace(tmp, out_html)
    finally:
        tmp.unlink(missing_ok=True)


def _add_drift_panels(workspace: Any, project_id: Any) -> None:
    """The project's dashboard, one "Drift" tab: drifted share, embedding drift score, per-column drift scores.

    Saved as one DashboardModel: ProjectDashboard.add_panel in evidently 0.7.23 lists a panel twice in an
    existing tab (it appends the id in its search loop and again after it).
    """
    # heavy (seconds); lazy, see the module docstring
    from evidently.sdk.models import DashboardModel, DashboardTabModel, PanelMetric
    from evidently.sdk.panels import counter_panel, line_plot_panel

    panels = [
        counter_panel("Drifted columns (last report)", [PanelMetric(
            legend="drifted columns", metric="DriftedColumnsCount", metric_labels={"value_type": "count"})],
            size="half"),
        line_plot_panel("Share of drifted columns", [PanelMetric(
            legend="share", metric="DriftedColumnsCount", metric_labels={"value_type": "share"})],
            description="image statistics, confidence, entropy and predicted class", size="half"),
        line_plot_panel("Embedding drift (ROC AUC of a reference-vs-current classifier; 0.5 = no drift)", [PanelMetric(
            legend="embedding", metric="EmbeddingsDrift", metric_labels={"embeddings_name": EMBEDDING_NAME})],
            size="full"),
    ]
    for title, columns in (("Image statistics drift score", STAT_NAMES),
                           ("Model output drift score", ("confidence", "entropy", CLASS_COLUMN))):
        panels.append(line_plot_panel(
            title, [PanelMetric(legend=c, metric="ValueDrift", metric_labels={"column": c}) for c in columns],
            description="p-value (K-S / chi-square / Z-test: small = drift) or distance (Wasserstein / "
                        "Jensen-Shannon: large = drift), as Evidently chooses for the sample size", size="half"))
    tab = DashboardTabModel(title="Drift", panels=[p.id for p in panels])
    workspace.save_dashboard(project_id, DashboardModel(tabs=[tab], panels=panels))


@contextlib.contextmanager
def _workspace_lock(workspace_dir: Path) -> Iterator[None]:
    """Across threads and processes: only one creates a given project."""
    workspace_dir.mkdir(parents=True, exist_ok=True)
    with locks.locked(workspace_dir / ".adaptserve.lock", thread_lock=_project_lock):
        yield


def _project(workspace: Any, workspace_dir: Path, name: str) -> Any:
    """The workspace's project called `name`, created (with drift panels) on first use."""
    with _workspace_lock(workspace_dir):
        found = workspace.search_project(name)
        if found:
            return found[0]
        project = workspace.create_project(name, description=f"adaptserve drift reports for adapter {name!r}")
        _add_drift_panels(workspace, project.id)
        return project


def _add_to_workspace(snapshot: Any, workspace_dir: Path, project: str, keep_runs: int | None) -> dict[str, str]:
    """Add the run to the project's history (pruned to keep_runs); its workspace, project_id and snapshot_id."""
    from evidently.ui.workspace import Workspace  # heavy; lazy, see the module docstring

    workspace = Workspace(str(workspace_dir))
    proj = _project(workspace, workspace_dir, project)
    ref = workspace.add_run(proj.id, snapshot, include_data=False)
    if keep_runs is not None:
        runs = sorted(workspace.list_runs(proj.id), key=str)  # uuid7 ids sort by creation time
        for old in runs[: max(len(runs) - max(keep_runs, 1), 0)]:
            workspace.delete_run(proj.id, old)
    return {"workspace": str(workspace_dir), "project_id": str(proj.id), "snapshot_id": str(ref.id)}


def _summary_from_snapshot(snapshot: Any) -> dict[str, Any]:
    """Drifted-column count/share and per-column outcomes from the snapshot's public dict (metrics + tests)."""
    data = snapshot.dict()
    out: dict[str, Any] = {"drifted_columns": 0, "share_drifted": 0.0, "columns": {}, "embedding_drift_score": None}
    for metric in data["metrics"]:
        kind = metric["config"]["type"].rsplit(":", 1)[-1]
        if kind == "DriftedColumnsCount":
            out["drifted_columns"] = int(metric["value"]["count"])
            out["share_drifted"] = float(metric["value"]["share"])
        elif kind == "ValueDrift":
            cfg = metric["config"]
            out["columns"][cfg["column"]] = {"score": float(metric["value"]), "method": cfg.get("method"),
                                             "threshold": cfg.get("threshold"), "drifted": None}
        elif kind == "EmbeddingsDrift":
            out["embedding_drift_score"] = float(metric["value"])
    for test in data.get("tests", []):
        column = test.get("metric_config", {}).get("params", {}).get("column")
        if column in out["columns"] and test.get("status") in ("SUCCESS", "FAIL"):
            out["columns"][column]["drifted"] = test["status"] == "FAIL"
    return out


def write_report(
    reference: ReferenceSet,
    current: ReferenceSet,
    out_html: str | Path,
    *,
    workspace_dir: str | Path | None,
    project: str,
    n_components: int = 16,
    embedding_plot_points: int = 200,
    drift_share: float = 0.5,
    metadata: dict[str, str] | None = None,
    tags: list[str] | None = None,
    timestamp: datetime | None = None,
    keep_runs: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evidently drift report of `current` against `reference`: HTML at out_html, snapshot in the workspace.

    project names the workspace project (one per adapter; created on first use, reused after). metadata/tags
    (e.g. {"adapter": ..., "version": ...}) are stored on the snapshot. keep_runs bounds the project's history
    (a snapshot is ~0.7 MB; the oldest beyond keep_runs are deleted; None keeps all).

    Returns a summary: drifted_columns and share_drifted over MONITORED_COLUMNS, dataset_drift (share >=
    drift_share), per-column scores and outcomes, the embedding drift score, threshold and decision, paths,
    project_id, snapshot_id and seconds taken. The embedding threshold depends on the window size, so the
    dashboard draws one embedding series per window size.
    """
    start = time.perf_counter()
    # heavy (seconds on first use; counted in "seconds"); lazy, see the module docstring
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import ModelDriftMethod
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    out_html = Path(out_html)
    ref_df, cur_df, components = _frames(reference, current, n_components, seed)
    definition = DataDefinition(numerical_columns=list(NUMERIC_COLUMNS), categorical_columns=[CLASS_COLUMN],
                                embeddings={EMBEDDING_NAME: components})
    method = ModelDriftMethod(bootstrap=False, threshold=_auc_threshold(len(reference), len(current)))
    report = Report(
        [DataDriftPreset(columns=list(MONITORED_COLUMNS), drift_share=drift_share),
         EmbeddingsDrift(embeddings_name=EMBEDDING_NAME, drift_method=method)],
        metadata=dict(metadata or {}), tags=list(tags or []), include_tests=True)
    # errstate: constant columns (e.g. every image 224 wide) make Evidently's plots divide 0 by 0, harmlessly
    with _fast_embedding_plot(embedding_plot_points), np.errstate(divide="ignore", invalid="ignore"):
        snapshot = report.run(Dataset.from_pandas(cur_df, data_definition=definition),
                              Dataset.from_pandas(ref_df, data_definition=definition),
                              timestamp=timestamp, name=out_html.stem)
    _write_html_atomically(snapshot, out_html)

    summary = _summary_from_snapshot(snapshot)
    auc = summary["embedding_drift_score"]
    summary.update({
        "dataset_drift": summary["share_drifted"] >= drift_share,
        # the 0.7 snapshot keeps the score but not the decision; the threshold is the method's own
        "embedding_drift": auc is not None and auc > method.threshold,
        "embedding_drift_threshold": method.threshold,
        "embedding_components": len(components),
        "n_reference": len(reference),
        "n_current": len(current),
        "html": str(out_html),
        "workspace": None,
        "project_id": None,
        "snapshot_id": None,
    })
    if workspace_dir is not None:
        summary.update(_add_to_workspace(snapshot, Path(workspace_dir), project, keep_runs))
    summary["seconds"] = time.perf_counter() - start
    return summary


def prune_reports(directory: str | Path, keep: int, pattern: str = "*.html") -> int:
    """Delete all but the `keep` newest files matching pattern in directory (an HTML report is ~4 MB: the
    Evidently UI bundle is inlined so that it opens offline). Returns how many were deleted."""
    files = sorted(Path(directory).glob(pattern), key=lambda f: (f.stat().st_mtime, f.name))
    stale = files[: max(len(files) - max(keep, 0), 0)]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def time_report(n: int = 1000, d: int = 512, n_components: int = 16, seed: int = 0, workspace: bool = False) -> float:
    """Seconds for one write_report on an n x d reference and an n x d window (Evidently already imported);
    workspace=True also adds the snapshot to a fresh workspace (creating the project)."""
    rng = np.random.default_rng(seed)

    def records(shift: float) -> ReferenceSet:
        probs = rng.dirichlet(np.full(10, 0.3), n)
        stats = rng.random((n, len(STAT_NAMES))) + shift
        return ReferenceSet(rng.normal(size=(n, d)) + shift, stats, probs.max(axis=1), rng.random(n), probs.argmax(1))

    reference, current = records(0.0), records(0.1)
    import evidently  # noqa: F401  (import time is not report time)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_report(reference, current, Path(tmp) / "report.html", project="timing", n_components=n_components,
                     workspace_dir=Path(tmp) / "workspace" if workspace else None)
        return time.perf_counter() - start
