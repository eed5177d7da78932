"""Label requests: the selection (margin sampling, then k-center greedy) and the query behind GET /labels/requests
(captured, input kept, not labelled yet) on SQLite and PostgreSQL. The route over HTTP is in test_serve_process.py."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monitoring.capture import CaptureStore, make_records, top2_margin
from monitoring.image_stats import STAT_NAMES
from monitoring.selection import k_center_greedy, select
from pipelines.labels import LabelStore
from service.inputs import InputCache
from service.label_requests import label_requests

CLASSES = [f"c{i}" for i in range(4)]


def _cluster_points(rng: np.random.Generator, centers: list[np.ndarray], per: int) -> np.ndarray:
    return np.concatenate([c + rng.normal(scale=0.01, size=(per, len(c))) for c in centers])


def test_top2_margin() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(top2_margin(probs), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(top2_margin(np.array([[1.0]])), [1.0])


def test_selection_takes_uncertain_candidates_from_different_regions() -> None:
    rng = np.random.default_rng(0)
    axes = [np.eye(8)[i] * 5 for i in range(4)]
    x = _cluster_points(rng, axes, 10)  # 4 regions of 10 candidates each
    margins = np.concatenate([rng.uniform(0.0, 0.2, 30), rng.uniform(0.8, 1.0, 10)])  # the 4th region is confident
    chosen = select(x, margins, n=3, pool_factor=10)
    regions = sorted(int(i) // 10 for i in chosen.indices)
    assert regions == [0, 1, 2], "one request per uncertain region, none from the confident one"
    assert chosen.indices[0] == int(np.argmin(margins)), "nothing labelled: the most uncertain comes first"
    assert np.isinf(chosen.distances[0]) and (chosen.distances[1:] > 0.5).all()

    # what is labelled already counts as covered: with region 0 labelled, the requests go elsewhere first
    covered = select(x, margins, n=2, labelled=x[:1], pool_factor=10)
    assert sorted(int(i) // 10 for i in covered.indices) == [1, 2]


def test_selection_pool_is_the_smallest_margins_and_skips_non_finite() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    margins = rng.uniform(size=50)
    margins[3], x[7, 2] = np.nan, np.inf
    chosen = select(x, margins, n=5, pool_factor=2)
    assert chosen.pool == 10
    finite = [i for i in range(50) if i not in (3, 7)]
    cutoff = np.sort(margins[finite])[9]
    assert (margins[chosen.indices] <= cutoff).all()
    assert not {3, 7} & set(chosen.indices.tolist())
    assert len(set(chosen.indices.tolist())) == 5
    with pytest.raises(ValueError, match="n must be"):
        select(x, margins, n=0)
    assert len(select(x[:3], margins[:3], n=10).indices) == 3  # fewer candidates than asked: all of them


def test_k_center_greedy_is_the_farthest_first_traversal() -> None:
    x = np.array([[0.0], [1.0], [10.0], [4.0]])
    picks, distances = k_center_greedy(x, 3)
    assert picks.tolist() == [0, 2, 3]
    assert distances[1:].tolist() == [10.0, 4.0]


def _image(i: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8, 3), i * 20 % 256, np.uint8))


@pytest.fixture
def home(backend: str, tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_requests_are_captured_kept_and_unlabelled(home: Path) -> None:
    rng = np.random.default_rng(2)
    n = 12
    ids = [f"p{i}" for i in range(n)]
    probs = rng.dirichlet(np.full(len(CLASSES), 0.7), n)
    now = time.time()
    capture = CaptureStore(home)
    records = make_records("site", 1, ids, rng.normal(size=(n, 16)).astype(np.float32),
                           rng.random((n, len(STAT_NAMES))), probs, CLASSES, created_at=now - 5)
    records[5].margin = float("nan")  # captured before revision 0008: read as 2 x confidence - 1
    capture.add_many(records)
    capture.add_many(make_records("other", 1, ["q0"], rng.normal(size=(1, 16)).astype(np.float32),
                                  rng.random((1, len(STAT_NAMES))), probs[:1], CLASSES))
    cache = InputCache(home, ttl_s=3600, max_items=100)
    kept = [i for i in range(n) if i != 0]  # p0 was captured but its input was never kept
    cache.put_many("site", 1, [ids[i] for i in kept], [_image(i) for i in kept], now=now - 5)
    LabelStore(home).add("site", _image(1), "c2", CLASSES, "feedback:p1", prediction_id="p1")

    answer = label_requests(cache, "site", n=20, now=now)
    got = [r["id"] for r in answer["requests"]]
    assert sorted(got) == sorted(ids[i] for i in kept if i != 1), "no input or a label: not requested"
    assert answer["candidates"] == n - 2 and answer["labelled"] == 1
    margins = {r["id"]: r["margin"] for r in answer["requests"]}
    expected = top2_margin(probs)
    expected[5] = 2 * probs[5].max() - 1
    for i in kept[1:]:
        assert margins[ids[i]] == pytest.approx(expected[i], abs=1e-6)
    first = answer["requests"][0]
    assert first["distance"] > 0, "p1 is labelled: every pick is measured against it"
    assert Image.open(io.BytesIO(base64.b64decode(first["image"]))).size == (8, 8)

    few = label_requests(cache, "site", n=2, images=False, now=now)  # a pool of the 4 x 2 smallest margins
    assert len(few["requests"]) == 2 and "image" not in few["requests"][0]
    assert all(r["margin"] <= sorted(margins.values())[7] for r in few["requests"])

    # inputs older than the cache's ttl are past labelling by id: no candidates, and the answer says why
    late = label_requests(cache, "site", n=3, now=now + 7200)
    assert late["requests"] == [] and "ADAPTSERVE_FEEDBACK_TTL_S" in late["note"]
    with pytest.raises(ValueError, match="n must be"):
        label_requests(cache, "site", n=0)
    capture.close()


def test_cli_prints_the_same_requests_and_writes_their_images(home: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    rng = np.random.default_rng(3)
    ids = [f"c{i}" for i in range(6)]
    with CaptureStore(home) as capture:
        capture.add_many(make_records("site", 1, ids, rng.normal(size=(6, 16)).astype(np.float32),
                                      rng.random((6, len(STAT_NAMES))), rng.dirichlet(np.ones(4), 6), CLASSES))
    cache = InputCache.from_env(home)
    cache.put_many("site", 1, ids, [_image(i) for i in range(6)])
    expected = [r["id"] for r in label_requests(cache, "site", n=3, images=False)["requests"]]

    out = tmp_path / "requested"
    result = CliRunner().invoke(app, ["labels", "requests", "--adapter", "site", "-n", "3", "--out", str(out)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert all(i in result.output for i in expected) and "3 of 6 unlabelled candidate(s)" in result.output
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(expected)
    assert Image.open(out / f"{expected[0]}.png").size == (8, 8)
    as_json = CliRunner().invoke(app, ["labels", "requests", "--adapter", "site", "-n", "3", "--json"])
    assert [r["id"] for r in json.loads(as_json.output)["requests"]] == expected


def test_bench_retrain_labels_the_requested_predictions(source_model: Path, tmp_path: Path) -> None:
    from sqlalchemy import select

    from benchmarks.retrain import BenchConfig, _feedback
    from models.registry import open_registry
    from monitoring.tables import capture_records
    from pipelines.data import digits_splits
    from pipelines.label_db import labels
    from pipelines.release import make_random_adapter, publish
    from pipelines.shifts import shift_set

    home = tmp_path / "home"
    src = make_random_adapter(source_model, tmp_path / "adapter", seed=5, scale=0.005)
    version = publish(open_registry(home), "site", src, source_model, promote=True).version
    stream = shift_set(digits_splits(32).val, "gaussian_noise", 3, seed=0)  # 359 shifted digits
    cfg = BenchConfig(max_labels=30, feedback_fraction=1.0, labels="requested")
    assert _feedback(home, stream, cfg, version, source_model) == 30
    database = LabelStore(home).database
    with database.read() as conn:
        margins = dict(conn.execute(select(capture_records.c.prediction_id, capture_records.c.margin)).all())
        labelled = set(conn.scalars(select(labels.c.prediction_id)))
    assert len(margins) == len(stream) and len(labelled) == 30 and labelled <= set(margins)
    cutoff = sorted(margins.values())[4 * 30 - 1]  # margin sampling's pool: the 4 x 30 smallest margins
    assert all(margins[i] <= cutoff for i in labelled)


def test_selection_against_many_labelled_centers_stays_small_in_memory() -> None:
    import tracemalloc

    rng = np.random.default_rng(4)
    x, labelled = rng.normal(size=(2000, 512)), rng.normal(size=(5000, 512))
    tracemalloc.start()
    chosen = select(x, rng.uniform(size=2000), n=500, labelled=labelled)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(chosen.indices.tolist())) == 500
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MiB: the 2000 x 5000 x 512 difference tensor would be 40 GB"
