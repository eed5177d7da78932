"""Cheap per-image statistics recorded with every prediction (brightness, contrast, blur, colour, size).

They are the image half of the drift monitor's features: a camera going dark, a lens going soft or a new
resolution show up here long before accuracy is measurable. Everything is vectorised numpy on float32 and costs
well under 1 ms for a 224x224 RGB image, so it can run inline in the request path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

STAT_NAMES: tuple[str, ...] = ("brightness", "contrast", "sharpness", "colourfulness", "width", "height")

# ITU-R BT.601 luma weights (what PIL's convert("L") uses).
_LUMA = (0.299, 0.587, 0.114)


def _to_float_planes(img: Image.Image | np.ndarray) -> np.ndarray:
    """Return a (C, H, W) float32 array in 0..1 with C = 1 (grey) or 3 (RGB).

    uint8/uint16 arrays are scaled by their dtype's maximum; float arrays must already be in 0..1.
    An alpha channel is dropped; PIL modes other than L/RGB are converted to RGB. Planar layout matters:
    per-channel arithmetic on contiguous planes is ~3x faster than on strided HxWx3 slices.
    """
    if isinstance(img, Image.Image):
        img = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[:, :, :1] if arr.shape[2] == 1 else arr[:, :, :3]
    elif arr.ndim == 2:
        arr = arr[:, :, None]
    else:
        raise ValueError(f"expected an HxW or HxWxC image with C in (1, 3, 4), got shape {arr.shape}; "
                         "pass a PIL image or a (H, W, 3) array.")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image has an empty side (shape {arr.shape}); drop it before computing statistics.")
    planes = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        planes *= np.float32(1.0 / np.iinfo(arr.dtype).max)
    return planes


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    """Mean and (population) variance of a float32 array, centred first so a flat image gives exactly 0.

    A BLAS dot of the centred values is ~10x cheaper than ndarray.var(dtype=float64).
    """
    flat = x.ravel()
    mean = float(flat.mean(dtype=np.float64))
    centred = flat - np.float32(mean)
    return mean, max(float(np.dot(centred, centred)) / flat.size, 0.0)


def _luma(planes: np.ndarray) -> np.ndarray:
    if planes.shape[0] == 1:
        return planes[0]
    return planes[0] * np.float32(_LUMA[0]) + planes[1] * np.float32(_LUMA[1]) + planes[2] * np.float32(_LUMA[2])


def _laplacian_variance(luma: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over interior pixels: the classic 'is it blurred' measure.

    Scale: luma in 0..1, so a 1-pixel black/white checkerboard scores 16 and a flat image 0. It depends on
    resolution (downscaling sharpens), which is fine for drift detection because the reference went through
    the same pipeline.
    """
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1]
    lap += luma[1:-1, :-2]
    lap += luma[1:-1, 2:]
    lap -= np.float32(4.0) * luma[1:-1, 1:-1]
    return _mean_var(lap)[1]


def _colourfulness(planes: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness on 0..1 RGB (multiply by 255 for the paper's scale)."""
    if planes.shape[0] == 1:
        return 0.0
    r, g, b = planes
    mu_rg, var_rg = _mean_var(r - g)
    mu_yb, var_yb = _mean_var(np.float32(0.5) * (r + g) - b)
    return float(np.sqrt(var_rg + var_yb) + 0.3 * np.sqrt(mu_rg**2 + mu_yb**2))


def image_stats(img: Image.Image | np.ndarray) -> dict[str, float]:
    """Brightness, contrast, sharpness, colourfulness, width and height of one image (keys = STAT_NAMES).

    brightness: mean BT.601 luma in 0..1; contrast: std of luma; sharpness: variance of the Laplacian of
    luma; colourfulness: Hasler-Suesstrunk on 0..1 RGB (0 for grey); width/height in pixels.
    """
    planes = _to_float_planes(img)
    luma = _luma(planes)
    brightness, luma_var = _mean_var(luma)
    return {
        "brightness": brightness,
        "contrast": float(np.sqrt(luma_var)),
        "sharpness": _laplacian_variance(luma),
        "colourfulness": _colourfulness(planes),
        "width": float(planes.shape[2]),
        "height": float(planes.shape[1]),
    }


def batch_image_stats(images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """Stack image_stats for many images into an (n, len(STAT_NAMES)) float64 array, columns in STAT_NAMES order."""
    out = np.empty((len(images), len(STAT_NAMES)), dtype=np.float64)
    for i, img in enumerate(images):
        stats = image_stats(img)
        out[i] = [stats[name] for name in STAT_NAMES]
    return out
