"""Pretraining on Ray Train with DeepSpeed on CPU (gloo): ZeRO-2 and ZeRO-3 with two workers, a worker killed
mid-run, resuming on a different number of workers, and what lands in MLflow."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from crate.config import load_config
from crate.model import load_checkpoint
from crate.train import PretrainConfig, launch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster


def overrides(tmp, run_name, *extra):
    return ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.controller_failure_limit=0",
            "data.read_cpus=0.25", "tracking.system_metrics=false", f"train.storage_path={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"train.run_name={run_name}", *extra]


def registered(checkpoint: Path) -> bool:
    """Ray Train has recorded the checkpoint (not merely uploaded its files)."""
    snapshot = checkpoint.parent / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and checkpoint.name in snapshot.read_text()


def kill_a_worker_after(checkpoint: Path, proc: subprocess.Popen, killed: list) -> None:
    """SIGKILL one Ray Train worker process once `checkpoint` is registered."""
    while proc.poll() is None and not registered(checkpoint):
        time.sleep(0.05)
    for process in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in process.info["cmdline"] or []):
            process.send_signal(signal.SIGKILL)
            killed.append(process.pid)
            return


@pytest.fixture(scope="module")
def killed_run(ray_address, tmp_path_factory):
    """A 2-worker ZeRO-2 run of 40 steps whose worker is killed after the step-8 checkpoint."""
    tmp = tmp_path_factory.mktemp("zero2")
    args = overrides(tmp, "zero2", "train.zero_stage=2", "train.max_steps=40", "train.optim.decay_steps=48",
                     "train.log_interval=1", "train.eval_interval=8", "train.checkpoint_interval=8",
                     "train.max_failures=2")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs/pretrain.py"), "--config", "smoke", *args],
                            env={**os.environ, "RAY_ADDRESS": ray_address}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp)
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_after, args=(tmp / "runs/zero2/checkpoint_00000008", proc, killed))
    killer.start()
    output, _ = proc.communicate(timeout=600)
    killer.join()
    assert proc.returncode == 0, output[-5000:]
    assert killed, "no worker was killed"
    return tmp, output


def metric_history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_a_killed_worker_restarts_from_the_last_checkpoint(killed_run):
    tmp, output = killed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("crate-lm").experiment_id)
    assert run.info.status == "FINISHED", output[-3000:]
    resumed = [value for _, value in metric_history(client, run.info.run_id, "train/resumed_from_step")]
    assert resumed and resumed[0] in (8, 16, 24, 32), resumed
    losses = metric_history(client, run.info.run_id, "loss/train")
    assert len({step for step, _ in losses}) == len(losses), losses  # one value per step after the resume
    assert max(step for step, _ in losses) == 40
    first = next(value for step, value in losses if step == 1)
    after_resume = [value for step, value in losses if step == resumed[0] + 1]
    assert after_resume[-1] < first - 0.5, (first, after_resume)  # continues the curve, no jump back
    assert losses[-1][1] < first - 1.0


def test_mlflow_run_holds_params_metrics_and_artifacts(killed_run):
    tmp, _ = killed_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("crate-lm").experiment_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["train.zero_stage"] == "2" and params["model.preset"] == "crate-tiny"
    assert params["run.world_size"] == "2" and params["run.code_version"] != ""
    assert params["packages.deepspeed"] == "0.19.8"
    for key in ("loss/train", "train/lr", "train/grad_norm", "perf/tokens_per_s", "train/tokens_seen",
                "loss/val", "loss/val_ppl", "neurons/L0/lasso_objective", "neurons/L1/relative_recon_error",
                "neurons/active_per_token", "neurons/dead_fraction", "mixture/Github", "stream/documents"):
        assert key in metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots", "config.yaml"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    _, metadata = load_checkpoint(client.download_artifacts(run.info.run_id, "model/model.pt", str(tmp)))
    assert metadata["step"] == 40 and metadata["mlflow_run_id"] == run.info.run_id


def test_resuming_on_one_worker_continues_from_the_two_worker_checkpoint(killed_run):
    tmp, _ = killed_run
    cfg = load_config(PretrainConfig, "smoke", [
        "train.launcher=local", "data.engine=local", "tracking.system_metrics=false", "train.zero_stage=2",
        f"train.storage_path={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "train.run_name=zero2", "train.max_steps=44", "train.optim.decay_steps=48", "train.log_interval=1"])
    result = launch(cfg)
    state = json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())
    assert state["step"] == 44 and state["world_size"] == 1
    losses = dict(map(tuple, state["history"]["train"]))
    assert losses[41] < losses[1] - 1.0  # weights carried over: no restart from scratch


def test_zero3_two_workers_train_and_export_a_plain_model(ray_address, tmp_path):
    cfg = load_config(PretrainConfig, "smoke", overrides(tmp_path, "zero3", "train.zero_stage=3",
                                                         "train.log_interval=1"))
    result = launch(cfg)
    state = json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())
    losses = [loss for _, loss in state["history"]["train"]]
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in Path(result.checkpoint).glob("engine/*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    model, metadata = load_checkpoint(result.model_file)
    assert model.num_params() == 1_622_400 and metadata["step"] == 6
