"""Shared fixtures: tiny seeded data and one small source model trained once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the developer's ./.adaptserve."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded digits source model with its default recipe (6 epochs, ~20 s), trained once per session."""
    from pipelines.adapt import pretrain
    from pipelines.train import TrainConfig

    if os.environ.get("ADAPTSERVE_TEST_SOURCE_MODEL"):  # local iteration: reuse a model `adaptserve pretrain` built
        return Path(os.environ["ADAPTSERVE_TEST_SOURCE_MODEL"])
    out = tmp_path_factory.mktemp("source") / "digits-resnet18"
    pretrain(out, "resnet18", TrainConfig(epochs=6, batch_size=32, patience=3, seed=0))
    return out


@pytest.fixture(scope="session")
def _service_home_template(tmp_path_factory: pytest.TempPathFactory, source_model: Path) -> Path:
    """A service state dir: site-a v1 (champion), v2; site-b v1 (champion); base ONNX pre-built."""
    from models.registry import open_registry
    from pipelines.release import make_random_adapter, publish

    home = tmp_path_factory.mktemp("service-home")
    registry = open_registry(home)
    work = tmp_path_factory.mktemp("adapters")
    for name, seed, promote in [("site-a", 1, True), ("site-a", 2, False), ("site-b", 3, True)]:
        src = make_random_adapter(source_model, work / f"{name}-{seed}", seed)
        publish(registry, name, src, source_model, promote=promote)
    from service.config import ServiceConfig
    from service.runtime import Runtime

    Runtime(ServiceConfig(home=home, base_model=source_model))  # builds and caches the base model's ONNX file
    return home


@pytest.fixture
def service_home(_service_home_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the template, so a test may promote, delete or corrupt freely."""
    import shutil

    home = tmp_path / "svc"
    shutil.copytree(_service_home_template, home)
    monkeypatch.setenv("ADAPTSERVE_HOME", str(home))
    return home
