"""Service configuration: every knob is an environment variable with a default, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from models import paths

ENGINES = ("onnx", "torch")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _int(name: str, default: int, low: int = 0) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    home: Path = field(metadata={"env": "ADAPTSERVE_HOME", "help": "state directory (registry, artifacts, captures)"})
    base_model: Path = field(metadata={"env": "ADAPTSERVE_BASE_MODEL", "help": "base model dir (model.json)"})
    engine: str = field(default="onnx", metadata={"env": "ADAPTSERVE_ENGINE", "help": "onnx or torch"})
    admin_token: str = field(
        default="", metadata={"env": "ADAPTSERVE_ADMIN_TOKEN", "help": "bearer token for admin routes"}
    )
    max_images: int = field(default=32, metadata={"env": "ADAPTSERVE_MAX_IMAGES", "help": "images per request"})
    max_body_bytes: int = field(
        default=64 * 2**20, metadata={"env": "ADAPTSERVE_MAX_BODY_BYTES", "help": "request body"}
    )
    max_batch: int = field(
        default=32, metadata={"env": "ADAPTSERVE_MAX_BATCH", "help": "adaptive batch: max requests"}
    )
    max_latency_ms: int = field(
        default=10000, metadata={"env": "ADAPTSERVE_MAX_LATENCY_MS", "help": "longest a request may queue before 503"}
    )
    max_loaded: int = field(
        default=32, metadata={"env": "ADAPTSERVE_MAX_LOADED", "help": "adapter versions kept loaded"}
    )
    poll_s: float = field(default=0.25, metadata={"env": "ADAPTSERVE_POLL_S", "help": "registry poll interval, s"})
    threads: int = field(default=0, metadata={"env": "ADAPTSERVE_THREADS", "help": "engine threads (0 = all cores)"})

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"ADAPTSERVE_ENGINE={self.engine!r}: choose one of {', '.join(ENGINES)}")

    @classmethod
    def from_env(cls) -> ServiceConfig:
        return cls(
            home=paths.home(),
            base_model=Path(_env("ADAPTSERVE_BASE_MODEL", str(paths.default_model_dir()))),
            engine=_env("ADAPTSERVE_ENGINE", "onnx"),
            admin_token=_env("ADAPTSERVE_ADMIN_TOKEN", ""),
            max_images=_int("ADAPTSERVE_MAX_IMAGES", 32, 1),
            max_body_bytes=_int("ADAPTSERVE_MAX_BODY_BYTES", 64 * 2**20, 1024),
            max_batch=_int("ADAPTSERVE_MAX_BATCH", 32, 1),
            max_latency_ms=_int("ADAPTSERVE_MAX_LATENCY_MS", 10000, 1),
            max_loaded=_int("ADAPTSERVE_MAX_LOADED", 32, 1),
            poll_s=float(_env("ADAPTSERVE_POLL_S", "0.25")),
            threads=_int("ADAPTSERVE_THREADS", 0, 0),
        )


def reference_table() -> list[tuple[str, str, str]]:
    """(variable, default, help) for the README's configuration reference."""
    rows = []
    for f in fields(ServiceConfig):
        default = "" if f.default is f.default_factory else str(f.default)  # type: ignore[comparison-overlap]
        rows.append((f.metadata["env"], default, f.metadata["help"]))
    return rows
