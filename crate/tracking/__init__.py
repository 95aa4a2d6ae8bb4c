"""MLflow tracking that never takes a job down.

    tracker = Tracker.start(TrackingConfig(), run_name="crate-2l", params=flatten(cfg), tags={...})
    tracker.log_metrics({"train/loss": 3.2}, step=100)
    tracker.log_artifact("loss.png")
    tracker.end()

- URI: `TrackingConfig.uri`, else `MLFLOW_TRACKING_URI`, else a local store inside the working directory
  (`sqlite:///./mlruns/mlflow.db`, artifacts in `./mlruns/artifacts`; open it with `mlflow ui
  --backend-store-uri sqlite:///mlruns/mlflow.db`).
- A server that is unreachable at start, or stops answering mid-run, turns the tracker off with one warning:
  the job goes on. HTTP retries are bounded (MLflow's defaults block for minutes).
- Runs are addressed by id through `MlflowClient`, so a sweep's parent run and its trials' runs can be open
  in one process; `parent_run_id` nests a run (`mlflow.parentRunId`).
"""

from crate.tracking.config import TrackingConfig
from crate.tracking.tracker import Tracker, resolve_tracking_uri

__all__ = ["Tracker", "TrackingConfig", "resolve_tracking_uri"]
