"""Artifacts on disk: base models as safetensors + JSON, adapters in PEFT format + metadata.json.

Never pickle: weights are safetensors, metadata is JSON, and any torch.load uses weights_only=True.
Every save writes into a temporary sibling directory and renames it into place, so a reader never
sees a half-written artifact.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from models.classifier import Classifier, build_classifier
from models.preprocessing import Preprocessing

MODEL_FILE, MODEL_META = "model.safetensors", "model.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "metadata.json")


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or does not fit the model it is loaded onto."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_dir(target: Path):
    """Yield a temp dir next to `target`; on success fsync it and rename it to `target` (replacing it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None


def save_model(model: Classifier, meta: dict[str, Any], out: str | Path) -> Path:
    """A full model: model.safetensors (backbone + head) and model.json (everything needed to rebuild it)."""
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / MODEL_FILE))
        full = {"kind": "model", "format_version": 1, "created_at": now_iso(), **meta}
        full.update(backbone=model.spec_name, num_classes=model.num_classes, sha256=file_sha256(tmp / MODEL_FILE))
        write_json(tmp / MODEL_META, full)
    return out


def load_model(path: str | Path, device: str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    path = Path(path)
    meta = read_json(path / MODEL_META)
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} is missing")
    if meta.get("sha256") and file_sha256(weights) != meta["sha256"]:
        raise ArtifactError(f"{weights} does not match the sha256 recorded in {MODEL_META}: corrupted or replaced")
    model = build_classifier(meta["backbone"], int(meta["num_classes"]), None, float(meta.get("head_dropout", 0.0)))
    try:
        model.load_state_dict(load_file(str(weights), device=device))
    except RuntimeError as err:
        raise ArtifactError(
            f"{weights} does not fit a {meta['backbone']} with {meta['num_classes']} classes: {err}"
        ) from err
    return model.eval(), meta


def model_id(meta: dict[str, Any]) -> str:
    """Short identity of a base model: adapters record it and refuse to load onto any other."""
    return f"{meta['backbone']}@{meta['sha256'][:12]}"


def save_adapter(peft_model: nn.Module, meta: dict[str, Any], out: str | Path) -> Path:
    """PEFT format (adapter_config.json + adapter_model.safetensors) plus our metadata.json."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        sha = file_sha256(tmp / "adapter_model.safetensors")
        write_json(
            tmp / "metadata.json",
            {"kind": "adapter", "format_version": 1, "created_at": now_iso(), **meta, "sha256": sha},
        )
    return out


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise ArtifactError(f"adapter {path} has no {name}")
    return read_json(path / "metadata.json")


def load_adapter_model(adapter: str | Path, base: Classifier, base_meta: dict[str, Any]):
    """`base` with the adapter at `adapter` applied (a peft.PeftModel in eval mode).

    Refuses an adapter trained on another base model or whose weights file was altered."""
    from models.lora import load_adapter

    meta = read_adapter_meta(adapter)
    if meta.get("base_model") and meta["base_model"] != model_id(base_meta):
        raise ArtifactError(f"adapter {adapter} was trained on {meta['base_model']}, not on {model_id(base_meta)}")
    if meta.get("sha256") and file_sha256(Path(adapter) / "adapter_model.safetensors") != meta["sha256"]:
        raise ArtifactError(f"adapter {adapter}: adapter_model.safetensors does not match its recorded sha256")
    if int(meta.get("num_classes", base.num_classes)) != base.num_classes:
        base.reset_head(int(meta["num_classes"]))
    return load_adapter(base, str(adapter)).eval(), meta


def preprocessing_of(meta: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])
