"""Labelled image samples stored beside a model: what drift references, replay and gates are computed from.

A model directory may hold `samples/<kind>.npz`:
- base model (written by `adaptserve pretrain`): `reference` (source validation split: the drift reference of
  the base), `replay` (a slice of the source training split, mixed into re-fine-tuning against forgetting),
  `holdout` (the source test split: the forgetting check of every gate; never trained on).
- adapter (written by `adaptserve train` and retrain jobs): `reference` (its training/validation images, from
  which publish() computes the version's drift reference set) and `holdout` (its target test split, or a retrain
  job's holdout labels: what the int8 engine's accuracy is measured on, models/quantize.py).

Format: one .npz without pickles: the images as PNG bytes concatenated (`png` uint8 + `offsets`), `labels`
int64 and `classes` (str). PNG keeps each image's own size and mode, exactly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES_DIR = "samples"
KINDS = ("reference", "replay", "holdout")


def sample_path(model_dir: str | Path, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"sample kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return Path(model_dir) / SAMPLES_DIR / f"{kind}.npz"


def save_samples(
    path: str | Path, images: Sequence[Image.Image], labels: Sequence[int], classes: Sequence[str]
) -> Path:
    """Write images + labels atomically (temp file, then rename)."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images and {len(labels)} labels; pass one label per image")
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.cumsum([0, *[len(b) for b in blobs]]).astype(np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(
            fh,
            png=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8),
            offsets=offsets,
            labels=np.asarray(labels, dtype=np.int64),
            classes=np.asarray(list(classes), dtype=str),
        )
    os.replace(tmp, path)
    return path


def load_samples(path: str | Path) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """(images, labels, classes) as written by save_samples."""
    with np.load(path, allow_pickle=False) as data:
        png, offsets, labels, classes = data["png"], data["offsets"], data["labels"], data["classes"]
    images = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        im = Image.open(io.BytesIO(png[a:b].tobytes()))
        im.load()
        images.append(im)
    return images, labels, [str(c) for c in classes]


def save_image_set(path: str | Path, dataset, limit: int | None = None, seed: int = 0) -> Path:
    """Save (a seeded random subset of at most `limit` of) a pipelines.data.ImageSet."""
    idx = np.arange(len(dataset.images))
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).permutation(idx)[:limit])
    return save_samples(path, [dataset.images[i] for i in idx], [dataset.labels[i] for i in idx], dataset.classes)


def find_samples(kind: str, *model_dirs: str | Path | None) -> Path | None:
    """The first `samples/<kind>.npz` that exists among model_dirs (e.g. the adapter's, then its base's)."""
    for d in model_dirs:
        if d is not None and sample_path(d, kind).is_file():
            return sample_path(d, kind)
    return None
