from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from crate.config import Range


@dataclass
class TrackingConfig:
    enabled: bool = True  # false: no MLflow run (the job says so in its summary)
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlruns/mlflow.db
    artifact_root: str | None = None  # of experiments this job creates; default: artifacts/ beside a SQLite store
    experiment: str = "crate-lm"  # the MLflow experiment the run goes to
    run_name: str | None = None  # default: the job's own run name
    system_metrics: bool = True  # CPU/GPU/memory sampled by MLflow alongside the run
    request_timeout_s: Annotated[float, Range(0, exclusive_low=True)] = 10.0  # per HTTP request to a tracking server
    max_consecutive_failures: Annotated[int, Range(1)] = 3  # then tracking is switched off for the rest of the job
