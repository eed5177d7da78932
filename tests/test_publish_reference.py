"""publish() stores each version's drift reference (reference.npz) in the registry, computed like served traffic."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.artifacts import load_model
from models.export import session
from models.registry import open_registry
from models.samples import load_samples, sample_path, save_samples
from monitoring.detectors import REFERENCE_FILE, ReferenceSet
from monitoring.image_stats import STAT_NAMES, batch_image_stats
from monitoring.reference import base_reference, base_reference_path
from pipelines.release import make_random_adapter, publish


def _onnx_outputs(onnx: Path, images: list, base_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch

    transform = load_model(base_dir)[1].preprocessing.eval_transform()
    x = torch.stack([transform(im) for im in images]).numpy()
    logits, emb = session(onnx).run(None, {"input": x})
    return logits, emb


def test_published_versions_carry_a_registered_reference(service_home: Path, source_model: Path) -> None:
    registry = open_registry(service_home)
    version = registry.verify("site-a", 1)  # re-hashes every file, reference.npz included
    assert REFERENCE_FILE in version.sha256
    reference = ReferenceSet.load(version.path / REFERENCE_FILE)
    images, _, _ = load_samples(sample_path(source_model, "reference"))  # random adapters have no samples of their own
    assert len(reference) == len(images) == 359
    assert reference.embeddings.shape == (359, 512)  # resnet18's penultimate layer
    assert reference.stat_names == STAT_NAMES
    np.testing.assert_allclose(reference.stats, batch_image_stats(images))  # statistics of the original images
    assert np.all((reference.confidence > 0) & (reference.confidence <= 1)) and reference.classes.max() <= 9


def test_reference_matches_what_the_onnx_engine_serves(service_home: Path, source_model: Path) -> None:
    path = open_registry(service_home).path("site-b", 1)
    reference = ReferenceSet.load(path / REFERENCE_FILE)
    images, _, _ = load_samples(sample_path(source_model, "reference"))
    logits, emb = _onnx_outputs(path / "model.onnx", images[:64], source_model)
    np.testing.assert_allclose(reference.embeddings[:64], emb, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(reference.classes[:64], logits.argmax(axis=1))
    # versions differ, so their references differ: each is computed with its own merged weights
    other = ReferenceSet.load(open_registry(service_home).path("site-a", 1) / REFERENCE_FILE)
    assert np.abs(other.embeddings - reference.embeddings).max() > 1e-3


def test_an_adapters_own_samples_win_over_the_base_samples(tmp_path: Path, source_model: Path) -> None:
    src = make_random_adapter(source_model, tmp_path / "adapter", seed=7)
    images, labels, classes = load_samples(sample_path(source_model, "holdout"))
    save_samples(sample_path(src, "reference"), images[:40], labels[:40], classes)
    (src / REFERENCE_FILE).write_bytes(b"stale")  # a leftover in the source dir is replaced, not registered
    registry = open_registry(tmp_path / "home")
    version = publish(registry, "own", src, source_model)
    reference = ReferenceSet.load(version.path / REFERENCE_FILE)
    assert len(reference) == 40
    np.testing.assert_allclose(reference.stats, batch_image_stats(images[:40]))
    assert registry.verify("own", version.version).sha256[REFERENCE_FILE] == version.sha256[REFERENCE_FILE]


def test_base_reference_is_computed_once_and_cached_under_home(tmp_path: Path, source_model: Path) -> None:
    home = tmp_path / "home"
    path = base_reference(source_model, home)
    assert path == base_reference_path(source_model, home) and path.parent == home / "references"
    assert len(ReferenceSet.load(path)) == 359
    stamp = path.stat().st_mtime_ns
    assert base_reference(source_model, home) == path and path.stat().st_mtime_ns == stamp  # cached, not redone


def test_a_base_without_reference_samples_says_how_to_get_one(tmp_path: Path, source_model: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(source_model, bare, ignore=shutil.ignore_patterns("samples"))
    with pytest.raises(FileNotFoundError, match=r"has no samples/reference.npz .* `adaptserve pretrain --force`"):
        base_reference(bare, tmp_path / "home")
