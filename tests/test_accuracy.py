"""Estimated accuracy without labels (monitoring/accuracy.py): the class bound, the fit, the generic corruptions it
is calibrated on, and the estimator a published version carries. `bench drift` measures its error on shifts it
never saw (benchmarks/estimate.py; a quick run in tests/test_monitor.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.registry import open_registry
from models.samples import load_samples, sample_path
from monitoring.accuracy import GENERIC, AccuracyEstimator, class_bound, corrupt, fit, read_estimator
from monitoring.detectors import REFERENCE_FILE, ReferenceSet
from pipelines.release import make_random_adapter, publish
from pipelines.shifts import SHIFTS


def test_class_bound_is_one_minus_the_total_variation_to_the_prior() -> None:
    prior = np.full(4, 0.25)
    assert class_bound(np.array([0, 1, 2, 3] * 5), prior) == pytest.approx(1.0)
    # every prediction in one class: at most that class's share can be right
    assert class_bound(np.zeros(40, dtype=int), prior) == pytest.approx(0.25)
    assert class_bound(np.array([0, 0, 1, 2]), prior) == pytest.approx(0.75)


def test_fit_recovers_a_linear_relation_and_the_estimate_never_exceeds_the_bound() -> None:
    rng = np.random.default_rng(0)
    prior = np.full(10, 0.1)
    sets = []
    for conf_level in np.linspace(0.5, 1.0, 12):
        confidence = np.clip(rng.normal(conf_level, 0.01, 200), 0, 1)
        classes = np.arange(200) % 10  # balanced: bound 1
        acc = 2 * conf_level - 1.0  # accuracy = -1 + 2 x confidence
        sets.append((confidence, classes, (rng.random(200) < acc).astype(float)))
    estimator = fit(sets, prior)
    assert estimator.coef[1] == pytest.approx(2.0, abs=0.3) and estimator.sets == 12
    assert estimator.fit_mae < 0.05
    sure = estimator.estimate(np.full(100, 0.95), np.arange(100) % 10)
    assert sure["estimated_accuracy"] == pytest.approx(0.9, abs=0.07) and sure["class_bound"] == 1.0
    collapsed = estimator.estimate(np.full(100, 0.99), np.zeros(100, dtype=int))  # confident, one class
    assert collapsed["estimated_accuracy"] == pytest.approx(0.1) and collapsed["mean_confidence"] == 0.99


@pytest.mark.parametrize("kind", GENERIC)
def test_generic_corruptions_change_the_image_keep_its_size_and_are_not_bench_shifts(kind: str) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = corrupt(image, kind, 3, np.random.default_rng(2))
    assert out.size == image.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, dtype=float) - np.asarray(image, dtype=float)).mean() > 1.0
    assert kind not in SHIFTS, "calibrating on a bench shift would leak it into the measured error"
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(image, "pixelate", 1, np.random.default_rng(0))


def test_a_published_version_carries_its_estimator_and_zero_turns_it_off(
    service_home: Path, source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = open_registry(service_home).verify("site-a", 1).path / REFERENCE_FILE  # hashed: the estimator is recorded
    estimator = read_estimator(path)
    assert isinstance(estimator, AccuracyEstimator) and estimator.sets == 1 + 5 * len(GENERIC)
    _, labels, _ = load_samples(sample_path(source_model, "holdout"))
    np.testing.assert_allclose(estimator.prior, np.bincount(labels, minlength=10) / len(labels))
    assert len(ReferenceSet.load(path)) == 359, "the drift reference reads as before"
    reference = ReferenceSet.load(path)  # the reference images, through this version: labelled, so checkable
    _, truth, _ = load_samples(sample_path(source_model, "reference"))
    accuracy = float(np.mean(reference.classes == truth))
    estimate = estimator.estimate(reference.confidence, reference.classes)["estimated_accuracy"]
    assert abs(estimate - accuracy) < 0.1, (estimate, accuracy)

    monkeypatch.setenv("ADAPTSERVE_ACCURACY_CALIBRATION_IMAGES", "0")
    src = make_random_adapter(source_model, tmp_path / "adapter", seed=3)
    version = publish(open_registry(tmp_path / "home"), "plain", src, source_model)
    assert read_estimator(version.path / REFERENCE_FILE) is None
