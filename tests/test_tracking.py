"""MLflow tracking: odd metric names, an unreachable server, and pickling of config errors across processes."""

import pickle
import time

from mlflow.tracking import MlflowClient

from crate.errors import ConfigError
from crate.tracking import Tracker, TrackingConfig
from crate.tracking.tracker import metric_name


def test_metric_names_mlflow_rejects_are_made_acceptable(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start(TrackingConfig(uri=uri, system_metrics=False), "names", params={"set (a)": 1})
    tracker.log_metrics({"data/share/Gutenberg (PG-19)": 0.5, "data/share/Dictionary (GCIDE)": 0.25}, step=1)
    tracker.log_metrics({"val/loss": 3.0}, step=1)
    tracker.end()
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.data.metrics == {"data/share/Gutenberg _PG-19_": 0.5, "data/share/Dictionary _GCIDE_": 0.25,
                                "val/loss": 3.0}
    assert run.info.status == "FINISHED" and metric_name("ok/name-1.x") == "ok/name-1.x"


def test_an_unreachable_server_turns_tracking_off_at_once():
    start = time.perf_counter()
    tracker = Tracker.start(TrackingConfig(uri="http://127.0.0.1:9", system_metrics=False), "offline")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()
    assert not tracker.active and time.perf_counter() - start < 5


def test_config_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(ConfigError("train.zero_stage", "must be 0-3")))
    assert (error.field, error.message, str(error)) == ("train.zero_stage", "must be 0-3", "train.zero_stage: must be 0-3")
