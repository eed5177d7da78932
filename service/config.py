"""What a serving worker is configured with: a view of models/settings.py (the one schema), resolved at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models import paths, settings
from models.archive import ArchiveLimits
from models.settings import ENGINES
from service.decode import DecodeLimits

BENTO_MODEL = "adaptserve-base"


@dataclass(frozen=True)
class ServiceConfig:
    """A worker's settings (help, bounds and env names: models/settings.py); from_env() reads and validates them."""

    home: Path
    base_model: Path
    engine: str = settings.default("engine")
    max_batch: int = settings.default("max_batch")
    max_latency_ms: int = settings.default("max_latency_ms")
    max_loaded: int = settings.default("max_loaded")
    preload: bool = settings.default("preload")
    poll_s: float = settings.default("poll_s")
    notify: bool = settings.default("notify")
    threads: int = settings.default("threads")
    monitor: bool = settings.default("monitor")
    feedback_ttl_s: float = settings.default("feedback_ttl_s")
    feedback_max: int = settings.default("feedback_max_items")
    int8_max_drop: float = settings.default("int8_max_drop")
    job_runner: bool = settings.default("job_runner")
    max_body_bytes: int = settings.default("max_body_bytes")
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    archive_limits: ArchiveLimits = field(default_factory=ArchiveLimits)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"ADAPTSERVE_ENGINE={self.engine!r}: choose one of {', '.join(ENGINES)}")

    @classmethod
    def from_env(cls) -> ServiceConfig:
        """The settings from the environment; a bad value raises SettingsError naming its variable."""
        s = settings.load()
        return cls(
            home=s.home.resolve(),
            base_model=resolve_base_model(s),
            engine=s.engine,
            max_batch=s.max_batch,
            max_latency_ms=s.max_latency_ms,
            max_loaded=s.max_loaded,
            preload=s.preload,
            poll_s=s.poll_s,
            notify=s.notify,
            threads=s.threads,
            monitor=s.monitor,
            feedback_ttl_s=s.feedback_ttl_s,
            feedback_max=s.feedback_max_items,
            int8_max_drop=s.int8_max_drop,
            job_runner=s.job_runner,
            max_body_bytes=s.max_body_bytes,
            limits=DecodeLimits(s.max_pixels, s.max_images, s.max_image_bytes),
            archive_limits=ArchiveLimits(s.archive_max_total_bytes, s.archive_max_file_bytes, s.archive_max_files),
        )


def resolve_base_model(s: settings.Settings | None = None) -> Path:
    """ADAPTSERVE_BASE_MODEL, else the embedded default under ADAPTSERVE_HOME, else the model packed in the Bento."""
    s = s or settings.load()
    if s.base_model is not None:
        return s.base_model
    default = paths.default_model_dir()
    if (default / "model.json").is_file():
        return default
    try:
        import bentoml  # heavy (and only inside a Bento): imported when the embedded default is missing

        return Path(bentoml.models.get(f"{BENTO_MODEL}:latest").path)
    except Exception:  # not in a Bento and never imported: say how to build it
        raise ValueError(
            f"no base model: {default} does not exist and BentoML's model store has no {BENTO_MODEL}; "
            "run `adaptserve pretrain` or set ADAPTSERVE_BASE_MODEL to a model directory"
        ) from None
