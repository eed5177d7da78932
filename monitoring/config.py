"""The drift monitor's configuration: a view of the drift section of models.settings.

Every field is one ADAPTSERVE_* setting, whose type, default, bounds and help live in models.settings alone.
MonitorConfig adds what one setting cannot say about itself: the checks that span fields (a window that can fill,
a minimum it can reach), and the same bounds again for configs built in code rather than from the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from models import settings
from monitoring.detectors import DriftConfig


def _setting(name: str) -> Any:
    """A field backed by the setting `name`: its declared default, and the setting its errors name."""
    return field(default=settings.default(name), metadata={"setting": name})


@dataclass(frozen=True)
class MonitorConfig:
    """Drift monitor settings (see models.settings for each one's help); invalid values raise ValueError naming
    the variables to change.

    Invariants: min_records <= window <= max_per_adapter (a check can run and its window can fill),
    0 < alpha < 1, 0 <= sample <= 1, interval_s >= 0 (0: on demand only), report_every >= 0 (0: never).
    """

    interval_s: float = _setting("drift_interval_s")
    window: int = _setting("drift_window")
    min_records: int = _setting("drift_min_records")
    alpha: float = _setting("drift_alpha")
    sample: float = _setting("capture_sample")
    max_per_adapter: int = _setting("capture_max_per_adapter")
    retention_s: float = _setting("capture_retention_s")
    report_every: int = _setting("report_every")
    report_keep: int = _setting("report_keep")
    queue_size: int = _setting("capture_queue")

    def __post_init__(self) -> None:
        errors = _config_errors(self)
        if errors:
            raise ValueError(" ".join(errors))

    @classmethod
    def from_settings(cls, values: settings.Settings) -> MonitorConfig:
        return cls(**{f.name: getattr(values, f.metadata["setting"]) for f in fields(cls)})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MonitorConfig:
        """From the ADAPTSERVE_* variables (os.environ by default); a bad value is a settings.SettingsError (a
        ValueError) naming the variable."""
        return cls.from_settings(settings.load(environ))

    def detector_config(self) -> DriftConfig:
        return DriftConfig(alpha=self.alpha, min_window=self.min_records)


def _env(attr: str) -> str:
    """The variable behind a MonitorConfig field, for error messages."""
    return settings.env_name(next(f.metadata["setting"] for f in fields(MonitorConfig) if f.name == attr))


def _config_errors(cfg: MonitorConfig) -> list[str]:
    """Every problem with a config as a sentence naming the variable(s) to change (empty when it is fine)."""
    window, min_records = _env("window"), _env("min_records")
    checks = [
        (cfg.interval_s >= 0, f"{_env('interval_s')} must be >= 0 (0 disables scheduled checks), got "
                              f"{cfg.interval_s}."),
        (cfg.min_records >= 10, f"{min_records} must be at least 10, got {cfg.min_records}; 100 or more keeps "
                                "checks from being noisy."),
        (cfg.window >= cfg.min_records, f"{window} ({cfg.window}) must be >= {min_records} ({cfg.min_records}); "
                                        f"raise {window} or lower {min_records}."),
        (0.0 < cfg.alpha < 1.0, f"{_env('alpha')} must be between 0 and 1 (exclusive), got {cfg.alpha}; 0.01 "
                                "allows 1% false alarms per check."),
        (0.0 <= cfg.sample <= 1.0, f"{_env('sample')} must be between 0 and 1, got {cfg.sample}; 1 records every "
                                   "prediction."),
        (cfg.max_per_adapter >= cfg.window, f"{_env('max_per_adapter')} ({cfg.max_per_adapter}) must be >= "
                                            f"{window} ({cfg.window}), or the window can never fill."),
        (cfg.retention_s > 0, f"{_env('retention_s')} must be > 0, got {cfg.retention_s}."),
        (cfg.report_every >= 0, f"{_env('report_every')} must be >= 0 (0 = never), got {cfg.report_every}."),
        (cfg.report_keep >= 1, f"{_env('report_keep')} must be at least 1, got {cfg.report_keep}."),
        (cfg.queue_size >= 1, f"{_env('queue_size')} must be at least 1, got {cfg.queue_size}."),
    ]
    return [message for ok, message in checks if not ok]
