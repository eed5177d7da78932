"""Typed artifact metadata: the JSON round trip, unknown keys kept, every file shape ever written still loads."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from models.metadata import (
    BASE,
    BASE_NAME,
    FORMAT_VERSION,
    AdapterMeta,
    ArtifactError,
    ModelMeta,
)
from models.preprocessing import Preprocessing

SHA = "d44d0e673855" + "0" * 52
BASE_ID = "resnet18@d44d0e673855"
CLASSES = [str(i) for i in range(10)]
PREP = {"crop_size": 32, "resize_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
METRICS = {"accuracy": 0.9, "f1": 0.89, "precision": 0.9, "recall": 0.9, "n": 100, "confusion": [[1]]}
FIT = {"seconds": 3.5, "best_epoch": 1, "history": [{"epoch": 0, "val_loss": 0.5}]}
SAVED = {"format_version": 1, "created_at": "2026-11-22T05:21:42+00:00", "sha256": SHA}

# Hand-written copies of every model.json / metadata.json shape the code has written (git history: all of them
# since the first commit share these keys): who wrote it, and what it held.
MODEL_FILES = {
    "pretrain": {  # pipelines/adapt.py pretrain -> save_model
        **SAVED, "kind": "model", "name": "digits-resnet18", "classes": CLASSES, "preprocessing": PREP,
        "head_dropout": 0.0, "strategy": "scratch",
        "config": {"train": {"epochs": 6}, "augment": "light", "data": "sklearn-digits"},
        "metrics": {"test": METRICS}, "data_fingerprint": "a2b277d339d2632b", "parent": None, "fit": FIT,
        "backbone": "resnet18", "num_classes": 10,
    },
    "adapt-finetune": {  # pipelines/adapt.py adapt_model, a strategy other than lora: a full model
        **SAVED, "kind": "model", "backbone": "resnet18", "classes": ["a", "b"], "preprocessing": PREP,
        "head_dropout": 0.2, "strategy": "finetune", "config": {"adapt": {"strategy": "finetune"}},
        "metrics": {"target_test": METRICS, "source_test": None}, "data_fingerprint": "ff00", "parent": BASE_ID,
        "trainable_params": 11000000, "total_params": 11000000, "fit": FIT, "num_classes": 2,
    },
    "bench-random-init": {  # benchmarks/serve.py build_base
        **SAVED, "kind": "model", "name": "bench-resnet18-64", "classes": CLASSES, "preprocessing": PREP,
        "head_dropout": 0.0, "strategy": "random-init", "config": {"benchmark": True, "seed": 0}, "metrics": {},
        "data_fingerprint": None, "parent": None, "backbone": "resnet18", "num_classes": 10,
    },
    "test-fixture": {**SAVED, "kind": "model", "classes": ["a", "b", "c"], "preprocessing": PREP,  # no recipe at all
                     "backbone": "resnet18", "num_classes": 3},
}
_ADAPTER = {**SAVED, "kind": "adapter", "backbone": "resnet18", "classes": CLASSES, "num_classes": 10,
            "preprocessing": PREP, "strategy": "lora", "base_model": BASE_ID}
ADAPTER_FILES = {
    "adapt-lora": {  # pipelines/adapt.py adapt_model --strategy lora
        **_ADAPTER, "head_dropout": 0.1, "config": {"adapt": {"lora_r": 8}, "augment": "light"},
        "metrics": {"target_test": METRICS, "source_test": METRICS}, "data_fingerprint": "ab12", "parent": BASE_ID,
        "trainable_params": 21000, "total_params": 11200000, "fit": FIT,
    },
    "random": {  # pipelines/release.py make_random_adapter
        **_ADAPTER, "config": {"random": True, "seed": 3}, "metrics": {}, "data_fingerprint": None,
        "parent": BASE_ID,
    },
    "retrain": {  # pipelines/retrain.py _adapter_meta
        **_ADAPTER, "head_dropout": 0.0, "parent": "site@v1", "config": {"retrain": {"margin": 1.0}},
        "metrics": {"target_test": METRICS, "source_test": METRICS, "gate": {"replay": 50}},
        "data_fingerprint": "cd34",
    },
    "bench-retrain": {  # benchmarks/retrain.py _clean_champion
        **_ADAPTER, "parent": BASE_ID, "config": {"bench": "clean site champion"}, "metrics": {},
    },
    "registry-merged": {  # registry.register(..., metadata={...}) shallow-merges keys of its own over the file
        **_ADAPTER, "parent": BASE_ID, "metrics": {"accuracy": 0.95}, "notes": "relabelled", "owner": {"team": 7},
    },
    "minimal-upload": {"base_model": BASE_ID, "classes": CLASSES},  # the least an uploaded adapter carries
}


def _write(tmp_path: Path, name: str, data: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def _keeps_every_key(original: dict[str, Any], written: dict[str, Any]) -> None:
    assert {k: written[k] for k in original} == original


@pytest.mark.parametrize("shape", list(MODEL_FILES), ids=list(MODEL_FILES))
def test_every_model_json_ever_written_loads(tmp_path: Path, shape: str) -> None:
    data = MODEL_FILES[shape]
    meta = ModelMeta.read(_write(tmp_path, "model.json", data))
    assert meta.backbone == "resnet18" and meta.classes == tuple(data["classes"])
    assert meta.num_classes == data["num_classes"] and meta.model_id == BASE_ID
    assert meta.preprocessing == Preprocessing.for_size(32)
    assert meta.scores("test") == data.get("metrics", {}).get("test", {})
    _keeps_every_key(data, meta.to_dict())


@pytest.mark.parametrize("shape", list(ADAPTER_FILES), ids=list(ADAPTER_FILES))
def test_every_adapter_metadata_json_ever_written_loads(tmp_path: Path, shape: str) -> None:
    data = ADAPTER_FILES[shape]
    meta = AdapterMeta.read(_write(tmp_path, "metadata.json", data))
    assert meta.base_model == BASE_ID and meta.classes == tuple(CLASSES) and meta.num_classes == 10
    assert meta.scores("target_test") == (data.get("metrics") or {}).get("target_test", {})
    _keeps_every_key(data, meta.to_dict())


def test_optional_keys_an_old_file_lacks_get_defaults() -> None:
    meta = AdapterMeta.from_dict(ADAPTER_FILES["minimal-upload"])
    assert (meta.strategy, meta.head_dropout, meta.config, meta.metrics, meta.parent, meta.sha256) == (
        None, 0.0, {}, {}, None, None)
    assert meta.format_version == FORMAT_VERSION == 1 and meta.extra == {}


def test_null_reads_as_the_default() -> None:
    meta = AdapterMeta.from_dict({**ADAPTER_FILES["random"], "metrics": None, "config": None, "head_dropout": None})
    assert (meta.metrics, meta.config, meta.head_dropout, meta.scores("target_test")) == ({}, {}, 0.0, {})


def test_unknown_keys_survive_load_and_save() -> None:
    newer = {**MODEL_FILES["pretrain"], "format_version": 2, "calibration": {"temperature": 1.3}, "tags": ["a"]}
    meta = ModelMeta.from_dict(newer)
    assert meta.extra == {"calibration": {"temperature": 1.3}, "tags": ["a"]} and meta.format_version == 2
    assert ModelMeta.from_json(meta.to_json()).to_dict() == meta.to_dict()
    _keeps_every_key(newer, json.loads(meta.to_json()))


@pytest.mark.parametrize("cls", [ModelMeta, AdapterMeta], ids=["model", "adapter"])
def test_round_trip_is_exact(cls: type) -> None:
    data = MODEL_FILES["pretrain"] if cls is ModelMeta else ADAPTER_FILES["adapt-lora"]
    meta = cls.from_dict(data)
    assert cls.from_dict(meta.to_dict()) == meta
    assert cls.from_json(meta.to_json()) == meta
    assert json.loads(meta.to_json()) == meta.to_dict()


@pytest.mark.parametrize("cls", [ModelMeta, AdapterMeta], ids=["model", "adapter"])
def test_to_dict_writes_every_field(cls: type) -> None:
    data = MODEL_FILES["test-fixture"] if cls is ModelMeta else ADAPTER_FILES["minimal-upload"]
    written = cls.from_dict(data).to_dict()
    assert set(written) == {f.name for f in fields(cls)} - {"extra"} | {"kind", "num_classes"}


@pytest.mark.parametrize(
    ("cls", "data", "key"),
    [
        pytest.param(ModelMeta, MODEL_FILES["pretrain"], "backbone", id="model-backbone"),
        pytest.param(ModelMeta, MODEL_FILES["pretrain"], "classes", id="model-classes"),
        pytest.param(ModelMeta, MODEL_FILES["pretrain"], "preprocessing", id="model-preprocessing"),
        pytest.param(AdapterMeta, ADAPTER_FILES["random"], "base_model", id="adapter-base-model"),
        pytest.param(AdapterMeta, ADAPTER_FILES["random"], "classes", id="adapter-classes"),
    ],
)
def test_a_missing_required_key_names_the_file_and_the_key(tmp_path: Path, cls: type, data: dict, key: str) -> None:
    path = _write(tmp_path, cls.file, {k: v for k, v in data.items() if k != key}) / cls.file
    with pytest.raises(ArtifactError) as err:
        cls.read(tmp_path)
    assert str(err.value) == f"{path} is missing required key {key!r}"


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        pytest.param(ModelMeta, [1, 2], "model.json must contain a JSON object, got list", id="not-an-object"),
        pytest.param(ModelMeta, {**MODEL_FILES["pretrain"], "num_classes": 9},
                     "model.json says num_classes 9 but lists 10 classes", id="num-classes-disagrees"),
        pytest.param(AdapterMeta, {**ADAPTER_FILES["random"], "kind": "model"},
                     "metadata.json has kind 'model', expected 'adapter'", id="wrong-kind"),
        pytest.param(AdapterMeta, {**ADAPTER_FILES["random"], "classes": "0123456789"},
                     "metadata.json: 'classes' must be a list of class names, got '0123456789'", id="classes-string"),
        pytest.param(ModelMeta, {**MODEL_FILES["pretrain"], "head_dropout": "high"},
                     "model.json: 'head_dropout' is not valid: 'high'", id="bad-number"),
        pytest.param(ModelMeta, {**MODEL_FILES["pretrain"], "preprocessing": {"crop_size": 32}},
                     "model.json: 'preprocessing' is not a preprocessing record (KeyError: 'resize_size'): "
                     "{'crop_size': 32}", id="preprocessing-incomplete"),
    ],
)
def test_malformed_files_are_refused_with_a_sentence(cls: type, data: Any, message: str) -> None:
    with pytest.raises(ArtifactError) as err:
        cls.from_dict(data)
    assert str(err.value) == message


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"metadata.json is not valid JSON: Expecting property name"):
        AdapterMeta.read(tmp_path)


def test_adapter_builder_takes_identity_and_defaults_from_the_base() -> None:
    base = ModelMeta.from_dict(MODEL_FILES["pretrain"])
    meta = AdapterMeta.for_base(base, config={"random": True}, metrics={"target_test": METRICS})
    assert (meta.base_model, meta.parent, meta.backbone, meta.classes) == (BASE_ID, BASE_ID, "resnet18",
                                                                           tuple(CLASSES))
    assert meta.preprocessing == PREP and meta.strategy == "lora" and meta.scores("target_test") == METRICS
    other = AdapterMeta.for_base(base, classes=["a", "b"], parent="site@v1", head_dropout=0.1)
    assert (other.classes, other.num_classes, other.parent, other.head_dropout) == (("a", "b"), 2, "site@v1", 0.1)


def test_model_builder_takes_the_backbone_from_the_model() -> None:
    from models.classifier import build_classifier

    model = build_classifier("resnet18", 3)
    meta = ModelMeta.for_model(model, classes=["a", "b", "c"], preprocessing=Preprocessing.for_size(32),
                               strategy="scratch")
    assert (meta.backbone, meta.num_classes, meta.strategy, meta.sha256) == ("resnet18", 3, "scratch", None)
    with pytest.raises(ValueError, match=r"^the model has 3 outputs but 2 classes were given$"):
        ModelMeta.for_model(model, classes=["a", "b"], preprocessing=Preprocessing.for_size(32))


def test_an_unsaved_model_has_no_identity() -> None:
    meta = replace(ModelMeta.from_dict(MODEL_FILES["pretrain"]), sha256=None)
    with pytest.raises(ArtifactError, match=r"^model.json of this resnet18 has no sha256: it was never saved$"):
        _ = meta.model_id


def test_extra_may_not_shadow_a_field() -> None:
    with pytest.raises(ValueError, match=r"^extra must hold unknown keys only; kind, parent are fields$"):
        AdapterMeta(base_model=BASE_ID, classes=("0",), extra={"parent": "x", "kind": "model", "ok": 1})


@pytest.mark.parametrize("cls", [ModelMeta, AdapterMeta], ids=["model", "adapter"])
def test_every_field_says_what_it_holds(cls: type) -> None:
    assert all(f.metadata.get("help") for f in fields(cls)), [f.name for f in fields(cls) if not f.metadata]


def test_base_is_defined_once() -> None:
    from service import engine, runtime

    assert BASE == (BASE_NAME, 0) == ("base", 0)
    assert engine.BASE is BASE and runtime.BASE is BASE


def test_metadata_is_read_without_torch() -> None:
    code = ("import sys, models.metadata as m; m.AdapterMeta.from_dict({'base_model': 'x@1', 'classes': ['a']}); "
            "import models.registry, models.archive; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
