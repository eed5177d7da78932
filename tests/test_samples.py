from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.samples import find_samples, load_samples, sample_path, save_image_set, save_samples
from pipelines.data import ImageSet


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(8, 8), (20, 11), (3, 40)]
    ]


def test_round_trip_keeps_pixels_sizes_labels_and_classes(tmp_path: Path) -> None:
    images = [*_images(), _images()[0].convert("L")]
    path = save_samples(tmp_path / "s.npz", images, [2, 0, 1, 1], ["a", "b", "c"])
    loaded, labels, classes = load_samples(path)
    assert classes == ["a", "b", "c"] and labels.tolist() == [2, 0, 1, 1]
    for a, b in zip(images, loaded, strict=True):
        assert a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_limit_takes_a_seeded_subset(tmp_path: Path) -> None:
    ims = _images() * 4
    ds = ImageSet(ims, list(range(12)), [str(i) for i in range(12)])
    first = load_samples(save_image_set(tmp_path / "a.npz", ds, limit=5, seed=1))[1]
    again = load_samples(save_image_set(tmp_path / "b.npz", ds, limit=5, seed=1))[1]
    assert len(first) == 5 and first.tolist() == again.tolist() and first.tolist() == sorted(first.tolist())


def test_mismatched_lengths_and_unknown_kind_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one label per image"):
        save_samples(tmp_path / "x.npz", _images(), [0], ["a"])
    with pytest.raises(ValueError, match="sample kind must be one of"):
        sample_path(tmp_path, "training")


def test_pretrain_stores_reference_replay_and_holdout(source_model: Path, tmp_path: Path) -> None:
    for kind in ("reference", "replay", "holdout"):
        images, labels, classes = load_samples(sample_path(source_model, kind))
        assert classes == [str(i) for i in range(10)] and len(images) == len(labels) > 100
        assert set(labels.tolist()) == set(range(10))
    assert find_samples("reference", tmp_path, source_model) == sample_path(source_model, "reference")
    assert find_samples("reference", tmp_path) is None
