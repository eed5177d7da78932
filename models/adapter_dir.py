"""What the registry accepts as an adapter directory, checked on the staged copy it is about to store.

A PEFT adapter (adapter_config.json, adapter_model.safetensors) plus our metadata.json: each file present, the JSON
files objects, the safetensors header parseable. Checked on the copy in the staging directory, not the source, so
what is stored is exactly what was checked. Errors are InvalidAdapterError (400) naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open

from models.files import write_durable
from models.metadata import ADAPTER_FILES, ADAPTER_META
from models.registry_errors import InvalidAdapterError


def _read_json_object(path: Path, shown: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{shown} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidAdapterError(f"{shown} must contain a JSON object, got {type(data).__name__}")
    return data


def _check_safetensors(path: Path, shown: Path) -> None:
    """Parse the header only: cheap, and catches truncated or non-safetensors files before they are served."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except Exception as e:  # SafetensorError has no stable public import path
        raise InvalidAdapterError(f"{shown} is not a valid safetensors file: {e}") from e


def validate_staged(src: Path, stage: Path) -> dict[str, Any]:
    """Validate the staged copy (not the source) so what we store is exactly what we checked."""
    for fname in ADAPTER_FILES:
        if not (stage / fname).is_file():
            raise InvalidAdapterError(
                f"adapter directory {src} is missing required file {fname!r} (needs {', '.join(ADAPTER_FILES)})"
            )
    _read_json_object(stage / "adapter_config.json", src / "adapter_config.json")
    _check_safetensors(stage / "adapter_model.safetensors", src / "adapter_model.safetensors")
    return _read_json_object(stage / ADAPTER_META, src / ADAPTER_META)


def merge_metadata(stage: Path, file_meta: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Shallow-merge the argument over metadata.json and write it back, so disk and DB tell the same story (an
    AdapterMeta keeps keys it does not know, so a merged file still loads as one)."""
    if not extra:
        return file_meta
    merged = {**file_meta, **extra}
    try:
        text = json.dumps(merged, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidAdapterError(f"metadata argument is not JSON-serializable: {e}") from e
    os.unlink(stage / ADAPTER_META)
    write_durable(stage / ADAPTER_META, text.encode("utf-8"))
    return merged
