"""Releasing an adapter version: check it fits the base, pre-build its verified ONNX model (and int8 model) and
its drift reference (monitoring/reference.py), register it.

Building the ONNX file here (once, off the serving path) is what lets every serving worker swap a new
version in within a second: a worker only opens the session. The drift reference (`reference.npz`, a
monitoring.detectors.ReferenceSet) is built here too, from the same merged model, so the registry records its
sha256 with the weights and a monitor compares traffic with exactly what this version was trained on.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch

from models import settings
from models.archive import ArchiveLimits, extract
from models.artifacts import ArtifactError, load_adapter_model, load_model, read_adapter_meta, save_adapter
from models.export import ONNX_FILE, export_onnx, merged_classifier
from models.metadata import AdapterMeta, ModelMeta
from models.quantize import INT8_FILE, INT8_REPORT, QuantizeError, build_int8, labelled_arrays
from models.registry import AdapterRegistry, AdapterVersion
from models.strategies import AdaptConfig, adapt
from monitoring.reference import REFERENCE_FILE, write_reference

log = logging.getLogger(__name__)


def check_fits(adapter_dir: Path, base_meta: ModelMeta) -> AdapterMeta:
    """The adapter's metadata must name this base and its class list."""
    meta = read_adapter_meta(adapter_dir)
    if meta.base_model != base_meta.model_id:
        raise ArtifactError(
            f"adapter was trained on base {meta.base_model!r}, this service serves {base_meta.model_id!r}"
        )
    if meta.classes != base_meta.classes:
        raise ArtifactError(
            f"adapter classes {list(meta.classes)} differ from the base model's {list(base_meta.classes)}"
        )
    return meta


def wants_int8() -> bool:
    """Publishing for a service that runs the int8 engine (ADAPTSERVE_ENGINE=onnx-int8 in this environment: the
    service's own register route and the retrain jobs it starts inherit it)."""
    return settings.load().engine == "onnx-int8"


def prebuild_int8(staged: Path, base_dir: Path, base_meta: ModelMeta) -> None:
    """model.int8.onnx + int8.json beside model.onnx, so that a worker running onnx-int8 only opens a session when
    this version is promoted. Without labelled samples there is nothing to calibrate on: the worker serves fp32."""
    try:
        data = labelled_arrays([staged, Path(base_dir)], base_meta.preprocessing)
    except QuantizeError as err:
        log.warning("%s: no int8 model: %s", staged, err)
        return
    report = build_int8(staged / ONNX_FILE, staged / INT8_FILE, data, staged / INT8_REPORT)
    log.info("int8: top-1 %.4f (fp32 %.4f) on %s", report.accuracy_int8, report.accuracy_fp32, report.eval_set)


def publish(
    registry: AdapterRegistry, name: str, src: Path, base_dir: Path, promote: bool = False, int8: bool | None = None
) -> AdapterVersion:
    """Validate `src` against the base at `base_dir`, add a verified model.onnx and the drift reference.npz,
    register (and promote).

    The reference is computed from the adapter's own samples/reference.npz (its training/validation images,
    written by `adaptserve train`) or, when it has none, from the base model's (the source validation split).
    `int8` (default: wants_int8()) also prebuilds the measured int8 model (models/quantize.py).
    """
    base, base_meta = load_model(base_dir)
    check_fits(src, base_meta)
    with registry.staging() as tmp:  # under the registry home: a killed publish's dir is swept, not leaked
        staged = tmp / "adapter"
        shutil.copytree(src, staged)
        model, _ = load_adapter_model(staged, copy.deepcopy(base), base_meta)
        merged = merged_classifier(model)  # merged once for both the ONNX file and the reference
        export_onnx(merged, staged / ONNX_FILE, base_meta.preprocessing.crop_size)
        for stale in (REFERENCE_FILE, INT8_FILE, INT8_REPORT):  # never register a stale copy from src
            (staged / stale).unlink(missing_ok=True)
        if wants_int8() if int8 is None else int8:
            prebuild_int8(staged, Path(base_dir), base_meta)
        write_reference(merged, [staged, Path(base_dir)], base_meta.preprocessing, staged / REFERENCE_FILE)
        version = registry.register(name, staged)  # after the reference: its sha256 is recorded with the rest
    if promote:
        registry.promote(name, version.version)
        version = registry.get(name, version.version)
    return version


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a .zip or .tar(.gz) adapter upload under the ADAPTSERVE_ARCHIVE_* limits; return the directory that
    holds the adapter files (models/archive.py: extract)."""
    return extract(archive, dest, ArchiveLimits.from_env())


def make_random_adapter(base_dir: Path, out: Path, seed: int, targets: str = "all", scale: float = 0.02) -> Path:
    """An untrained LoRA adapter with random (non-zero) weights and a random head, for benchmarks and tests.

    peft initialises LoRA's B matrices to zero, which would make every adapter equal to its base; these get
    small random values so different adapters (and versions) really give different outputs.
    """
    torch.manual_seed(seed)
    base, base_meta = load_model(base_dir)
    adaptation = adapt(base, AdaptConfig(strategy="lora", lora_targets=targets), base.num_classes)
    with torch.no_grad():
        for name, p in adaptation.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    meta = AdapterMeta.for_base(base_meta, config={"random": True, "seed": seed})
    return save_adapter(adaptation.model, meta, out)
