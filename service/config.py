"""Service configuration: every knob is an environment variable with a default, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from models import paths

ENGINES = ("onnx", "onnx-int8", "torch")


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


def _float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}={raw!r}: use 1 or 0")


@dataclass(frozen=True)
class ServiceConfig:
    home: Path = field(metadata={"env": "ADAPTSERVE_HOME", "help": "state directory (registry, artifacts, captures)"})
    base_model: Path = field(metadata={"env": "ADAPTSERVE_BASE_MODEL", "help": "base model dir (model.json)"})
    engine: str = field(
        default="onnx",
        metadata={
            "env": "ADAPTSERVE_ENGINE",
            "help": "onnx (fp32, merged), onnx-int8 (int8 where its measured accuracy drop is within "
            "ADAPTSERVE_INT8_MAX_DROP) or torch (peft, unmerged)",
        },
    )
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
    monitor: bool = field(
        default=True, metadata={"env": "ADAPTSERVE_MONITOR", "help": "capture predictions and check drift (1/0)"}
    )
    feedback_ttl_s: float = field(
        default=3600.0,
        metadata={"env": "ADAPTSERVE_FEEDBACK_TTL_S", "help": "how long inputs are kept for POST /feedback by id"},
    )
    feedback_max: int = field(
        default=20000, metadata={"env": "ADAPTSERVE_FEEDBACK_MAX_ITEMS", "help": "most inputs kept for feedback"}
    )
    int8_max_drop: float = field(
        default=0.01,
        metadata={
            "env": "ADAPTSERVE_INT8_MAX_DROP",
            "help": "onnx-int8: largest top-1 accuracy drop (0.01 = 1 point) at which a version is served in int8",
        },
    )
    job_runner: bool = field(
        default=True,
        metadata={"env": "ADAPTSERVE_JOB_RUNNER", "help": "start the retrain job runner + scheduler process (1/0)"},
    )

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"ADAPTSERVE_ENGINE={self.engine!r}: choose one of {', '.join(ENGINES)}")

    @classmethod
    def from_env(cls) -> ServiceConfig:
        return cls(
            home=paths.home(),
            base_model=resolve_base_model(),
            engine=_env("ADAPTSERVE_ENGINE", "onnx"),
            admin_token=_env("ADAPTSERVE_ADMIN_TOKEN", ""),
            max_images=_int("ADAPTSERVE_MAX_IMAGES", 32, 1),
            max_body_bytes=_int("ADAPTSERVE_MAX_BODY_BYTES", 64 * 2**20, 1024),
            max_batch=_int("ADAPTSERVE_MAX_BATCH", 32, 1),
            max_latency_ms=_int("ADAPTSERVE_MAX_LATENCY_MS", 10000, 1),
            max_loaded=_int("ADAPTSERVE_MAX_LOADED", 32, 1),
            poll_s=_float("ADAPTSERVE_POLL_S", 0.25),
            threads=_int("ADAPTSERVE_THREADS", 0, 0),
            monitor=_bool("ADAPTSERVE_MONITOR", True),
            feedback_ttl_s=_float("ADAPTSERVE_FEEDBACK_TTL_S", 3600.0),
            feedback_max=_int("ADAPTSERVE_FEEDBACK_MAX_ITEMS", 20000, 0),
            int8_max_drop=_float("ADAPTSERVE_INT8_MAX_DROP", 0.01),
            job_runner=_bool("ADAPTSERVE_JOB_RUNNER", True),
        )


BENTO_MODEL = "adaptserve-base"


def resolve_base_model() -> Path:
    """ADAPTSERVE_BASE_MODEL, else the embedded default under ADAPTSERVE_HOME, else the model packed in the Bento."""
    if os.environ.get("ADAPTSERVE_BASE_MODEL"):
        return Path(os.environ["ADAPTSERVE_BASE_MODEL"])
    default = paths.default_model_dir()
    if (default / "model.json").is_file():
        return default
    try:
        import bentoml

        return Path(bentoml.models.get(f"{BENTO_MODEL}:latest").path)
    except Exception:  # not in a Bento and never imported: say how to build it
        raise ValueError(
            f"no base model: {default} does not exist and BentoML's model store has no {BENTO_MODEL}; "
            "run `adaptserve pretrain` or set ADAPTSERVE_BASE_MODEL to a model directory"
        ) from None


def reference_table() -> list[tuple[str, str, str]]:
    """(variable, default, help) for the README's configuration reference."""
    rows = []
    for f in fields(ServiceConfig):
        default = "" if f.default is f.default_factory else str(f.default)  # type: ignore[comparison-overlap]
        default = {"True": "1", "False": "0"}.get(default, default)
        rows.append((f.metadata["env"], default, f.metadata["help"]))
    return rows
