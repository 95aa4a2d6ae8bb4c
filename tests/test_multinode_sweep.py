"""A Tune sweep across several Ray nodes with all of its state in a real S3 store: four tiny trials, two at a time,
each trial's Train worker on a worker node of its own; the sweep's driver SIGKILLed once the bucket records a
finished trial, then `--resume` from the bucket alone finishes the rest without re-running the finished ones."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from crate.objectstore import STORAGE_URI, LocalObjectStore, list_files, read_text
from multinode import WORKER_NODE, MultiNodeCluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
SWEEP = "nodes"
EXPERIMENT = f"{STORAGE_URI}/{SWEEP}"


@pytest.fixture(scope="module")
def cluster():
    with LocalObjectStore() as store:
        saved = {key: os.environ.get(key) for key in store.env}
        os.environ.update(store.env)
        nodes = MultiNodeCluster(head_cpus=1, dashboard=True)  # Tune + Train need the State API (conftest.py)
        try:
            for name in ("node_a", "node_b"):
                nodes.add_worker_node(name)
            yield nodes
        finally:
            nodes.shutdown()
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def sweep_file(tmp: Path) -> Path:
    config = {
        "name": SWEEP, "recipe": "smoke", "max_concurrent_trials": 2,
        "trial": {"train": {"engine": "torch", "cpus_per_worker": 0.5, "worker_resources": {WORKER_NODE: 1},
                            "controller_failure_limit": 0, "max_steps": 4, "log_interval": 2, "eval_interval": 2,
                            "checkpoint_interval": 2, "storage_path": STORAGE_URI},
                  "data": {"engine": "local"}, "tracking": {"enabled": False}},
        "space": {"model.ista_sparsity": {"grid": [0.1, 0.2]}, "model.ista_step_size": {"grid": [0.1, 0.2]}},
        "scheduler": {"kind": "fifo"}, "proxy": {"blocks": 8, "neurons_per_layer": 16}}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def terminated_trials() -> set[str]:
    """The trials the bucket's experiment state records as finished (what a restore goes by)."""
    try:
        states = [f for f in list_files(EXPERIMENT) if f.startswith("experiment_state") and f.endswith(".json")]
        trials = json.loads(read_text(f"{EXPERIMENT}/{sorted(states)[-1]}"))["trial_data"] if states else []
    except (OSError, ValueError, KeyError):
        return set()
    states = [json.loads(state) for state, _ in trials]
    return {state["trial_id"] for state in states if state["status"] == "TERMINATED"}


def run_driver(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tune/sweep.py"), "--config", str(config), *extra],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def results(trial_ids: set[str]) -> dict[str, str]:
    files = list_files(EXPERIMENT)
    found = {}
    for trial_id in trial_ids:
        (result,) = [f for f in files if f == f"{trial_id}/result.json"]
        found[trial_id] = read_text(f"{EXPERIMENT}/{result}")
    return found


@pytest.fixture(scope="module")
def resumed(cluster, tmp_path_factory):
    config = sweep_file(tmp_path_factory.mktemp("sweep"))
    driver = run_driver(config)
    deadline = time.monotonic() + 420
    while not terminated_trials() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if driver.poll() is not None:
        raise AssertionError(f"the sweep's driver exited ({driver.returncode}) before the bucket recorded a finished "
                             f"trial:\n{driver.communicate()[0][-6000:]}")
    finished = terminated_trials()
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and nothing else: no chance to save anything more
    output, _ = driver.communicate(timeout=60)
    assert finished, output[-4000:]
    before = results(finished)
    again = run_driver(config, f"name={SWEEP}", "--resume")
    output, _ = again.communicate(timeout=480)
    assert again.returncode == 0, output[-6000:]
    return finished, before, output


def test_resume_from_the_bucket_keeps_the_finished_trials_and_runs_the_rest(resumed):
    finished, before, output = resumed
    assert results(finished) == before  # the finished trials were not run again
    assert len(terminated_trials()) == 4, output[-3000:]
    assert "report" in {f.split("/")[0] for f in list_files(EXPERIMENT)}


def test_trials_ran_on_the_worker_nodes_and_kept_their_checkpoints_in_the_bucket(cluster, resumed):
    states = [f for f in list_files(f"{EXPERIMENT}/trials") if f.endswith("/trainer_state.json")]
    nodes = {node for f in states for node in json.loads(read_text(f"{EXPERIMENT}/trials/{f}"))["nodes"]}
    trials = {f.split("/")[0] for f in states}
    assert len(trials) == 4, states
    workers = {cluster.node_id(name) for name in ("node_a", "node_b")}
    assert nodes == workers, (nodes, workers)  # both worker nodes trained trials; the head none
