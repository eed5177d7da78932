"""An adapter version's drift reference (`reference.npz`, a monitoring.detectors.ReferenceSet): what the monitor
compares traffic with, computed from the version's own reference images by the same merged model that serves it.

Built once when a version is released (pipelines/release.py) so the registry records its sha256 with the weights;
the base model's reference is built on first use and cached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import settings
from models.artifacts import load_model
from models.export import merged_classifier, softmax
from models.metadata import ModelMeta
from models.preprocessing import Preprocessing
from models.samples import find_samples, load_samples
from monitoring.accuracy import AccuracyEstimator, calibration_images, fit
from monitoring.capture import reference_from_arrays
from monitoring.detectors import REFERENCE_FILE, ReferenceSet
from monitoring.image_stats import batch_image_stats

log = logging.getLogger(__name__)


def forward(merged: torch.nn.Module, images: Sequence[Image.Image], preprocessing: Preprocessing,
             batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities, embeddings) of `images` through a merged model (models.export.merged_classifier), as
    its ONNX file computes them."""
    transform = preprocessing.eval_transform()
    logits, embeddings = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.stack([transform(im) for im in images[start : start + batch_size]])
            lg, emb = merged.forward_with_embedding(x)
            logits.append(lg.float().numpy())
            embeddings.append(emb.float().numpy())
    return softmax(np.concatenate(logits)), np.concatenate(embeddings)


def compute_reference(
    model: torch.nn.Module, images: Sequence[Image.Image], preprocessing: Preprocessing, batch_size: int = 128
) -> ReferenceSet:
    """The drift ReferenceSet of `images` exactly as the service records traffic: one forward_with_embedding of
    the merged model (the two outputs its ONNX file returns) gives the embeddings and, through the softmax, the
    confidence, entropy and class; the image statistics come from the original images, before preprocessing.

    About a second for 360 images at 32x32 (resnet18) on two shared cores.
    """
    probs, embeddings = forward(merged_classifier(model), images, preprocessing, batch_size)
    return reference_from_arrays(embeddings, batch_image_stats(images), probs)


def calibrate(model: torch.nn.Module, images: Sequence[Image.Image], labels: Sequence[int], n_classes: int,
              preprocessing: Preprocessing, per_set: int = 100) -> AccuracyEstimator:
    """The version's accuracy estimator (monitoring/accuracy.py), fitted on its labelled holdout, clean and under
    generic corruptions: 36 sets, the model run once over each (about 3,900 images at the defaults)."""
    merged = merged_classifier(model)
    sets = []
    for batch, truth in calibration_images(images, labels, per_set):
        probs, _ = forward(merged, batch, preprocessing)
        predicted = probs.argmax(axis=1)
        sets.append((probs.max(axis=1), predicted, (predicted == truth).astype(np.float64)))
    prior = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return fit(sets, prior)


def write_reference(model: torch.nn.Module, sample_dirs: Sequence[Path], preprocessing: Preprocessing,
                    out: Path) -> Path | None:
    """Compute the reference from the first `samples/reference.npz` among sample_dirs and save it at `out`, with
    the accuracy estimator calibrated on the first `samples/holdout.npz` (none without one).

    Returns None (and logs why) when no directory has reference samples: the version then serves without drift
    checks, which answer with a message saying how to add a reference.
    """
    source = find_samples("reference", *sample_dirs)
    if source is None:
        log.warning("no samples/reference.npz in %s: %s gets no drift reference",
                    " or ".join(str(d) for d in sample_dirs), out.parent)
        return None
    images, _, classes = load_samples(source)
    reference = compute_reference(model, images, preprocessing)
    holdout = find_samples("holdout", *sample_dirs)
    per_set = settings.load().accuracy_calibration_images
    extra = {}
    if holdout is not None and per_set > 0:
        held, labels, held_classes = load_samples(holdout)
        extra = calibrate(model, held, labels, len(held_classes), preprocessing, per_set).arrays()
    elif per_set > 0:
        log.warning("no samples/holdout.npz in %s: %s gets no accuracy estimate",
                    " or ".join(str(d) for d in sample_dirs), out.parent)
    reference.save(out, extra=extra)  # atomic; racing processes use their own temp files
    return out


def base_reference_path(base_dir: Path, home: Path) -> Path:
    """Where the base model's drift reference lives: `<base_dir>/reference.npz` when the model ships one, else a
    cache under `<home>/references/`, keyed by the base model's id (backbone + weights sha256)."""
    shipped = Path(base_dir) / REFERENCE_FILE
    if shipped.is_file():
        return shipped
    key = ModelMeta.read(base_dir).model_id.replace("@", "-")
    return Path(home) / "references" / f"{key}.npz"


def base_reference(base_dir: Path, home: Path) -> Path:
    """The base model's drift reference (the reference of traffic served by the plain base, engine key BASE),
    computed from its `samples/reference.npz` on first use and cached (see base_reference_path)."""
    path = base_reference_path(base_dir, home)
    if path.is_file():
        return path
    if find_samples("reference", base_dir) is None:
        raise FileNotFoundError(f"the base model {base_dir} has no samples/reference.npz to build its drift "
                                "reference from; rebuild it with `adaptserve pretrain --force`.")
    model, meta = load_model(base_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_reference(model, [Path(base_dir)], meta.preprocessing, path)
    return path
