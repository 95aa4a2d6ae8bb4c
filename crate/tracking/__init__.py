"""MLflow tracking that never takes a job down.

    tracker = Tracker.start(TrackingConfig(), run_name="crate-2l", params=flatten(cfg), tags={...})
    tracker.log_metrics({"train/loss": 3.2}, step=100)
    tracker.log_artifact("loss.png")
    tracker.end()

- URI: `TrackingConfig.uri`, else `MLFLOW_TRACKING_URI`, else a local store in the directory the job was launched
  from (`sqlite:///<dir>/mlruns/mlflow.db`, artifacts in `<dir>/mlruns/artifacts`), resolved on the driver by
  `resolve_locations` (crate/tracking/locations.py) before any worker sees the config; `Tracker.end` logs the
  run's id, store and the `mlflow ui` command that opens it.
- A server that is unreachable at start, or stops answering mid-run, turns the tracker off with one warning:
  the job goes on. HTTP retries are bounded (MLflow's defaults block for minutes).
- Runs are addressed by id through `MlflowClient`, so a sweep's parent run and its trials' runs can be open
  in one process; `parent_run_id` nests a run (`mlflow.parentRunId`).
"""

from crate.tracking.config import TrackingConfig
from crate.tracking.locations import describe_run, resolve_locations, resolve_tracking_uri
from crate.tracking.tracker import Tracker

__all__ = ["Tracker", "TrackingConfig", "describe_run", "resolve_locations", "resolve_tracking_uri"]
