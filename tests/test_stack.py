"""The local stack, for real: `platform/stack up` starts a Ray head and an MLflow server on loopback, a smoke
pretraining job goes in through `ray job submit`, its MLflow run is checked through the REST API and in the MLflow
UI (headless Chromium), and `down` leaves no process behind."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import requests

from crate.config import load_config
from crate.errors import ConfigError
from crate.stack import StackConfig, main, stack_processes
from crate.tracking import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "platform" / "stack"
SMOKE_STEPS = 6  # crate/recipes/smoke.yaml: train.max_steps
BROWSER_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_overrides() -> list[str]:
    gcs, dashboard, client, agent, mlflow = free_ports(5)
    return [f"ray.port={gcs}", f"ray.dashboard_port={dashboard}", f"ray.client_port={client}",
            f"ray.dashboard_agent_port={agent}", f"mlflow.port={mlflow}"]


def run_stack(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK), *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"PYTHON": sys.executable})


def in_stack_shell(stack_dir: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` the way the README tells users to: in a shell that sourced the stack's env file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "-c", f"set -a; . {stack_dir}/env; set +a; {command}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Bad input fails before anything starts.

@pytest.mark.parametrize("override, field", [
    ("host=0.0.0.0", "host"),
    ("mlflow.port=6379", "mlflow.port"),  # the GCS port
    ("mlflow.backend_store_uri=file:///tmp/mlruns", "mlflow.backend_store_uri"),
    ("ray.num_cpus=-1", "ray.num_cpus"),
    ("ray.gpus=1", "ray.gpus"),
])
def test_config_names_the_field_it_cannot_run(override, field):
    with pytest.raises(ConfigError) as error:
        load_config(StackConfig, None, [override])
    assert error.value.field == field


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            main(["up", "--dir", str(tmp_path), *free_port_overrides(), f"mlflow.port={port}"])
    assert exit_.value.code == 2
    assert f"mlflow.port: port {port}" in capsys.readouterr().err
    assert not (tmp_path / "stack.json").exists()


def test_exported_tracking_uri_is_the_one_the_tracker_uses(monkeypatch):
    exports = load_config(StackConfig, None, ["mlflow.port=5123"]).exports()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exports["MLFLOW_TRACKING_URI"])
    assert resolve_tracking_uri() == "http://127.0.0.1:5123"
    assert exports["RAY_ADDRESS"] == "127.0.0.1:6379" and exports["RAY_AUTH_MODE"] == "disabled"


# ------------------------------------------------------------------------------------------------
# End to end: one stack for the module, stopped by the last test (and by the fixture, should a test fail).

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack_dir = tmp_path_factory.mktemp("stack")
    overrides = free_port_overrides() + ["ray.num_cpus=2", "ray.object_store_memory_mb=200"]
    started = run_stack("up", "--dir", str(stack_dir), *overrides)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {"dir": stack_dir, "overrides": overrides, "state": json.loads((stack_dir / "stack.json").read_text()),
           "env": dict(line.removeprefix("export ").split("=", 1) for line in (stack_dir / "env").read_text().splitlines())}
    run_stack("down", "--dir", str(stack_dir))


@pytest.fixture(scope="module")
def pretraining_run(stack, tmp_path_factory):
    """A smoke pretraining job submitted exactly as the README says; returns its MLflow run (REST API JSON)."""
    run_name = f"stack-e2e-{uuid.uuid4().hex[:6]}"
    storage = tmp_path_factory.mktemp("checkpoints")
    submission_id = f"crate-{run_name}"
    submitted = in_stack_shell(
        stack["dir"], f"ray job submit --submission-id {submission_id} --working-dir . -- "
                      f"python jobs/pretrain.py --config smoke train.run_name={run_name} train.storage_path={storage}",
        timeout=420)
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(stack["env"]["RAY_API_SERVER_ADDRESS"]).get_job_status(submission_id)
    assert status == JobStatus.SUCCEEDED, submitted.stdout[-6000:] + submitted.stderr[-3000:]
    api = f"{stack['env']['MLFLOW_TRACKING_URI']}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "crate-lm"}, timeout=10)
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    found = requests.post(f"{api}/runs/search", timeout=10, json={
        "experiment_ids": [experiment_id], "filter": f"attributes.run_name = '{run_name}'"}).json()
    assert len(found.get("runs", [])) == 1, found
    return {"api": api, "run": found["runs"][0], "experiment_id": experiment_id, "name": run_name}


def test_up_is_idempotent_and_status_reports_both_services(stack):
    again = run_stack("up", "--dir", str(stack["dir"]), *stack["overrides"])
    assert again.returncode == 0, again.stderr
    assert json.loads((stack["dir"] / "stack.json").read_text())["pids"] == stack["state"]["pids"]
    status = run_stack("status", "--dir", str(stack["dir"]))
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("running") == 2
    assert requests.get(f"{stack['env']['MLFLOW_TRACKING_URI']}/health", timeout=5).ok


def test_submitted_pretraining_run_has_params_metrics_and_a_checkpoint(pretraining_run):
    api, run = pretraining_run["api"], pretraining_run["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.max_steps"] == str(SMOKE_STEPS)
    assert params["model.preset"] == "crate-tiny"
    metrics = {m["key"]: m for m in run["data"]["metrics"]}
    assert "loss/train" in metrics and metrics["loss/train"]["step"] == SMOKE_STEPS
    run_id = run["info"]["run_id"]
    listed = requests.get(f"{api}/artifacts/list", params={"run_id": run_id, "path": "model"}, timeout=10).json()
    assert [f for f in listed.get("files", []) if not f["is_dir"] and f["file_size"] > 0], listed


def test_mlflow_ui_shows_the_run_name_and_its_metrics(stack, pretraining_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the UI check needs Debian's chromium and chromium-driver (platform/test installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        options.add_argument(flag)
    run = pretraining_run["run"]
    url = (f"{stack['env']['MLFLOW_TRACKING_URI']}/#/experiments/{pretraining_run['experiment_id']}"
           f"/runs/{run['info']['run_id']}")
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(url)
        page = lambda: browser.find_element("tag name", "body").text  # noqa: E731
        WebDriverWait(browser, 60).until(lambda _: "loss/train" in page() and pretraining_run["name"] in page())
        loss = next(m["value"] for m in run["data"]["metrics"] if m["key"] == "loss/train")
        assert str(loss).removesuffix(".0") in page(), page()  # JavaScript prints floats as Python does, less ".0"
    finally:
        browser.quit()


def test_down_leaves_no_process_behind(stack):
    stopped = run_stack("down", "--dir", str(stack["dir"]))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert stack_processes(stack["state"]["stack_id"]) == []
    assert not Path(stack["state"]["ray_temp_dir"]).exists()
    assert run_stack("status", "--dir", str(stack["dir"])).returncode == 3
    with socket.socket() as sock:  # the MLflow port is free again (nothing listens; TIME_WAIT is fine)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(stack["env"]["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])))
