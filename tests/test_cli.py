"""The command line reads well (issue 12): help printed as written, flags without a value placeholder, tables
that fit 80 columns, defaults from one source (config dataclasses, settings), errors that name settings and real
flags, and `train --backbone/--weights` from a torchvision backbone."""

from __future__ import annotations

import dataclasses
import re
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
import torch
import torchvision
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from models import settings
from models.catalog import CATALOG, build_backbone
from models.strategies import AdaptConfig
from pipelines.cli import app
from pipelines.data import ImageSet, digits_splits, per_class_subset, write_image_folder
from pipelines.train import TrainConfig

WIDE = {"COLUMNS": "200"}  # rich output unwrapped: assertions read whole lines


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    # terminal_width: click's help too (CliRunner forces 80 columns, and a wrap may break "no-promote" at its hyphen)
    result = CliRunner().invoke(app, list(args), env=env or WIDE, terminal_width=200)
    return result.exit_code, result.output


def flat(text: str) -> str:
    return " ".join(text.split())


def _commands(group: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """Two classes, six 32x32 digits each: enough for one epoch of anything."""
    subset = per_class_subset(digits_splits(32).test, 6, seed=0)
    keep = [i for i, label in enumerate(subset.labels) if label < 2]
    images = ImageSet([subset.images[i] for i in keep], [subset.labels[i] for i in keep], subset.classes[:2])
    return write_image_folder({"": images}, tmp_path / "tiny")


# --------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (("adapters", "register"), "adapter name: [a-z0-9][a-z0-9-_]{0,63}"),
        (("pretrain",), "[default: $ADAPTSERVE_HOME/models/digits-resnet18]"),
        (("train",), "[default: $ADAPTSERVE_HOME/runs/<strategy>-<time>]"),
        (("train",), "[default: $ADAPTSERVE_BASE_MODEL, else the embedded digits model]"),
        (("serve",), "[default: $ADAPTSERVE_ENGINE, else onnx]"),
        (("serve",), "[default: $ADAPTSERVE_WORKERS, else 1]"),
        (("jobs", "runner"), "[default: $ADAPTSERVE_BASE_MODEL or embedded]"),
        (("demo",), "[default: $ADAPTSERVE_ADMIN_TOKEN]"),
    ],
    ids=["register-name", "pretrain-out", "train-out", "train-base", "serve-engine", "serve-workers", "runner-base",
         "demo-token"],
)
def test_help_text_is_printed_as_written(command: tuple[str, ...], text: str) -> None:
    code, out = invoke(*command, "--help")
    assert code == 0 and text in flat(out), out


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "adaptserve" for c in COMMANDS])
def test_no_help_shows_a_value_placeholder_for_a_flag(command: tuple[str, ...]) -> None:
    code, out = invoke(*command, "--help")
    assert code == 0, out
    assert "<bool>" not in out
    assert re.search(r"^\s+--help\s+Show this message and exit\.$", out, re.MULTILINE), out


def test_a_boolean_option_reads_as_a_pair_of_flags() -> None:
    code, out = invoke("adapters", "register", "--help")
    assert code == 0 and "--promote / --no-promote make it the champion right away [default: no-promote]" in flat(out)


def test_catalog_shows_every_column_whole_at_80_columns() -> None:
    code, out = invoke("catalog", env={"COLUMNS": "80"})
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out
    header = next(line for line in out.splitlines() if "backbone" in line)
    assert all(name in header for name in ("backbone", "weights", "feature dim", "stages", "input")), header
    for spec in CATALOG.values():
        row = next(line for line in out.splitlines() if f" {spec.name} " in line)
        assert spec.default_weights.name in row and f" {spec.feature_dim} " in row and "224 (ImageNet)" in row, row


# --------------------------------------------------------------------------------------------- one source


def _options(*command: str) -> dict[str, click.Parameter]:
    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    return {p.name: p for p in group.params}


@pytest.mark.parametrize("cls", [TrainConfig, AdaptConfig], ids=["TrainConfig", "AdaptConfig"])
def test_train_options_take_default_and_help_from_the_config_dataclasses(cls: type) -> None:
    options = _options("train")
    mirrored = [f for f in dataclasses.fields(cls) if f.name in options]
    assert len(mirrored) >= 7
    for f in mirrored:
        assert (options[f.name].default, options[f.name].help) == (f.default, f.metadata["help"]), f.name


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ADAPTSERVE_WORKERS", "abc", "ADAPTSERVE_WORKERS='abc' is not an integer (default 1)"),
        ("ADAPTSERVE_ENGINE", "tpu",
         "ADAPTSERVE_ENGINE='tpu' must be one of onnx, onnx-int8 or torch (default onnx)"),
    ],
    ids=["workers", "engine"],
)
def test_serve_reads_its_settings_and_names_the_variable_it_refuses(variable: str, value: str, message: str) -> None:
    code, out = invoke("serve", env={**WIDE, variable: value})
    assert (code, flat(out)) == (2, f"error: {message}")


def test_an_adapter_registers_on_the_base_model_setting_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.release

    seen: list[Path] = []

    def publish(registry, name: str, src: Path, base: Path, promote: bool) -> SimpleNamespace:
        seen.append(base)
        return SimpleNamespace(version=1, is_champion=promote)

    monkeypatch.setattr(pipelines.release, "publish", publish)
    monkeypatch.setenv(settings.env_name("base_model"), str(tmp_path / "my-base"))
    code, out = invoke("adapters", "register", "site", str(tmp_path))
    assert (code, flat(out), seen) == (0, "registered site v1", [tmp_path / "my-base"])


# --------------------------------------------------------------------------------------------- train --backbone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "resnet18", "--base", "x"], "give --base (adapt an existing base model) or --backbone"),
        (["--weights", "imagenet"], "--weights goes with --backbone"),
        (["--backbone", "resnet7"], "--backbone 'resnet7': choose one of resnet18, resnet50,"),
        (["--backbone", "resnet18", "--weights", "imagenet21k"], "--weights 'imagenet21k': choose imagenet"),
        (["--strategy", "[red]lora"], "unknown strategy '[red]lora'; choose one of"),
    ],
    ids=["backbone-and-base", "weights-alone", "unknown-backbone", "unknown-weights", "markup-in-a-message"],
)
def test_train_refuses_what_it_cannot_do_with_a_sentence(tiny_folder: Path, args: list[str], message: str) -> None:
    code, out = invoke("train", "--data", str(tiny_folder), *args)
    assert code == 2 and flat(out).startswith(f"error: {message}"), out


def test_imagenet_weights_offline_name_torch_home_and_the_real_flag(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    code, out = invoke("train", "--data", str(tiny_folder), "--backbone", "resnet50", "--weights", "imagenet")
    assert code == 2, out
    text = flat(out)
    assert text.startswith("error: could not load ResNet50_Weights.IMAGENET1K_V2 for resnet50"), text
    assert f"place it at {tmp_path / 'torch' / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth'}" in text
    assert "(TORCH_HOME controls that directory)" in text and "--weights path/to/file.safetensors" in text
    code, out = invoke("train", "--help")
    assert "--weights <str>" in out  # the flag the message names exists


@pytest.mark.slow
def test_train_from_a_local_backbone_checkpoint_then_register_on_its_base(tiny_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "r18.safetensors"
    save_file(build_backbone("resnet18", None).state_dict(), str(checkpoint))
    runs = []
    for k in range(2):  # the second run reuses the base the first one built: one base, two adapters
        runs.append(tmp_path / f"run{k}")
        args = ["--data", str(tiny_folder), "--backbone", "resnet18", "--weights", str(checkpoint)]
        code, out = invoke("train", *args, "--epochs", "1", "--batch-size", "8", "--out", str(runs[-1]))
        assert code == 0, out
        [base] = re.findall(r"^base model (\S+): register its adapters with --base \1,", out, re.MULTILINE)
    assert Path(base).parent.name == "models" and Path(base).name.startswith("resnet18-r18-")
    for k, run in enumerate(runs, 1):
        code, out = invoke("adapters", "register", "site-x", str(run), "--base", base)
        assert (code, flat(out)) == (0, f"registered site-x v{k}"), out
