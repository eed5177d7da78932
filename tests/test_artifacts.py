import json
from pathlib import Path

import pytest
import torch

from models.artifacts import ArtifactError, atomic_dir, load_adapter_model, load_model, save_model
from models.classifier import build_classifier
from models.metadata import ModelMeta
from models.preprocessing import Preprocessing


def _saved(tmp_path: Path, seed: int = 0, name: str = "m") -> Path:
    torch.manual_seed(seed)
    model = build_classifier("resnet18", 3).eval()
    meta = ModelMeta.for_model(model, classes=["a", "b", "c"], preprocessing=Preprocessing.for_size(32))
    return save_model(model, meta, tmp_path / name)


def test_model_round_trip_is_exact(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    model, meta = load_model(path)
    torch.manual_seed(0)
    again = build_classifier("resnet18", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))
    assert meta.backbone == "resnet18" and meta.num_classes == 3 and meta.kind == "model"
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256 recorded in model.json"):
        load_model(path)


def test_bad_metadata_json_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="model.json is not valid JSON"):
        load_model(path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_an_existing_artifact_whole(tmp_path: Path) -> None:
    for content in ("old", "new"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text(content)
    assert (tmp_path / "out" / "f.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_adapter_refuses_another_base(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    meta = {"base_model": "resnet18@000000000000", "classes": ["a", "b", "c"]}
    (adapter / "metadata.json").write_text(json.dumps(meta))
    base, base_meta = load_model(_saved(tmp_path))
    with pytest.raises(ArtifactError, match=f"was trained on resnet18@000000000000, not on {base_meta.model_id}"):
        load_adapter_model(adapter, base, base_meta)


def test_adapter_missing_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    base, base_meta = load_model(_saved(tmp_path))
    with pytest.raises(ArtifactError, match="has no adapter_config.json"):
        load_adapter_model(tmp_path / "adapter", base, base_meta)


def test_saved_model_json_keeps_its_keys_and_loads_typed(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    on_disk = json.loads((path / "model.json").read_text())
    _, meta = load_model(path)
    assert meta.to_dict() == on_disk and meta.model_id == f"resnet18@{on_disk['sha256'][:12]}"
    assert on_disk["kind"] == "model" and on_disk["format_version"] == 1 and on_disk["created_at"]
