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

    out = tmp_path_factory.mktemp("source") / "digits-resnet18"
    pretrain(out, "resnet18", TrainConfig(epochs=6, batch_size=32, patience=3, seed=0))
    return out
