"""Preprocessing: the one place that turns an image into a model input.

A model's preprocessing is stored in its metadata (`Preprocessing.to_dict`) so training, evaluation and
serving rebuild exactly the same transform from it. Augmentation is training-only and composes in front of
the same resize/normalise steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("crop", "rotate", "flip", "jitter")
AUGMENT_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "light": ("crop", "rotate"),
    "standard": ("crop", "rotate", "flip", "jitter"),
}


def parse_augment(value: str) -> tuple[str, ...]:
    """A preset name ('none', 'light', 'standard') or a comma list of crop, rotate, flip, jitter."""
    if value in AUGMENT_PRESETS:
        return AUGMENT_PRESETS[value]
    parts = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in parts if p not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown augmentation {', '.join(unknown)}; use a preset ({', '.join(AUGMENT_PRESETS)}) "
            f"or a comma list of {', '.join(AUGMENTATIONS)}"
        )
    return parts


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens (L, I;16, CMYK, P, RGBA, ...) as 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) or 1.0
        image = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop and normalise, as torchvision's weights presets do."""

    crop_size: int = field(default=224, metadata={"help": "side of the square model input, pixels"})
    resize_size: int = field(default=256, metadata={"help": "shorter side is resized to this before the crop"})
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop_size < 8 or self.resize_size < self.crop_size:
            raise ValueError(
                f"preprocessing needs crop_size >= 8 and resize_size >= crop_size, got crop {self.crop_size}, "
                f"resize {self.resize_size}"
            )

    @classmethod
    def from_weights(cls, weights: Any) -> Preprocessing:
        preset = weights.transforms()
        return cls(int(preset.crop_size[0]), int(preset.resize_size[0]), tuple(preset.mean), tuple(preset.std))

    @classmethod
    def for_size(cls, size: int) -> Preprocessing:
        """Small inputs (the embedded 32x32 digits): no crop margin, ImageNet statistics."""
        return cls(crop_size=size, resize_size=size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(int(data["crop_size"]), int(data["resize_size"]), tuple(data["mean"]), tuple(data["std"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _tail(self) -> list[v2.Transform]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def eval_transform(self) -> v2.Compose:
        return v2.Compose(
            [v2.Lambda(to_rgb), v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.crop_size)]
            + self._tail()
        )

    def train_transform(self, augment: tuple[str, ...] = ()) -> v2.Compose:
        steps: list[v2.Transform] = [v2.Lambda(to_rgb)]
        if "crop" in augment:
            # square first: on a wide image no near-square crop of 75% area exists, and the transform would
            # fall back to the same centre crop every time
            steps += [
                v2.Resize(self.resize_size, antialias=True),
                v2.CenterCrop(self.resize_size),
                v2.RandomResizedCrop(self.crop_size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
            ]
        else:
            steps += [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.crop_size)]
        if "rotate" in augment:
            steps.append(v2.RandomRotation(12))
        if "flip" in augment:
            steps.append(v2.RandomHorizontalFlip())
        if "jitter" in augment:
            steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3))
        return v2.Compose(steps + self._tail())
