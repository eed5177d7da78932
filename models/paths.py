"""Where state lives. One source of truth: ADAPTSERVE_HOME (default ./.adaptserve), read through models.settings."""

from __future__ import annotations

from pathlib import Path

from models import settings

DEFAULT_MODEL_NAME = "digits-resnet18"


def home() -> Path:
    """The absolute state directory, read at call time (tests and the CLI set the variable before calling)."""
    return settings.load().home.resolve()


def models_dir() -> Path:
    return home() / "models"


def default_model_dir() -> Path:
    """The embedded default source model (`adaptserve pretrain` builds it)."""
    return models_dir() / DEFAULT_MODEL_NAME
