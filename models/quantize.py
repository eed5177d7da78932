"""The int8 engine's models: static int8 quantization of a verified fp32 ONNX file, measured before use.

`build_int8` calibrates activation ranges on a model's own labelled samples (ONNX Runtime's `quantize_static`),
then measures top-1 accuracy of the fp32 and the int8 model on labelled images the calibration did not see,
and writes the int8 file with a report (`int8.json`) of what it measured. Whether a version is then *served* in
int8 is the engine's decision (service/engine.py): only when the measured accuracy drop is within
ADAPTSERVE_INT8_MAX_DROP, so the threshold can change without a rebuild.

The format is chosen by measurement on this project's digits model (359 holdout images, 2026-11-23, AVX2 CPU
without VNNI): QDQ, uint8 activations, int8 per-channel weights with `reduce_range` (7-bit weights) kept
accuracy at 99.72% (fp32 99.72%, 100% top-1 agreement); the same without reduce_range, and uint8 weights
(QOperator), lost 1.7 points (97.8% agreement): AVX2's u8 x s8 multiply-add saturates on full-range weights.
Speed at 224x224 (resnet18, one thread): fp32 39.7 ms, int8 21.0 ms per image.
reduce_range stays on even where the CPU has VNNI/AMX (where full-range weights would not saturate): a file is
measured where it is built and may be served on another machine, and only the 7-bit form is exact on both.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.files import file_sha256, write_atomic
from models.preprocessing import Preprocessing
from models.samples import find_samples, load_samples

INT8_FILE = "model.int8.onnx"
INT8_REPORT = "int8.json"
DEFAULT_MAX_DROP = 0.01  # accuracy points (0.01 = one percentage point)
CALIBRATION_IMAGES = 64
EVAL_IMAGES = 1000
# What build_int8's quantize_static arguments make, in the key of a shared int8 file: change it when they change
FORMAT_ID = "qdq-u8-s8-perchannel-rr"


class QuantizeError(RuntimeError):
    """No int8 model can be built (no labelled samples to calibrate on and measure with)."""


@dataclass(frozen=True)
class Int8Report:
    """What the int8 build measured: top-1 accuracy of both models on the same labelled images."""

    eval_set: str
    n_eval: int
    calibration_set: str
    n_calibration: int
    accuracy_fp32: float
    accuracy_int8: float
    agreement: float  # share of images where int8 and fp32 predict the same class
    max_abs_logit_diff: float
    build_s: float
    format: str = "QDQ u8 activations / s8 per-channel weights, reduce_range"

    @property
    def delta(self) -> float:
        """int8 accuracy minus fp32 accuracy (negative: int8 is worse)."""
        return self.accuracy_int8 - self.accuracy_fp32

    def acceptable(self, max_drop: float) -> bool:
        return self.delta >= -max_drop - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": round(self.delta, 6)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Int8Report:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> Int8Report:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class LabelledArrays:
    """Preprocessed images for calibration, and labelled images (not used to calibrate) to measure on."""

    calibration: np.ndarray
    calibration_set: str
    eval_x: np.ndarray
    eval_y: np.ndarray
    eval_set: str


def _arrays(path: Path, preprocessing: Preprocessing, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = load_samples(path)
    idx = np.arange(len(images))
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).permutation(idx)[:limit])
    transform = preprocessing.eval_transform()

    x = torch.stack([transform(images[i]) for i in idx]).numpy() if len(idx) else np.zeros((0, 3, 1, 1), np.float32)
    return x, np.asarray(labels)[idx]


def labelled_arrays(model_dirs: Sequence[Path | None], preprocessing: Preprocessing, seed: int = 0) -> LabelledArrays:
    """Calibrate on the first `samples/reference.npz` among model_dirs (an adapter's own, then its base's); measure
    on the first `samples/holdout.npz`, or, without one, on the reference images left out of calibration."""
    reference, holdout = _labelled_files(model_dirs)
    if reference is not None and holdout is not None:
        calib, _ = _arrays(reference, preprocessing, CALIBRATION_IMAGES, seed + 1)
        eval_x, eval_y = _arrays(holdout, preprocessing, EVAL_IMAGES, seed)
        return LabelledArrays(calib, _describe(reference), eval_x, eval_y, _describe(holdout))
    # one labelled set: calibrate on a seeded part of it and measure on the rest; a holdout gives calibration its
    # full share and is measured on whole, a reference set gives at most half and is measured on EVAL_IMAGES
    only = reference or holdout
    x, y = _arrays(only, preprocessing, None, seed)
    perm = np.random.default_rng(seed).permutation(len(x))
    if only == holdout:
        n_cal, cap, eval_set = CALIBRATION_IMAGES, None, _describe(only)
    else:
        n_cal, cap = min(CALIBRATION_IMAGES, len(x) // 2), EVAL_IMAGES
        eval_set = f"{_describe(only)}, images not used for calibration"
    rest = perm[n_cal:][:cap]
    return LabelledArrays(x[perm[:n_cal]], _describe(only), x[rest], y[rest], eval_set)


def _labelled_files(model_dirs: Sequence[Path | None]) -> tuple[Path | None, Path | None]:
    """(reference, holdout) samples that labelled_arrays reads, at least one of them; QuantizeError without."""
    reference = find_samples("reference", *model_dirs)
    holdout = find_samples("holdout", *model_dirs)
    if reference is None and holdout is None:
        raise QuantizeError(
            "no labelled samples (samples/reference.npz or samples/holdout.npz) beside the adapter or its base "
            "to calibrate int8 on and measure its accuracy with"
        )
    return reference, holdout


def calibration_recipe(model_dirs: Sequence[Path | None], preprocessing: Preprocessing, seed: int = 0) -> str:
    """What an int8 build's bytes depend on besides its fp32 file: the quantizer and its version, the image counts,
    the seed, and the labelled samples and preprocessing it calibrates on (a digest of them). Part of the key an
    int8 file is shared under (models/derived.py); QuantizeError when there are no samples to build from."""
    import onnxruntime  # its version only; the engine has it loaded already

    reference, holdout = _labelled_files(model_dirs)
    data = json.dumps({"reference": reference and file_sha256(reference), "holdout": holdout and file_sha256(holdout),
                       "preprocessing": asdict(preprocessing)}, sort_keys=True)
    return (f"{FORMAT_ID}:cal{CALIBRATION_IMAGES}:eval{EVAL_IMAGES}:seed{seed}:"
            f"ort{onnxruntime.__version__}:data-{hashlib.sha256(data.encode()).hexdigest()[:16]}")


def _describe(path: Path) -> str:
    """'adapter-dir/samples/holdout.npz' style: which model's which samples."""
    return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"


def _cpu_session(path: Path | str):
    """On the CPU whatever the machine has: the int8 file is measured as a CPU engine serves it (all cores: a
    build is offline work, and results do not depend on the thread count)."""
    import onnxruntime as ort  # only a build opens sessions; the engine imports this module to read reports

    return ort.InferenceSession(str(path), ort.SessionOptions(), providers=["CPUExecutionProvider"])


def _logits(sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def build_int8(fp32_path: Path, out: Path, data: LabelledArrays, report_path: Path | None = None) -> Int8Report:
    """Quantize `fp32_path` into `out` (atomically), measure both models on `data` and save the report at
    `report_path` (default: INT8_REPORT in the directory of `out`)."""
    # heavy, and only a build needs them: the engine imports this module just to read int8 reports
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not len(data.calibration) or not len(data.eval_x):
        raise QuantizeError("int8 needs at least one calibration image and one labelled image to measure on")
    start = time.perf_counter()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(data.calibration[i : i + 1] for i in range(len(data.calibration)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self._rows, None)
            return None if row is None else {"input": row}

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="adaptserve-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre),
            str(q),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
        )
        ref, low = _logits(_cpu_session(fp32_path), data.eval_x), _logits(_cpu_session(q), data.eval_x)
        write_atomic(out, q.read_bytes())
    y = np.asarray(data.eval_y)
    report = Int8Report(
        eval_set=data.eval_set,
        n_eval=len(y),
        calibration_set=data.calibration_set,
        n_calibration=len(data.calibration),
        accuracy_fp32=float((ref.argmax(1) == y).mean()),
        accuracy_int8=float((low.argmax(1) == y).mean()),
        agreement=float((ref.argmax(1) == low.argmax(1)).mean()),
        max_abs_logit_diff=float(np.abs(ref - low).max()),
        build_s=round(time.perf_counter() - start, 2),
    )
    report.save(report_path or out.with_name(INT8_REPORT))
    return report
