"""Estimated accuracy without labels: what a window of captured predictions is likely to score.

Confidence alone cannot do it: a model can stay confident while wrong (the embedded digits model keeps a mean
confidence of 0.93 on low-contrast digits it gets 15% right). Two signals, combined the way AutoEval (Deng & Zheng,
CVPR 2021) and Guillory et al. (ICCV 2021) do, by a regression fitted on synthetic shifts of labelled data:

* `mean confidence` of the window (how sure the model is);
* the `class bound`: 1 - TV(predicted class distribution, holdout label distribution). Every error moves at most one
  prediction to another class, so when the target's classes are as frequent as the holdout's, accuracy cannot
  exceed it. A model that maps every shifted image to one or two classes (what strong shifts do) is caught here
  however confident it stays. It assumes no label shift: a site whose classes are much rarer or more frequent than
  the holdout's reads lower than it is (the answer carries the bound, so a reader can tell).

`calibrate` fits estimate = a + b * mean_confidence + c * class_bound (least squares, then clipped to 0..1 and
capped by the bound) on the version's labelled holdout, clean and under GENERIC corruptions (blur, translation,
zoom-out, salt-and-pepper noise, gamma, occlusion, colour jitter at severities 1-5). None of them is a shift of
`adaptserve bench drift` (pipelines/shifts.py), which therefore measures the estimate on shifts it never saw.

The fitted estimator is stored with the version's drift reference (extra arrays in reference.npz, recorded by
sha256 at registration); a version without a labelled holdout gets none and its checks carry no estimate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

METHOD = ("regression on mean confidence and the class bound (1 - TV of the predicted class distribution vs the "
          "holdout's), fitted on generic corruptions of the version's holdout, capped by the bound")
GENERIC = ("blur", "translate", "zoom_out", "salt_pepper", "gamma", "occlude", "color_jitter")
SEVERITIES = (1, 2, 3, 4, 5)
_KEYS = ("accuracy_coef", "accuracy_prior", "accuracy_fit")  # the extra arrays in reference.npz


def corrupt(image: Image.Image, kind: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """One generic corruption of an RGB image at severity 1-5 (what `calibrate` fits on; never a bench shift)."""
    size = image.size[0]
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(0.5 * severity * size / 32))
    if kind == "translate":
        step = max(1, round(2 * size / 32))
        dx, dy = (int(v) * step for v in rng.integers(-severity, severity + 1, 2))
        return image.transform(image.size, Image.AFFINE, (1, 0, dx, 0, 1, dy))
    if kind == "zoom_out":
        side = max(1, int(size * (1 - 0.1 * severity)))
        out = Image.new("RGB", image.size)
        out.paste(image.resize((side, side)), ((size - side) // 2, (size - side) // 2))
        return out
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    if kind == "salt_pepper":
        mask = rng.random(a.shape[:2]) < 0.04 * severity
        a[mask] = rng.choice([0.0, 255.0], size=(int(mask.sum()), 1))
    elif kind == "gamma":
        a = 255.0 * (a / 255.0) ** (1 + 0.6 * severity)
    elif kind == "occlude":
        side = max(1, int(size * 0.12 * severity))
        x0, y0 = (int(v) for v in rng.integers(0, max(size - side, 1), 2))
        a[y0:y0 + side, x0:x0 + side] = float(rng.integers(0, 256))
    elif kind == "color_jitter":
        a = a * (1 + 0.3 * severity * (rng.random(3) - 0.5))
    else:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(GENERIC)}")
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def class_bound(classes: np.ndarray, prior: np.ndarray) -> float:
    """1 - total variation distance between the predicted class distribution and `prior` (the holdout's labels)."""
    k = len(prior)
    predicted = np.bincount(np.asarray(classes, dtype=np.int64).clip(0, k - 1), minlength=k) / max(len(classes), 1)
    return float(1.0 - 0.5 * np.abs(predicted - prior).sum())


@dataclass(frozen=True)
class AccuracyEstimator:
    """estimate = clip(a + b * mean_confidence + c * class_bound, 0, 1), at most class_bound."""

    coef: np.ndarray  # (a, b, c)
    prior: np.ndarray  # the holdout's label distribution (n_classes,)
    fit_mae: float  # mean absolute error on the calibration sets themselves
    sets: int  # how many calibration sets it was fitted on
    holdout_accuracy: float | None = None  # on the clean holdout: the baseline a drop is measured from

    def estimate(self, confidence: np.ndarray, classes: np.ndarray) -> dict[str, float | int | str]:
        """The estimate for one window: `estimated_accuracy` with the two signals it came from."""
        conf = float(np.mean(confidence)) if len(confidence) else float("nan")
        bound = class_bound(classes, self.prior)
        value = float(np.clip(self.coef[0] + self.coef[1] * conf + self.coef[2] * bound, 0.0, 1.0))
        estimated = round(min(value, bound), 4)
        holdout = None if self.holdout_accuracy is None else round(self.holdout_accuracy, 4)
        return {"estimated_accuracy": estimated, "mean_confidence": round(conf, 4), "class_bound": round(bound, 4),
                "holdout_accuracy": holdout,
                "drop_points": None if holdout is None else round(100 * (holdout - estimated), 2),
                "method": METHOD, "calibration_sets": self.sets, "calibration_mae": round(self.fit_mae, 4)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"accuracy_coef": self.coef, "accuracy_prior": self.prior,
                "accuracy_fit": np.array([self.fit_mae, self.sets, np.nan if self.holdout_accuracy is None
                                          else self.holdout_accuracy], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, data: dict[str, np.ndarray]) -> AccuracyEstimator | None:
        if not all(k in data for k in _KEYS):
            return None
        fit = np.asarray(data["accuracy_fit"], dtype=np.float64)
        holdout = float(fit[2]) if len(fit) > 2 and np.isfinite(fit[2]) else None
        return cls(np.asarray(data["accuracy_coef"], dtype=np.float64),
                   np.asarray(data["accuracy_prior"], dtype=np.float64), float(fit[0]), int(fit[1]), holdout)


def read_estimator(path: str | os.PathLike[str]) -> AccuracyEstimator | None:
    """The estimator stored in a reference.npz, or None (a version calibrated before estimates, or without a
    labelled holdout)."""
    with np.load(path, allow_pickle=False) as data:
        return AccuracyEstimator.from_arrays({k: data[k] for k in _KEYS if k in data.files})


def fit(sets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], prior: np.ndarray) -> AccuracyEstimator:
    """Least squares over calibration sets, each (confidence, predicted classes, correct) of one labelled set; the
    first is the clean holdout, whose accuracy is the baseline a drop is measured from."""
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    rows = np.array([[1.0, float(np.mean(c)), class_bound(k, prior)] for c, k, _ in sets])
    target = np.array([float(np.mean(ok)) for _, _, ok in sets])
    coef = np.linalg.lstsq(rows, target, rcond=None)[0]
    estimator = AccuracyEstimator(coef, prior, 0.0, len(sets))
    errors = [abs(float(estimator.estimate(c, k)["estimated_accuracy"]) - t)
              for (c, k, _), t in zip(sets, target, strict=True)]
    return AccuracyEstimator(coef, prior, float(np.mean(errors)), len(sets), float(target[0]))


def calibration_images(
    images: Sequence[Image.Image], labels: Sequence[int], per_set: int = 100, seed: int = 0
) -> list[tuple[list[Image.Image], np.ndarray]]:
    """The labelled sets `calibrate` runs the model on: the whole holdout clean, then `per_set` of its images under
    every GENERIC corruption and severity."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    out = [(list(images), labels)]
    for kind in GENERIC:
        for severity in SEVERITIES:
            pick = rng.choice(len(images), size=min(per_set, len(images)), replace=False)
            out.append(([corrupt(images[i], kind, severity, rng) for i in pick], labels[pick]))
    return out
