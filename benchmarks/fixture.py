"""The serve bench's fixture: a random-init resnet18 base and N random LoRA adapters published in a temp home.

A random-init model has no accuracy of its own; what matters here is the graph (resnet18, 10 classes, the
preprocessing of `size`) and that every adapter is a real registry version, published as the service would.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from benchmarks.loadgen import make_jpegs
from models.artifacts import load_model, save_model
from models.classifier import build_classifier
from models.metadata import ModelMeta
from models.preprocessing import Preprocessing
from models.registry import open_registry
from models.samples import sample_path, save_samples
from pipelines.release import make_random_adapter, publish


def build_base(out: Path, size: int, seed: int = 0) -> Path:
    """A random-init resnet18 with 10 classes and ImageNet-style preprocessing at `size` (224: resize 256)."""
    torch.manual_seed(seed)
    prep = Preprocessing() if size == 224 else Preprocessing.for_size(size)
    model = build_classifier("resnet18", 10).eval()
    meta = ModelMeta.for_model(model, classes=[str(i) for i in range(10)], preprocessing=prep, name=out.name,
                               strategy="random-init", config={"benchmark": True, "seed": seed}, metrics={})
    save_model(model, meta, out)
    write_samples(out)
    return out


def write_samples(base_dir: Path, n: int = 64) -> None:
    """Labelled samples for the int8 engine to calibrate on and be measured with: photo-like images of the kind
    the clients send (other seeds), labelled by the fp32 model itself. A random-init model has no accuracy of its
    own: against these labels fp32 scores 100% and int8 scores its top-1 agreement with fp32. `n` is kept small:
    every published adapter computes its drift reference and its int8 measurement from them (~8 s each at 224)."""
    model, meta = load_model(base_dir)
    size, transform = meta.preprocessing.crop_size, meta.preprocessing.eval_transform()
    for kind, seed in (("reference", 101), ("holdout", 202)):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in make_jpegs(n, size, seed=seed)]
        with torch.inference_mode():
            labels = model(torch.stack([transform(im) for im in images])).argmax(1).tolist()
        save_samples(sample_path(base_dir, kind), images, labels, list(meta.classes))


def adapter_names(n: int) -> list[str]:
    """The names `build_home` gives its `n` adapters, in the order it publishes them."""
    return [f"site-{i:02d}" for i in range(n)]


def build_home(
    home: Path,
    base: Path,
    n: int,
    targets: str,
    tick: Callable[[str], None],
    int8: bool = False,
    seconds: list[float] | None = None,
) -> list[str]:
    """`n` adapters with one promoted version each, plus a second version of the first (for the swap phase);
    `int8`: published with their int8 models, as a service running onnx-int8 publishes them. `seconds`, when
    given, gets each publish's wall time (drift reference, estimator, ONNX export and check, int8 build)."""
    logging.getLogger("monitoring.reference").setLevel(logging.ERROR)  # random adapters have no reference samples
    registry = open_registry(home)
    names = adapter_names(n)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        for i, (name, promote) in enumerate([(nm, True) for nm in names] + [(names[0], False)]):
            src = make_random_adapter(base, Path(tmp) / f"{i}", seed=i + 1, targets=targets)
            start = time.perf_counter()
            publish(registry, name, src, base, promote=promote, int8=int8)
            if seconds is not None:
                seconds.append(time.perf_counter() - start)
            tick(name)
    return names
