"""MLflow tracking: odd metric names, an unreachable server, and pickling of config errors across processes."""

import pickle
import time

from mlflow.tracking import MlflowClient

from crate.config import load_config
from crate.errors import ConfigError
from crate.tracking import Tracker, TrackingConfig
from crate.tracking.locations import describe_run, resolve_artifact_root, resolve_locations, resolve_tracking_uri
from crate.tracking.tracker import metric_name
from crate.train.config import PretrainConfig


def test_metric_names_mlflow_rejects_are_made_acceptable(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start(TrackingConfig(uri=uri, system_metrics=False), "names", params={"set (a)": 1})
    tracker.log_metrics({"data/share/Gutenberg (PG-19)": 0.5, "data/share/Dictionary (GCIDE)": 0.25}, step=1)
    tracker.log_metrics({"val/loss": 3.0}, step=1)
    tracker.end()
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert run.data.metrics == {"mixture/Gutenberg _PG-19_": 0.5, "mixture/Dictionary _GCIDE_": 0.25,
                                "loss/val": 3.0}
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


# -- locations: resolved once, against the launch directory ----------------------------------------------------------
def test_artifacts_of_a_store_named_by_its_uri_land_beside_it_not_in_the_working_directory(tmp_path, monkeypatch):
    """The tests' own setting (a temporary database, nothing else) once wrote 51 MB into the checkout's ./mlruns."""
    (cwd := tmp_path / "cwd").mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    tracker = Tracker.start(TrackingConfig(uri=uri, system_metrics=False), "artifacts")
    tracker.log_text("hello", "notes/hello.txt")
    tracker.end()
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "store" / "artifacts").is_dir()
    assert MlflowClient(tracking_uri=uri).download_artifacts(tracker.run_id, "notes/hello.txt", str(tmp_path))


def test_every_default_location_is_absolute_and_relative_to_the_launch_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert resolve_tracking_uri("sqlite:///db/x.db", base="/launch") == "sqlite:////launch/db/x.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert resolve_artifact_root(f"sqlite:///{tmp_path}/mlruns/mlflow.db") == (tmp_path / "mlruns/artifacts").as_uri()
    assert resolve_artifact_root("http://mlflow:5000") is None
    cfg = resolve_locations(load_config(PretrainConfig, "quickstart", []), base="/launch")
    assert cfg.tracking.uri == "sqlite:////launch/mlruns/mlflow.db"
    assert cfg.tracking.artifact_root == "file:///launch/mlruns/artifacts"
    assert cfg.train.storage_path == "/launch/runs" and cfg.data.train == "stdlib://train"
    assert "mlflow ui --backend-store-uri sqlite:////launch/mlruns/mlflow.db --default-artifact-root " \
           "/launch/mlruns/artifacts" in describe_run("r1", "1", cfg.tracking.uri, cfg.tracking.artifact_root)


def test_experiments_open_as_model_training_with_the_losses_charted_first(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.start(TrackingConfig(uri=uri, system_metrics=False), "charts")
    tracker.log_metrics({"train/loss": 3.0, "val/loss": 3.1, "data/share/Github": 1.0, "data/stream/documents": 5,
                         "perf/mfu": 0.1, "neurons/dead_fraction": 0.0, "train/lr": 1e-3}, step=1)
    tracker.end()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment(client.get_run(tracker.run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # MLflow's UI sorts chart sections (a name up to its last "/") alphabetically
    sections = sorted({key.rsplit("/", 1)[0] for key in client.get_run(tracker.run_id).data.metrics})
    assert sections[0] == "loss" and {"loss/train", "loss/val"} <= set(client.get_run(tracker.run_id).data.metrics)


# -- MLflow history after faults (13.8) ------------------------------------------------------------------------------
def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_resumed_history_has_one_value_per_step_after_any_number_of_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TrackingConfig(uri=uri, system_metrics=False)
    first = Tracker.start(config, "resumed", tags={"crate.run_name": "resumed"}, skip_logged_steps=True)
    for step in range(1, 21):  # checkpoint at 10, killed after 20: never ended
        first.log_metrics({"train/loss": float(step)}, step=step)
    for _ in range(2):  # two resumes from the checkpoint at 10, each killed after 20 again
        again = Tracker.start(config, "resumed", tags={"crate.run_name": "resumed"}, resume_run_id=first.run_id,
                              skip_logged_steps=True)
        for step in range(11, 21):
            again.log_metrics({"train/loss": float(step)}, step=step)
    last = Tracker.start(config, "resumed", tags={"crate.run_name": "resumed"}, resume_run_id=first.run_id,
                         skip_logged_steps=True)
    for step in range(11, 31):
        last.log_metrics({"train/loss": float(step), "val/loss": 1.0}, step=step)
    last.end()
    client = MlflowClient(tracking_uri=uri)
    assert history(client, first.run_id, "loss/train") == [(s, float(s)) for s in range(1, 31)]
    assert [s for s, _ in history(client, first.run_id, "loss/val")] == list(range(11, 31))
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_a_restart_before_the_first_checkpoint_leaves_no_run_running(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = TrackingConfig(uri=uri, system_metrics=False)
    orphan = Tracker.start(config, "job", tags={"crate.run_name": "job"})  # killed: never ended
    other = Tracker.start(config, "other", tags={"crate.run_name": "other"})
    restarted = Tracker.start(config, "job", tags={"crate.run_name": "job"})
    restarted.end()
    client = MlflowClient(tracking_uri=uri)
    old = client.get_run(orphan.run_id)
    assert old.info.status == "KILLED" and old.data.tags["crate.superseded_by"] == restarted.run_id
    assert client.get_run(other.run_id).info.status == "RUNNING"
    assert client.get_run(restarted.run_id).info.status == "FINISHED"


def test_a_run_the_store_lost_is_recreated_with_a_link_to_the_old_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lost = "0" * 32
    tracker = Tracker.start(TrackingConfig(uri=uri, system_metrics=False), "lost", params={"a": 1},
                            resume_run_id=lost, skip_logged_steps=True)
    tracker.log_metrics({"train/loss": 2.0}, step=5)
    tracker.end()
    run = MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert tracker.run_id != lost and run.data.tags["crate.resumed_from_run_id"] == lost
    assert run.data.params == {"a": "1"} and run.data.metrics == {"loss/train": 2.0}
