"""The ceilings a served model is measured against: the fp32 matmul peak, the model's FLOPs, the engine alone.

roofline = peak / the model's FLOPs per image (torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs
per multiply-add, as the peak does). Peak and engine alone are both measured the same way: one single-threaded
process per core, all at once, each keeping its best of many short runs, summed. Invariant: other load on the
machine only ever lowers them, so a caller measuring twice keeps the higher figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.artifacts import load_model
from models.metadata import BASE
from service.engine import OnnxEngine

_MATMUL = """
import sys, time
import numpy as np
n, seconds = int(sys.argv[1]), float(sys.argv[2])
a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
a @ b
best, deadline = 0.0, time.perf_counter() + seconds
while time.perf_counter() < deadline:
    t = time.perf_counter()
    a @ b
    best = max(best, 2 * n**3 / (time.perf_counter() - t))
print(best / 1e9)
"""
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def matmul_peak_gflops(n: int = 512, seconds: float = 2.0) -> float:
    """fp32 matmul peak of all cores: one single-threaded process per core multiplying n x n float32 matrices
    (numpy's BLAS, 2 n^3 FLOPs per product) at the same time, each keeping its best product; their sum. Separate
    processes rather than one multi-threaded matmul: a thread pool's barriers turn any other load on the machine
    into idle cores, while the best of many short products by independent processes finds the moments the cores
    were free. (torch's single-threaded sgemm reaches the same figure on this machine; numpy starts faster.)"""
    env = {**os.environ, **_ONE_THREAD}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MATMUL, str(n), str(seconds)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(os.cpu_count() or 1)
    ]
    return sum(float(p.communicate(timeout=120)[0]) for p in procs)


def model_gflops(base_dir: Path) -> float:
    """FLOPs per image of the base model at its crop size (a merged adapter has the same graph)."""
    model, meta = load_model(base_dir)
    size = meta.preprocessing.crop_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


_ENGINE = """
import sys, time
import numpy as np
import onnxruntime as ort
path, size, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# service.engine.open_session(path, threads=1), without importing torch for it
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.intra_op_num_threads = 1
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
session.run(None, {"input": x})
best, deadline = float("inf"), time.perf_counter() + seconds
while time.perf_counter() < deadline:
    t = time.perf_counter()
    session.run(None, {"input": x})
    best = min(best, time.perf_counter() - t)
print(1.0 / best)
"""


def engine_img_s(base_dir: Path, cache: Path, seconds: float, precision: str = "fp32") -> float:
    """The ONNX engine alone, the ceiling of the service: one single-threaded session per core (as the benchmark
    deploys it) in as many processes, all at once, each keeping its fastest single-image run; the sum of their
    images per second. Measured like the matmul peak, so that other load on the machine does not lower it."""
    model, meta = load_model(base_dir)
    # exports (and verifies) the base model's ONNX file; int8: quantizes and measures it too
    engine = OnnxEngine(model, meta, cache, threads=1, precision=precision, base_dir=base_dir, int8_max_drop=1.0)
    # the cache names a file <name>-v<version>-<its derived build>.onnx (.int8.onnx): service/engine.py
    int8 = precision == "int8"
    path = next(p for p in Path(cache).rglob(f"{BASE[0]}-v{BASE[1]}-*.onnx") if p.name.endswith(".int8.onnx") == int8)
    size = str(meta.preprocessing.crop_size)
    del engine
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENGINE, str(path), size, str(seconds)],
            env={**os.environ, **_ONE_THREAD},
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(os.cpu_count() or 1)
    ]
    return sum(float(p.communicate(timeout=300)[0]) for p in procs)
