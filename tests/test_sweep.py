"""A real CPU sweep: four CRATE-tiny trials (plain PyTorch, one Ray Train worker each) under ASHA, interrupted
with Ctrl-C after two trials and resumed with --resume; then what it leaves in MLflow and in its report. And a
trial that keeps failing: retried, marked failed, the sweep goes on."""

import json
import os
import signal
import threading
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient

from crate.config import load_config
from crate.sweep import SweepConfig, run_sweep
from crate.sweep.state import read_state

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
DEAD = 50.0  # λ so large that every ISTA code is zero: such a trial cannot learn and ASHA stops it at step 2


RAY_DASHBOARD = True  # Tune + Train: see conftest.ray_cluster


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster


def sweep_file(tmp: Path, name: str, space: dict, **settings) -> Path:
    """A smoke-sized sweep: 4 steps of 512 tokens per trial, evaluated and checkpointed every 2, on 2 CPUs one
    trial at a time."""
    config = {
        "name": name, "recipe": "smoke",
        "trial": {"train": {"engine": "torch", "cpus_per_worker": 0.5, "controller_failure_limit": 0, "max_steps": 4,
                            "log_interval": 2, "eval_interval": 2, "checkpoint_interval": 2,
                            "storage_path": str(tmp / "runs")},
                  "data": {"read_cpus": 0.25, "read_tasks": 2},
                  "tracking": {"system_metrics": False, "uri": f"sqlite:///{tmp / 'mlflow.db'}"}},
        "space": space, "proxy": {"blocks": 8, "neurons_per_layer": 16}, **settings}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ended_trials(experiment: Path) -> dict[str, str]:
    """Trial id -> Tune's result record, for the trials whose last result says they ended (stopped or completed)."""
    ended = {}
    for path in experiment.glob("*/result.json"):
        text = path.read_text()
        last = json.loads(text.splitlines()[-1]) if text.strip() else {}
        if last.get("done") or last.get("trial/completed"):
            ended[path.parent.name] = text
    return ended


def interrupt_after(experiment: Path, count: int, stop: threading.Event) -> None:
    """Ctrl-C this process (Tune's handler takes it) once `count` trials have ended."""
    while not stop.wait(0.2):
        if len(ended_trials(experiment)) >= count:
            os.kill(os.getpid(), signal.SIGINT)
            return


@pytest.fixture(scope="module")
def sweep(ray_address, tmp_path_factory):
    """λ ∈ {0.1, DEAD} × η ∈ {0.1, 0.2} under ASHA (one rung, at step 2): Ctrl-C after two trials, then --resume.
    Tune runs λ fastest, so every DEAD trial follows a healthy one."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = load_config(SweepConfig, sweep_file(
        tmp, "tiny", {"model.ista_sparsity": {"grid": [0.1, DEAD]}, "model.ista_step_size": {"grid": [0.1, 0.2]}},
        scheduler={"kind": "asha", "grace_period": 2, "reduction_factor": 2}))
    experiment = tmp / "runs" / "tiny"
    stop = threading.Event()
    watcher = threading.Thread(target=interrupt_after, args=(experiment, 2, stop))
    watcher.start()
    try:
        interrupted = run_sweep(config)
    finally:
        stop.set()
        watcher.join()
    assert interrupted.table is None and "--resume" in interrupted.summary()
    ended = ended_trials(experiment)
    return tmp, experiment, run_sweep(config, resume=True), ended


def runs(tmp: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    return client, client.search_runs([client.get_experiment_by_name("crate-lm").experiment_id])


def test_resume_keeps_the_finished_trials_and_runs_the_rest(sweep):
    tmp, experiment, result, ended = sweep
    assert len(ended) == 2
    for trial, before in ended.items():  # not run again: Tune's record of the trial is untouched
        assert (experiment / trial / "result.json").read_text() == before
    assert len(result.table) == 4 and set(result.table["outcome"]) == {"completed", "stopped"}
    assert result.parent_run_id == read_state(str(experiment)).parent_run_id  # the same parent run, reopened


def test_asha_stops_the_trials_that_cannot_learn_and_their_runs_end_killed(sweep):
    tmp, _, result, _ = sweep
    table = result.table
    assert table.filter(pl.col("model.ista_sparsity") == 0.1)["outcome"].to_list() == ["completed", "completed"]
    stopped = table.filter(pl.col("model.ista_sparsity") == DEAD)
    assert stopped["outcome"].to_list() == ["stopped", "stopped"] and stopped["step"].to_list() == [2, 2]
    assert stopped["neurons/active_per_token"].to_list() == [0.0, 0.0]
    assert table.filter(pl.col("outcome") == "completed")["step"].to_list() == [4, 4]
    assert table["proxy_tar/mean"].is_not_null().sum() == 2  # scored once training completed
    client, all_runs = runs(tmp)
    by_id = {run.info.run_id: run for run in all_runs}
    for row in table.iter_rows(named=True):
        run = by_id[row["mlflow_run_id"]]
        assert run.data.tags["crate.sweep.outcome"] == row["outcome"]
        assert run.info.status == {"completed": "FINISHED", "stopped": "KILLED"}[row["outcome"]]
        assert ("proxy_tar/mean" in run.data.metrics) == (row["outcome"] == "completed")


def test_one_parent_run_and_exactly_one_run_per_trial(sweep):
    tmp, _, result, _ = sweep
    client, all_runs = runs(tmp)
    [parent] = [run for run in all_runs if run.info.run_id == result.parent_run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["crate.kind"] == "sweep"
    assert parent.data.params["space.model.ista_sparsity"] == f"grid [0.1, {DEAD}]"
    children = [run for run in all_runs if run is not parent]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in children)  # no stray runs
    assert all(run.data.tags["crate.sweep.id"] == parent.data.tags["crate.sweep.id"] for run in children)
    current = [run for run in children if run.data.tags["crate.sweep.outcome"] != "superseded"]
    assert sorted(run.data.tags["crate.sweep.trial"] for run in current) == sorted(result.table["trial"])
    for run in current:  # each trial's run holds that trial's config
        row = result.table.row(by_predicate=pl.col("trial") == run.data.tags["crate.sweep.trial"], named=True)
        assert float(run.data.params["model.ista_sparsity"]) == row["model.ista_sparsity"]
        assert float(run.data.params["model.ista_step_size"]) == row["model.ista_step_size"]
    # A trial cut off before its first checkpoint started over: its first run is marked superseded, not lost,
    # and closed like every other run of the sweep.
    assert all(run.info.status != "RUNNING" for run in all_runs)


def test_the_summary_and_plots_are_on_the_parent_run_and_next_to_the_experiment(sweep):
    tmp, experiment, result, _ = sweep
    client, _ = runs(tmp)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"summary.csv", "summary.md", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "plots")} == {
        "plots/loss_vs_lambda_eta.png", "plots/pareto.png"}
    summary = pl.read_csv(experiment / "report/summary.csv")
    assert summary["trial"].to_list() == result.table["trial"].to_list()
    assert (experiment / "report/summary.md").read_text().startswith("| trial | outcome | λ | η | step |")
    metrics = client.get_run(result.parent_run_id).data.metrics
    assert metrics["sweep/trials_completed"] == 2 and metrics["sweep/trials_stopped"] == 2


def test_a_trial_that_keeps_failing_is_retried_then_marked_failed(ray_address, tmp_path):
    # The validation corpus of the searched value does not exist: the trial fails in its pre-flight check.
    missing = str(tmp_path / "missing-val.jsonl")
    config = sweep_file(tmp_path, "failing", {"data.val": {"grid": [missing]}}, max_failures=1,
                        scheduler={"kind": "fifo"}, proxy={"enabled": False})
    result = run_sweep(load_config(SweepConfig, config))
    [row] = result.table.iter_rows(named=True)
    assert row["outcome"] == "failed" and row["error"]
    error_file = (tmp_path / "runs/failing" / row["trial"] / "error.txt").read_text()
    assert error_file.count("Failure #") == 2  # the first try and one retry
    client, all_runs = runs(tmp_path)
    [parent] = all_runs  # the trial never got as far as opening its own run
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/trials_failed"] == 1
