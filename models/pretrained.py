"""Base models imported from torchvision: a catalog backbone with its pre-trained weights, saved as a model dir.

Such a base carries the target's class set (the registry registers an adapter only on a base of its classes)
with a seeded, untrained head that every adapter replaces with its own, and the backbone's ImageNet
preprocessing. Nothing is trained here: targets adapt from it as from the embedded digits model
(`adaptserve train --backbone NAME --weights imagenet`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from models.artifacts import save_model
from models.catalog import get_spec
from models.classifier import build_classifier
from models.metadata import MODEL_META, ModelMeta

LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt")


def weights_source(weights: str | Path) -> str:
    """What a base records as its weights: "imagenet", "none", an enum member name, or a checkpoint's full path."""
    return str(Path(weights).resolve()) if Path(str(weights)).suffix in LOCAL_SUFFIXES else str(weights)


def base_name(backbone: str, weights: str | Path, classes: Sequence[str]) -> str:
    """`<backbone>-<weights>-<classes digest>`: one base per backbone, weights and class set."""
    digest = hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()[:8]
    return f"{backbone}-{Path(str(weights)).stem}-{digest}"


def pretrained_base(
    out: str | Path, backbone: str, weights: str | Path, classes: Sequence[str], seed: int = 0
) -> Path:
    """Save `backbone` with `weights` and a head for `classes` as a base model dir at `out`; returns `out`.

    `weights`: "imagenet" (or a weights-enum member name), "none" (random init) or a local .safetensors / .pth
    checkpoint; WeightsUnavailableError says what to do when they cannot be loaded. The same arguments give the
    same files (seeded), and a base already at `out` from the same weights and classes is reused as it is, so
    adapters trained on it stay loadable (they record the base's sha256).
    """
    out, source = Path(out), weights_source(weights)
    if (out / MODEL_META).exists():
        found = ModelMeta.read(out)
        if (found.config or {}).get("weights") == source and found.classes == tuple(classes):
            return out
    spec = get_spec(backbone)
    torch.manual_seed(seed)  # the head (and, for "none", the backbone) is random: the same seed, the same base
    local = Path(source).suffix in LOCAL_SUFFIXES
    model = build_classifier(backbone, len(classes), Path(source) if local else source)
    meta = ModelMeta.for_model(model, classes=classes, preprocessing=spec.imagenet_preprocessing(), name=out.name,
                               strategy="pretrained", config={"weights": source, "seed": seed}, metrics={})
    return save_model(model.eval(), meta, out)
