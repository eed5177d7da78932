"""Artifacts on disk: base models as safetensors + model.json, adapters in PEFT format + metadata.json.

Never pickle: weights are safetensors, metadata is JSON (typed by models/metadata.py), and any torch.load uses
weights_only=True. Every save writes into a temporary sibling directory and renames it into place, so a reader
never sees a half-written artifact.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from models.classifier import Classifier, build_classifier
from models.files import atomic_dir, file_sha256
from models.lora import load_adapter
from models.metadata import (
    ADAPTER_FILES,
    ADAPTER_META,
    MODEL_META,
    AdapterMeta,
    ArtifactError,
    ModelMeta,
    read_json,
    write_json,
)

MODEL_FILE, ADAPTER_WEIGHTS = "model.safetensors", "adapter_model.safetensors"
# re-exported from models/metadata.py, where they live (torch-free): ADAPTER_FILES, MODEL_META, ArtifactError,
# read_json, write_json
__all__ = [
    "ADAPTER_FILES", "ADAPTER_WEIGHTS", "MODEL_FILE", "MODEL_META", "ArtifactError", "atomic_dir", "file_sha256",
    "load_adapter_model", "load_model", "now_iso", "read_adapter_meta", "read_json",
    "save_adapter", "save_model", "write_json",
]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def save_model(model: Classifier, meta: ModelMeta, out: str | Path) -> Path:
    """A full model: model.safetensors (backbone + head) and model.json (everything needed to rebuild it).

    The backbone written is the model's own; the weights' sha256 and (unless `meta` has one) the time are set here.
    A plain mapping is transitional (benchmarks/serve.py still builds one); it takes the same keys as model.json."""
    out = Path(out)
    if meta.num_classes != model.num_classes:
        raise ArtifactError(f"{out}: the model has {model.num_classes} outputs, its metadata lists {meta.num_classes} "
                            "classes")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / MODEL_FILE))
        saved = replace(meta, backbone=model.spec_name, sha256=file_sha256(tmp / MODEL_FILE),
                        created_at=meta.created_at or now_iso())
        write_json(tmp / MODEL_META, saved.to_dict())
    return out


def load_model(path: str | Path, device: str = "cpu") -> tuple[Classifier, ModelMeta]:
    path = Path(path)
    meta = ModelMeta.read(path)
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing")
    if meta.sha256 and file_sha256(weights) != meta.sha256:
        raise ArtifactError(f"{weights} does not match the sha256 recorded in {MODEL_META}: corrupted or replaced")
    model = build_classifier(meta.backbone, meta.num_classes, None, meta.head_dropout)
    try:
        model.load_state_dict(load_file(str(weights), device=device))
    except RuntimeError as err:
        raise ArtifactError(
            f"{weights} does not fit a {meta.backbone} with {meta.num_classes} classes: {err}"
        ) from err
    return model.eval(), meta


def save_adapter(peft_model: nn.Module, meta: AdapterMeta, out: str | Path) -> Path:
    """PEFT format (adapter_config.json + adapter_model.safetensors) plus our metadata.json (its sha256 set here)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        saved = replace(meta, sha256=file_sha256(tmp / ADAPTER_WEIGHTS), created_at=meta.created_at or now_iso())
        write_json(tmp / ADAPTER_META, saved.to_dict())
    return out


def read_adapter_meta(path: str | Path) -> AdapterMeta:
    """The metadata of the adapter at `path`, after checking that all of ADAPTER_FILES are there."""
    path = Path(path)
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise ArtifactError(f"adapter {path} has no {name}")
    return AdapterMeta.read(path)


def load_adapter_model(adapter: str | Path, base: Classifier, base_meta: ModelMeta):
    """(`base` with the adapter at `adapter` applied, a peft.PeftModel in eval mode; the adapter's metadata).

    Refuses an adapter trained on another base model or whose weights file was altered."""
    meta = read_adapter_meta(adapter)
    if meta.base_model != base_meta.model_id:
        raise ArtifactError(f"adapter {adapter} was trained on {meta.base_model}, not on {base_meta.model_id}")
    if meta.sha256 and file_sha256(Path(adapter) / ADAPTER_WEIGHTS) != meta.sha256:
        raise ArtifactError(f"adapter {adapter}: {ADAPTER_WEIGHTS} does not match its recorded sha256")
    if meta.num_classes != base.num_classes:
        base.reset_head(meta.num_classes)
    return load_adapter(base, str(adapter)).eval(), meta
