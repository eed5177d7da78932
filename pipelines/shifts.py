"""Domain shifts in the style of ImageNet-C (Hendrycks & Dietterich, 2019), severities 1-5.

Each shift is a small pure function (image as float array in [0, 1], severity, rng) -> array, plus a
record in `SHIFTS`. Blur radii scale with image size (the table is for 32 px; 224 px images get ~7x), so the
same severity means a comparable degradation at any resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from pipelines.data import DataSplits, ImageSet

Array = np.ndarray


@dataclass(frozen=True)
class Shift:
    name: str
    apply: Callable[[Array, int, np.random.Generator], Array]
    levels: tuple[float, ...]
    help: str


def _gaussian_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    return x + rng.normal(0.0, SHIFTS["gaussian_noise"].levels[s - 1], x.shape)


def _defocus_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius = max(SHIFTS["defocus_blur"].levels[s - 1] * min(x.shape[:2]) / 32, 1.0)
    r = max(int(np.ceil(radius)), 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = ((xx**2 + yy**2) <= radius**2 + 0.5).astype(np.float64)
    disk /= disk.sum()
    return np.stack([ndimage.convolve(x[..., c], disk, mode="reflect") for c in range(x.shape[2])], axis=-1)


def _contrast(x: Array, s: int, rng: np.random.Generator) -> Array:
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * SHIFTS["contrast"].levels[s - 1] + mean


def _brightness(x: Array, s: int, rng: np.random.Generator) -> Array:
    return x + SHIFTS["brightness"].levels[s - 1]


def _rotation(x: Array, s: int, rng: np.random.Generator) -> Array:
    angle = SHIFTS["rotation"].levels[s - 1] * rng.choice([-1.0, 1.0])
    return ndimage.rotate(x, angle, axes=(0, 1), reshape=False, order=1, mode="nearest")


def _invert(x: Array, s: int, rng: np.random.Generator) -> Array:
    a = SHIFTS["invert"].levels[s - 1]
    return (1 - a) * x + a * (1 - x)


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("gaussian_noise", _gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38), "additive noise, std per severity"),
        Shift("defocus_blur", _defocus_blur, (1.0, 1.5, 2.0, 2.5, 3.0), "disk blur, radius in px at 32 px"),
        Shift("contrast", _contrast, (0.4, 0.3, 0.2, 0.1, 0.05), "contrast kept, as a fraction"),
        Shift("brightness", _brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "added to every channel"),
        Shift("rotation", _rotation, (10.0, 20.0, 30.0, 45.0, 60.0), "degrees, random sign"),
        Shift("invert", _invert, (0.2, 0.4, 0.6, 0.8, 1.0), "blend towards the colour negative"),
    )
}


def get_shift(name: str) -> Shift:
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; choose one of {', '.join(SHIFTS)}")
    return SHIFTS[name]


def apply_shift(image: Image.Image, name: str, severity: int, rng: np.random.Generator) -> Image.Image:
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    y = get_shift(name).apply(x, severity, rng)
    return Image.fromarray((np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")


def shift_set(dataset: ImageSet, name: str, severity: int, seed: int = 0) -> ImageSet:
    """Every image shifted; reproducible: image i draws from a generator seeded by (seed, i)."""
    images = [apply_shift(im, name, severity, np.random.default_rng([seed, i])) for i, im in enumerate(dataset.images)]
    return ImageSet(images, list(dataset.labels), dataset.classes, dataset.transform)


def shift_splits(splits: DataSplits, name: str, severity: int, seed: int = 0) -> DataSplits:
    return DataSplits(
        *(shift_set(s, name, severity, seed + k) for k, s in enumerate((splits.train, splits.val, splits.test)))
    )
