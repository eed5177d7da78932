"""Publishing an adapter: check it fits the base, pre-build its verified ONNX model, register it.

Building the ONNX file here (once, off the serving path) is what lets every serving worker swap a new
version in within a second: a worker only opens the session.
"""

from __future__ import annotations

import copy
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from models.artifacts import ADAPTER_FILES, ArtifactError, load_adapter_model, load_model, model_id, read_adapter_meta
from models.export import ONNX_FILE, export_onnx
from models.registry import AdapterRegistry, AdapterVersion


def check_fits(adapter_dir: Path, base_meta: dict[str, Any]) -> dict[str, Any]:
    """The adapter's metadata must name this base and its class list."""
    meta = read_adapter_meta(adapter_dir)
    if meta.get("base_model") != model_id(base_meta):
        raise ArtifactError(
            f"adapter was trained on base {meta.get('base_model')!r}, this service serves {model_id(base_meta)!r}"
        )
    if meta.get("classes") != base_meta["classes"]:
        raise ArtifactError(
            f"adapter classes {meta.get('classes')} differ from the base model's {base_meta['classes']}"
        )
    return meta


def publish(registry: AdapterRegistry, name: str, src: Path, base_dir: Path, promote: bool = False) -> AdapterVersion:
    """Validate `src` against the base at `base_dir`, add a verified model.onnx, register (and promote)."""
    base, base_meta = load_model(base_dir)
    check_fits(src, base_meta)
    with tempfile.TemporaryDirectory(prefix="adaptserve-publish-") as tmp:
        staged = Path(tmp) / "adapter"
        shutil.copytree(src, staged)
        model, _ = load_adapter_model(staged, copy.deepcopy(base), base_meta)
        export_onnx(model, staged / ONNX_FILE, int(base_meta["preprocessing"]["crop_size"]))
        version = registry.register(name, staged)
    if promote:
        registry.promote(name, version.version)
        version = registry.get(name, version.version)
    return version


def _safe_members(names: list[str]) -> None:
    for n in names:
        p = Path(n)
        if p.is_absolute() or ".." in p.parts:
            raise ArtifactError(f"archive member {n!r} escapes the archive; refusing it")


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a .zip or .tar(.gz) adapter upload; return the directory that holds the adapter files."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            _safe_members(z.namelist())
            z.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            _safe_members(t.getnames())
            t.extractall(dest, filter="data")
    else:
        raise ArtifactError("upload is neither a zip nor a tar archive of the adapter directory")
    candidates = [dest, *[d for d in dest.rglob("*") if d.is_dir()]]
    for d in candidates:
        if all((d / f).is_file() for f in ADAPTER_FILES):
            return d
    raise ArtifactError(f"archive holds no directory with {', '.join(ADAPTER_FILES)}")


def make_random_adapter(base_dir: Path, out: Path, seed: int, targets: str = "all", scale: float = 0.02) -> Path:
    """An untrained LoRA adapter with random (non-zero) weights and a random head, for benchmarks and tests.

    peft initialises LoRA's B matrices to zero, which would make every adapter equal to its base; these get
    small random values so different adapters (and versions) really give different outputs.
    """
    import torch

    from models.artifacts import save_adapter
    from models.strategies import AdaptConfig, adapt

    torch.manual_seed(seed)
    base, base_meta = load_model(base_dir)
    adaptation = adapt(base, AdaptConfig(strategy="lora", lora_targets=targets), base.num_classes)
    with torch.no_grad():
        for name, p in adaptation.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    meta = {
        "backbone": base_meta["backbone"],
        "classes": base_meta["classes"],
        "num_classes": len(base_meta["classes"]),
        "preprocessing": base_meta["preprocessing"],
        "strategy": "lora",
        "config": {"random": True, "seed": seed},
        "metrics": {},
        "data_fingerprint": None,
        "parent": model_id(base_meta),
        "base_model": model_id(base_meta),
    }
    return save_adapter(adaptation.model, meta, out)
