"""Engines: ONNX and torch agree, the ONNX export is verified, the LRU bounds what is loaded."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifacts import load_model
from models.export import ExportError, export_onnx, session, verify
from models.metadata import BASE
from models.registry import open_registry
from service.engine import OnnxEngine, TorchEngine


def _engines(source_model: Path, home: Path, max_loaded: int = 8):
    base, meta = load_model(source_model)
    onnx = OnnxEngine(copy.deepcopy(base), meta, home / "onnx-cache", max_loaded)
    torch_engine = TorchEngine(copy.deepcopy(base), meta, max_loaded, device="cpu")
    return onnx, torch_engine


def test_onnx_and_torch_engines_agree_on_a_mixed_batch(source_model: Path, service_home: Path) -> None:
    registry = open_registry(service_home)
    onnx, eager = _engines(source_model, service_home)
    keys = [("site-a", 1), ("site-a", 2), ("site-b", 1)]
    for key in keys:
        for engine in (onnx, eager):
            engine.load(key, registry.path(*key))
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    rows = [BASE, keys[0], keys[1], keys[2], keys[0], BASE, keys[2]]
    lo, eo = onnx.run(x, rows)
    lt, et = eager.run(x, rows)
    np.testing.assert_allclose(lo, lt, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(eo, et, atol=1e-4, rtol=1e-4)
    # different adapter versions really give different outputs, and a row does not depend on its batch mates
    assert np.abs(lo[1] - lo[2]).max() > 1e-3
    alone, _ = onnx.run(x[2:3], [keys[1]])
    np.testing.assert_allclose(alone[0], lo[2], atol=1e-5)


def test_lru_keeps_at_most_max_loaded_adapter_versions(source_model: Path, service_home: Path) -> None:
    registry = open_registry(service_home)
    onnx, _ = _engines(source_model, service_home, max_loaded=2)
    for key in [("site-a", 1), ("site-a", 2), ("site-b", 1)]:
        onnx.load(key, registry.path(*key))
    assert onnx.loaded() == [BASE, ("site-a", 2), ("site-b", 1)]
    assert onnx.evictions == 1
    with pytest.raises(KeyError):
        onnx.run(np.zeros((1, 3, 32, 32), np.float32), [("site-a", 1)])


def test_export_refuses_a_graph_that_does_not_match(source_model: Path, tmp_path: Path) -> None:
    model, _ = load_model(source_model)
    export_onnx(model, tmp_path / "m.onnx", 32)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head[1].bias += 1e-2
    with pytest.raises(ExportError, match=r"ONNX logits differ from torch by 1\.\d+e-02"):
        verify(other, session(tmp_path / "m.onnx"), 32)
    assert verify(model, session(tmp_path / "m.onnx"), 32) <= 1e-4


def test_onnx_sessions_block_instead_of_spinning_by_default(source_model: Path, tmp_path: Path) -> None:
    """Idle intra-op threads that spin steal the cores of the next session in a mixed batch (engine.py)."""
    base, meta = load_model(source_model)
    engine = OnnxEngine(base, meta, tmp_path / "onnx-cache", threads=1)
    options = engine._sessions[BASE].get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 1
    logits, emb = engine.run(np.zeros((2, 3, 32, 32), np.float32), [BASE, BASE])
    assert logits.shape == (2, 10) and emb.shape == (2, 512)
