"""The int8 engine: built from a model's labelled samples, measured against fp32, served only within the allowed
accuracy drop, prebuilt at publish, shown by the service."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from models.artifacts import load_model
from models.metadata import BASE
from models.quantize import (
    CALIBRATION_IMAGES,
    INT8_FILE,
    INT8_REPORT,
    Int8Report,
    QuantizeError,
    labelled_arrays,
)
from models.registry import open_registry
from models.samples import load_samples, sample_path, save_samples
from pipelines.release import make_random_adapter, publish
from service.engine import OnnxEngine


def _holdout(source_model: Path) -> tuple[np.ndarray, np.ndarray]:
    _, meta = load_model(source_model)
    x = labelled_arrays([source_model], meta.preprocessing)
    return x.eval_x, x.eval_y


def _engine(source_model: Path, cache: Path, **kw) -> OnnxEngine:
    base, meta = load_model(source_model)
    return OnnxEngine(copy.deepcopy(base), meta, cache, threads=1, precision="int8", **kw)


def test_int8_is_measured_on_the_holdout_and_served_within_the_allowed_drop(source_model: Path, tmp_path: Path):
    engine = _engine(source_model, tmp_path / "cache", base_dir=source_model)
    served = engine.served[BASE]
    assert served["precision"] == "int8" and engine.name == "onnx-int8"
    report = served["int8"]
    _, labels, _ = load_samples(sample_path(source_model, "holdout"))
    assert report["n_eval"] == len(labels) and report["eval_set"].endswith("samples/holdout.npz")
    assert report["n_calibration"] == CALIBRATION_IMAGES and report["calibration_set"].endswith("reference.npz")
    assert abs(report["delta"]) <= 0.01 and report["agreement"] >= 0.97

    # the session really is the quantized graph, and it reproduces the measured accuracy
    assert any(n.name.endswith(".int8.onnx") for n in (tmp_path / "cache").rglob("*"))
    x, y = _holdout(source_model)
    logits, emb = engine.run(x, [BASE] * len(x))
    assert emb.shape == (len(x), 512)
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(report["accuracy_int8"])
    fp32 = OnnxEngine(*load_model(source_model), tmp_path / "cache", threads=1)
    ref, _ = fp32.run(x, [BASE] * len(x))
    assert float((ref.argmax(1) == y).mean()) == pytest.approx(report["accuracy_fp32"])
    assert 0 < np.abs(logits - ref).max() <= report["max_abs_logit_diff"] + 1e-4  # int8 is not fp32


def test_a_version_that_loses_too_much_accuracy_is_served_in_fp32(source_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _engine(source_model, cache, base_dir=source_model)  # builds and caches the int8 file and its report
    (report_path,) = cache.rglob("*.int8.json")
    measured = json.loads(report_path.read_text())
    report_path.write_text(json.dumps({**measured, "accuracy_int8": measured["accuracy_fp32"] - 0.05}))

    engine = _engine(source_model, cache, base_dir=source_model)
    served = engine.served[BASE]
    assert served["precision"] == "fp32"
    assert "int8 refused: top-1 accuracy -5.00 points" in served["reason"]
    assert "ADAPTSERVE_INT8_MAX_DROP=0.01" in served["reason"]
    assert _engine(source_model, cache, base_dir=source_model, int8_max_drop=0.06).served[BASE]["precision"] == "int8"


def test_without_labelled_samples_the_engine_serves_fp32_and_says_why(
    source_model: Path, service_home: Path, tmp_path: Path
) -> None:
    registry = open_registry(service_home)
    engine = _engine(source_model, tmp_path / "cache", base_dir=None)  # random adapters carry no samples
    engine.load(("site-a", 1), registry.path("site-a", 1))
    served = engine.served[("site-a", 1)]
    assert served["precision"] == "fp32" and served["reason"].startswith("int8 not possible: no labelled samples")
    logits, _ = engine.run(np.zeros((1, 3, 32, 32), np.float32), [("site-a", 1)])
    assert logits.shape == (1, 10)
    with pytest.raises(QuantizeError, match="no labelled samples"):
        labelled_arrays([registry.path("site-a", 1)], load_model(source_model)[1].preprocessing)


def test_publish_prebuilds_the_int8_model_so_a_swap_only_opens_it(
    source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = open_registry(tmp_path / "home")
    src = make_random_adapter(source_model, tmp_path / "adapter", seed=5)
    version = publish(registry, "site-q", src, source_model, promote=True, int8=True)
    assert {INT8_FILE, INT8_REPORT} <= set(version.sha256)  # registered: verify() covers them
    report = Int8Report.load(version.path / INT8_REPORT)
    assert report.n_eval > 0 and report.calibration_set.endswith("reference.npz")

    cache = tmp_path / "cache"
    engine = _engine(source_model, cache, base_dir=source_model)
    engine.load(("site-q", 1), version.path)
    assert engine.served[("site-q", 1)] == {"precision": "int8", "int8": report.to_dict()}
    assert [p.name for p in cache.rglob("site-q*")] == []  # nothing rebuilt
    assert publish(registry, "site-q", src, source_model, int8=False).sha256.keys().isdisjoint({INT8_FILE})
    # by default it follows the environment: what a retrain job started by an onnx-int8 service inherits
    assert INT8_FILE not in publish(registry, "site-q", src, source_model).sha256
    monkeypatch.setenv("ADAPTSERVE_ENGINE", "onnx-int8")
    assert INT8_FILE in publish(registry, "site-q", src, source_model).sha256


def test_calibration_and_measurement_use_different_images(source_model: Path, tmp_path: Path) -> None:
    images, labels, classes = load_samples(sample_path(source_model, "holdout"))
    only = tmp_path / "m"
    save_samples(sample_path(only, "holdout"), images[:100], labels[:100], classes)
    prep = load_model(source_model)[1].preprocessing
    data = labelled_arrays([only], prep)
    assert len(data.calibration) == CALIBRATION_IMAGES and len(data.eval_x) == 100 - CALIBRATION_IMAGES
    flat = {row.tobytes() for row in data.calibration}
    assert not flat & {row.tobytes() for row in data.eval_x}

    ref_only = tmp_path / "r"
    save_samples(sample_path(ref_only, "reference"), images[:40], labels[:40], classes)
    data = labelled_arrays([ref_only], prep)
    assert (len(data.calibration), len(data.eval_x)) == (20, 20)
    assert "not used for calibration" in data.eval_set


def test_a_failed_int8_build_or_a_broken_report_leaves_the_version_serving_in_fp32(
    source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.engine

    def broken(*args, **kwargs):
        raise RuntimeError("quantizer crashed")

    with monkeypatch.context() as m:
        m.setattr(service.engine, "build_int8", broken)
        engine = _engine(source_model, tmp_path / "a", base_dir=source_model)
    assert engine.served[BASE] == {"precision": "fp32", "reason": "int8 build failed: quantizer crashed"}
    assert engine.run(np.zeros((1, 3, 32, 32), np.float32), [BASE])[0].shape == (1, 10)

    _engine(source_model, tmp_path / "b", base_dir=source_model)
    (report_path,) = (tmp_path / "b").rglob("*.int8.json")
    report_path.write_text("{not json")
    served = _engine(source_model, tmp_path / "b", base_dir=source_model).served[BASE]
    assert served["precision"] == "fp32" and served["reason"].startswith(f"int8 report {report_path.name} unreadable")
