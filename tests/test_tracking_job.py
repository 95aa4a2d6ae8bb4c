"""The one job lifecycle (crate.tracking.job): a run opened with the job's params and tags, ended FINISHED, FAILED on
an error, KILLED on Ctrl-C or SIGTERM, and reopened by a rerun of the same job in the same output folder. A real
MLflow SQLite store."""

import json
import os
import signal
import time
from dataclasses import dataclass, field

import pytest
from mlflow.tracking import MlflowClient

from crate.tracking import TrackingConfig
from crate.tracking.job import RUN_IDS_FILE, JobTerminated, TrackedJob, job_params, read_run_ids


@dataclass
class ToyConfig:
    steps: int = 3
    name: str = "toy"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@pytest.fixture
def config(tmp_path):
    return ToyConfig(tracking=TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False))


def status(config, run_id):
    return MlflowClient(tracking_uri=config.tracking.uri).get_run(run_id).info.status


def test_a_clean_exit_finishes_the_run_with_the_config_as_params_and_the_job_tags(config, tmp_path):
    with TrackedJob(config.tracking, "toy", "toy-run", config=config, params={"model.arch": "crate"},
                    tags={"crate.extra": "x"}, code_version="abc123") as job:
        job.tracker.log_metrics({"loss": 1.0}, step=1)
    run = MlflowClient(tracking_uri=config.tracking.uri).get_run(job.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "toy-run"
    assert run.data.params == {"steps": "3", "name": "toy", "model.arch": "crate"}  # no tracking.* params
    assert {k: run.data.tags[k] for k in ("crate.job", "mlflow.source.git.commit", "crate.extra")} == {
        "crate.job": "toy", "mlflow.source.git.commit": "abc123", "crate.extra": "x"}
    assert job_params(config) == {"steps": 3, "name": "toy"}


def test_an_error_fails_the_run_and_a_job_can_end_itself_failed(config):
    with pytest.raises(ValueError):
        with TrackedJob(config.tracking, "toy", "toy", code_version="c") as job:
            raise ValueError("boom")
    assert status(config, job.run_id) == "FAILED"
    with TrackedJob(config.tracking, "toy", "toy", code_version="c") as decided:
        decided.end("FAILED")
    assert status(config, decided.run_id) == "FAILED"


def test_ctrl_c_and_sigterm_kill_the_run(config):
    with pytest.raises(KeyboardInterrupt):
        with TrackedJob(config.tracking, "toy", "toy", code_version="c") as job:
            raise KeyboardInterrupt
    assert status(config, job.run_id) == "KILLED"
    # a job's process starts with Python's default; a Ray driver of an earlier test leaves its own handler behind
    # (which the job would leave alone, and which would end the test process)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(JobTerminated):
            with TrackedJob(config.tracking, "toy", "toy", code_version="c") as terminated:
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # never signal the test process itself
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler interrupts it
        assert status(config, terminated.run_id) == "KILLED"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the job's handler is gone with the job
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_rerun_in_the_same_folder_reopens_its_run_per_scope(config, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with TrackedJob(config.tracking, "toy", "toy", location=out, code_version="c") as first:
            first.tracker.log_metrics({"loss": 2.0}, step=1)
            raise KeyboardInterrupt
    with TrackedJob(config.tracking, "toy", "toy", location=out, code_version="c") as again:
        again.tracker.log_metrics({"loss": 1.0}, step=2)
    with TrackedJob(config.tracking, "toy", "toy", location=out, scope="other", code_version="c") as other:
        pass
    with TrackedJob(config.tracking, "toy", "toy", location=out, resume=False, code_version="c") as fresh:
        pass
    assert again.run_id == first.run_id and status(config, first.run_id) == "FINISHED"
    assert other.run_id != first.run_id and fresh.run_id not in (first.run_id, other.run_id)
    assert json.loads((out / RUN_IDS_FILE).read_text()) == read_run_ids(str(out)) == {
        "toy": fresh.run_id, "other": other.run_id}
    history = MlflowClient(tracking_uri=config.tracking.uri).get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_a_folder_from_before_the_run_file_resumes_through_its_legacy_record(config, tmp_path):
    with TrackedJob(config.tracking, "toy", "toy", code_version="c") as old:
        pass
    with TrackedJob(config.tracking, "toy", "toy", location=tmp_path / "old", legacy_run_id=old.run_id,
                    code_version="c") as resumed:
        pass
    assert resumed.run_id == old.run_id and read_run_ids(str(tmp_path / "old")) == {"toy": old.run_id}


def test_tracking_off_runs_the_job_without_a_run_or_a_record(tmp_path):
    with TrackedJob(TrackingConfig(enabled=False), "toy", "toy", location=tmp_path, code_version="c") as job:
        job.tracker.log_metrics({"loss": 1.0}, step=1)
    assert job.run_id is None and not (tmp_path / RUN_IDS_FILE).exists()
