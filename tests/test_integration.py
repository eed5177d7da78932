"""pretrain -> train --strategy lora -> PeftModel.from_pretrained reproduces the logged metrics."""

import json
from pathlib import Path

import pytest
from peft import PeftModel
from typer.testing import CliRunner

from models.artifacts import load_model, read_json
from pipelines.cli import app
from pipelines.compare import CompareConfig, default_target
from pipelines.data import digits_splits
from pipelines.evaluate import evaluate

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_source_model_is_accurate_and_stored_without_pickle(source_model: Path) -> None:
    meta = read_json(source_model / "model.json")
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["metrics"]["test"]["accuracy"] > 0.9
    assert {p.name for p in source_model.iterdir()} == {"model.json", "model.safetensors", "confusion.png", "samples"}
    assert {p.name for p in (source_model / "samples").iterdir()} == {"reference.npz", "replay.npz", "holdout.npz"}


@pytest.fixture(scope="module")
def lora_run(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    # the command's defaults: shifted digits (gaussian_noise 5), 5 labels per class, 15 epochs
    args = ["train", "--strategy", "lora", "--base", str(source_model), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_lora_adapter_is_peft_format(lora_run: Path) -> None:
    names = {p.name for p in lora_run.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
        "confusion.png",
        "metrics.json",
    } <= names
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["base_model_name_or_path"] == "resnet18"
    meta = json.loads((lora_run / "metadata.json").read_text())
    for key in ("backbone", "classes", "strategy", "config", "metrics", "data_fingerprint", "parent", "created_at"):
        assert key in meta, key
    assert meta["trainable_params"] / meta["total_params"] < 0.05


def test_peft_from_pretrained_reproduces_logged_metrics(source_model: Path, lora_run: Path) -> None:
    base, base_meta = load_model(source_model)
    model = PeftModel.from_pretrained(base, str(lora_run)).eval()
    meta = json.loads((lora_run / "metadata.json").read_text())
    target, source = default_target(CompareConfig())
    prep = base_meta.preprocessing
    got = evaluate(model, target.test.with_transform(prep.eval_transform()), target.classes)
    logged = meta["metrics"]["target_test"]
    assert got.accuracy == logged["accuracy"]
    assert got.f1 == pytest.approx(logged["f1"], abs=1e-12)
    assert got.confusion == logged["confusion"]
    with model.disable_adapter():
        plain = evaluate(model, target.test.with_transform(prep.eval_transform()), target.classes)
    assert got.accuracy > plain.accuracy, (got.summary(), plain.summary())  # it adapted to the shifted domain


def test_evaluate_command_on_the_adapter(source_model: Path, lora_run: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--model", str(lora_run), "--base", str(source_model)])
    assert result.exit_code == 0, result.output
    clean = json.loads(result.output)
    logged = json.loads((lora_run / "metadata.json").read_text())["metrics"]["source_test"]
    assert clean["accuracy"] == pytest.approx(logged["accuracy"])


def test_compare_writes_markdown_and_json(source_model: Path, tmp_path: Path) -> None:
    args = [
        "compare",
        "--base",
        str(source_model),
        "--out",
        str(tmp_path),
        "--epochs",
        "2",
        "--strategies",
        "feature-extraction,lora,scratch",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "compare.json").read_text())
    assert [r["strategy"] for r in payload["rows"]] == ["no-adaptation", "feature-extraction", "lora", "scratch"]
    untouched, lora = payload["rows"][0], payload["rows"][2]
    # the shift costs the source model accuracy: it is clean-test accuracy minus shifted-test accuracy
    assert untouched["source"]["accuracy"] > untouched["target"]["accuracy"]
    assert 0 < lora["trainable_pct"] < 5 and lora["source"]["n"] == len(digits_splits(32).test)
    md = (tmp_path / "compare.md").read_text()
    assert "| lora |" in md and "lora beats feature-extraction" in md
