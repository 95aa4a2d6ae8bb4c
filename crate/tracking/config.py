from __future__ import annotations

from dataclasses import dataclass

from crate.errors import ConfigError


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlruns/mlflow.db
    artifact_root: str | None = None  # of experiments this job creates; default: artifacts/ beside a SQLite store
    experiment: str = "crate-lm"
    run_name: str | None = None  # default: the job's own run name
    system_metrics: bool = True  # CPU/GPU/memory sampled by MLflow alongside the run
    request_timeout_s: float = 10.0  # per HTTP request to a tracking server
    max_consecutive_failures: int = 3  # then tracking is switched off for the rest of the job

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s", f"must be > 0, got {self.request_timeout_s}")
        if self.max_consecutive_failures < 1:
            raise ConfigError("max_consecutive_failures", f"must be >= 1, got {self.max_consecutive_failures}")
