"""Datasets: ImageFolder trees (with or without train/val/test) and the embedded digits source domain.

Class names are folder names (strings). Images are checked once when a folder is scanned: unreadable
files are skipped and counted, never fatal. Small datasets are decoded once and kept in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The data cannot be used as given; the message says what to change."""


@dataclass
class ImageSet(Dataset):
    """Images (PIL, decoded) with integer labels into `classes`."""

    images: list[Image.Image]
    labels: list[int]
    classes: list[str]
    transform: Callable | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]

    def with_transform(self, transform: Callable | None) -> ImageSet:
        return ImageSet(self.images, self.labels, self.classes, transform, self.skipped)

    def subset(self, indices: list[int] | np.ndarray) -> ImageSet:
        return ImageSet(
            [self.images[i] for i in indices], [self.labels[i] for i in indices], self.classes, self.transform
        )

    def fingerprint(self) -> str:
        """sha256 over labels and pixels: identifies exactly what a model was trained on."""
        h = hashlib.sha256(",".join(self.classes).encode())
        for image, label in zip(self.images, self.labels, strict=True):
            h.update(label.to_bytes(4, "little"))
            h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
            h.update(image.tobytes())
        return h.hexdigest()[:16]


@dataclass
class DataSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _load_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def scan_class_folder(root: Path) -> ImageSet:
    """One ImageFolder level: root/<class>/<image>. Unreadable images are skipped and listed."""
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {root}: expected {root}/<class name>/<image files>")
    images, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            for file in sorted(files):
                path = Path(dirpath) / file
                if not file.lower().endswith(IMG_EXTENSIONS):
                    continue
                image = _load_image(path)
                if image is None:
                    skipped.append(str(path))
                else:
                    images.append(image)
                    labels.append(label)
    if not images:
        raise DataError(f"no readable images under {root} ({len(skipped)} unreadable files skipped)")
    present = set(labels)
    empty = [name for k, name in enumerate(classes) if k not in present]
    if empty:
        raise DataError(
            f"no readable images for class {', '.join(empty)} under {root}: add images or remove the folder"
        )
    return ImageSet(images, labels, classes, skipped=skipped)


def _check_classes(sets: dict[str, ImageSet], root: Path) -> None:
    names = {k: s.classes for k, s in sets.items()}
    if len({tuple(c) for c in names.values()}) > 1:
        detail = "; ".join(f"{k}: {', '.join(c)}" for k, c in names.items())
        raise DataError(f"class folders differ between splits under {root} ({detail}); every split needs the same")
    classes = sets["train"].classes
    if len(classes) < 2:
        raise DataError(f"only one class ({classes[0]!r}) under {root}: a classifier needs at least two")


def stratified_split(labels: list[int], fractions: tuple[float, float, float], seed: int) -> list[np.ndarray]:
    """Indices for train/val/test, each class split in the same proportions, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    out: list[list[int]] = [[], [], []]
    for c in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == c))
        n_val = int(round(len(idx) * fractions[1]))
        n_test = min(int(round(len(idx) * fractions[2])), len(idx) - n_val)
        n_train = len(idx) - n_val - n_test
        for k, part in enumerate((idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :])):
            out[k].extend(part.tolist())
    return [np.sort(np.asarray(o, dtype=int)) for o in out]


def load_image_folder(
    root: str | Path, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> DataSplits:
    """root/{train,val,test}/<class>/..., or root/<class>/... split stratified with `seed`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present:
        missing = [s for s in SPLITS if s not in present]
        if missing:
            raise DataError(f"{root} has {', '.join(present)} but not {', '.join(missing)}: give all three or none")
        sets = {s: scan_class_folder(root / s) for s in SPLITS}
        _check_classes(sets, root)
        return DataSplits(sets["train"], sets["val"], sets["test"])
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions must be three numbers >= 0 that sum to 1, got {fractions}")
    whole = scan_class_folder(root)
    _check_classes({"train": whole}, root)
    parts = stratified_split(whole.labels, fractions, seed)
    empty = [s for s, p in zip(SPLITS, parts, strict=True) if len(p) == 0]
    if empty:
        raise DataError(
            f"too few images under {root} ({len(whole)}) to split {fractions}: {', '.join(empty)} would be empty; "
            "add images or give train/val/test folders"
        )
    train, val, test = (whole.subset(p) for p in parts)
    train.skipped = whole.skipped
    return DataSplits(train, val, test)


def write_image_folder(splits: DataSplits | dict[str, ImageSet], root: str | Path) -> Path:
    """Write splits as root/<split>/<class>/<index>.png."""
    root = Path(root)
    items = splits.__dict__ if isinstance(splits, DataSplits) else splits
    for split, dataset in items.items():
        for name in dataset.classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(dataset.images, dataset.labels, strict=False)):
            image.save(root / split / dataset.classes[label] / f"{i:05d}.png")
    return root


def digits_splits(size: int = 32, seed: int = 0) -> DataSplits:
    """The embedded source domain: scikit-learn's bundled 8x8 digits, upsampled to size x size RGB.

    Deterministic 60/20/20 stratified split; classes "0".."9". Nothing is downloaded.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        Image.fromarray((d / 16.0 * 255).astype(np.uint8), mode="L")
        .resize((size, size), Image.BILINEAR)
        .convert("RGB")
        for d in digits.images
    ]
    labels = [int(t) for t in digits.target]
    whole = ImageSet(images, labels, [str(i) for i in range(10)])
    train, val, test = (whole.subset(p) for p in stratified_split(labels, (0.6, 0.2, 0.2), seed))
    return DataSplits(train, val, test)


def per_class_subset(dataset: ImageSet, per_class: int, seed: int = 0) -> ImageSet:
    """At most `per_class` images of every class, chosen reproducibly: a small labelled target set."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.labels)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(dataset.classes))]
    return dataset.subset(np.sort(np.concatenate(keep)))
