"""Merge an adapter into its base and export to ONNX with two outputs: logits and the embedding.

The ONNX model is checked against the torch model it came from (max |logit diff| <= 1e-4 in fp32) before
anyone may use it; a file that fails the check is never written in place.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.classifier import Classifier

ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


class _WithEmbedding(nn.Module):
    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_embedding(x)


def merged_classifier(model: nn.Module) -> Classifier:
    """A plain Classifier with the adapter folded into the weights (peft merge_and_unload on a copy)."""
    if isinstance(model, Classifier):
        return model.eval()
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    return merged.eval()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of engine logits, in their dtype: how the service turns logits into the probabilities it
    returns and records, and so how a drift reference must compute them too."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def onnx_providers() -> list[str]:
    """CUDA when both torch and ONNX Runtime can use it, else CPU."""
    import onnxruntime as ort  # only sessions need ONNX Runtime; export, merge and softmax do not

    available = ort.get_available_providers()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort  # see onnx_providers

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=onnx_providers())


def verify(model: Classifier, sess, size: int, n: int = 4, seed: int = 0) -> float:
    """Max |logit diff| between torch and ONNX Runtime on seeded random inputs; raises above tolerance."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref_logits, ref_emb = model.forward_with_embedding(x)
    logits, emb = sess.run(None, {"input": x.numpy()})
    diff = float(np.abs(logits - ref_logits.numpy()).max())
    scale = float(np.abs(ref_logits.numpy()).max())
    # fp32 kernels reorder sums; allow the absolute tolerance or the same relative to large logits
    if diff > max(ONNX_TOLERANCE, ONNX_TOLERANCE * scale):
        raise ExportError(
            f"ONNX logits differ from torch by {diff:.2e} (tolerance {ONNX_TOLERANCE:g}, scale {scale:.1f})"
        )
    return diff


def exporter_id() -> str:
    """What an export's bytes depend on besides the model and the input size: the opset and the exporter's version."""
    return f"opset{ONNX_OPSET}-torch{torch.__version__}"


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's state: every parameter and buffer (name, dtype, shape, bytes) in name order. With the
    model's id and exporter_id() it names the ONNX file an export of the model writes (models/derived.py)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes of any dtype (numpy has no bfloat16)
    return h.hexdigest()


def export_onnx(model: nn.Module, out: str | Path, size: int) -> float:
    """Export `model` (Classifier or PeftModel) merged, verify it, then move it into place. Returns the diff."""
    out = Path(out)
    merged = merged_classifier(model).cpu()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is deprecated
        torch.onnx.export(
            _WithEmbedding(merged).eval(),
            (torch.zeros(1, 3, size, size),),
            str(tmp),
            input_names=["input"],
            output_names=["logits", "embedding"],
            dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}, "embedding": {0: "n"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    try:
        diff = verify(merged, session(tmp), size)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return diff
