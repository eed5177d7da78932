"""Where state lives. One source of truth: ADAPTSERVE_HOME (default ./.adaptserve)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "digits-resnet18"


def home() -> Path:
    return Path(os.environ.get("ADAPTSERVE_HOME", ".adaptserve")).resolve()


def models_dir() -> Path:
    return home() / "models"


def default_model_dir() -> Path:
    """The embedded default source model (`adaptserve pretrain` builds it)."""
    return models_dir() / DEFAULT_MODEL_NAME
