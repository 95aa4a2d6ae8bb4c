"""The local stack, for real: `platform/stack up` starts a Ray head and an MLflow server on loopback, a smoke
pretraining job goes in through the documented `ray job submit` line (docs/platform.md), its MLflow run is checked
through the REST API and in the MLflow UI (headless Chromium), every process of the stack listens on loopback only,
`down` leaves no process and no listening port behind, and after `up` the same run name resumes from the checkpoint
it left in the stack's storage."""

import json
import os
import re
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
from crate.ops.config import StackConfig
from crate.ops.stack import StackState, main, stack_processes
from crate.tracking import resolve_tracking_uri
from ports import free_ports
from test_security import RAY_PROCESSES, assert_loopback_only, listening_sockets, session_processes

pytestmark = pytest.mark.e2e  # the local stack's processes, its MLflow UI in a browser

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "platform" / "stack"
SMOKE_STEPS = 6  # crate/recipes/smoke.yaml: train.max_steps
BROWSER_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"]


def free_port_overrides() -> list[str]:
    gcs, dashboard, client, agent, mlflow = free_ports(5)
    return [f"ray.port={gcs}", f"ray.dashboard_port={dashboard}", f"ray.client_port={client}",
            f"ray.dashboard_agent_port={agent}", f"mlflow.port={mlflow}"]


def run_stack(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK), *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"PYTHON": sys.executable})


DOCS = REPO / "docs" / "platform.md"  # the README's Platform section points here


def documented_submit_line() -> str:
    """The `ray job submit` line of the documented local-stack walk-through, as a user copies it (comment dropped)."""
    section = re.split(r"^#+ Local stack.*$", DOCS.read_text(), maxsplit=1, flags=re.M)[1]
    section = re.split(r"^#+ ", section, maxsplit=1, flags=re.M)[0]
    lines = [line.split("#", 1)[0].strip() for line in section.splitlines() if line.startswith("ray job submit ")]
    assert len(lines) == 1, f"expected one `ray job submit` line in the local-stack section of {DOCS}: {lines}"
    return lines[0]


def in_stack_shell(stack_dir: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` the way the docs tell users to: in a shell that sourced the stack's env file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", "-c", f"set -a; . {stack_dir}/env; set +a; {command}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Bad input fails before anything starts.

@pytest.mark.parametrize("override, field", [
    ("host=0.0.0.0", "host"),  # every interface: name one address
    ("host=localhost", "host"),
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
    assert exports["CRATE_STORAGE_PATH"] == str(Path(".stack/runs").resolve())


def test_a_stack_beyond_loopback_keeps_ray_token_auth_and_mlflow_on_loopback(tmp_path):
    config = load_config(StackConfig, None, ["host=10.1.2.3", f"dir={tmp_path}"])
    exports = config.exports()
    assert exports["RAY_ADDRESS"] == "10.1.2.3:6379"
    assert exports["RAY_AUTH_MODE"] == "token" and exports["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_token")
    assert exports["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"  # nodes may join
    assert exports["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"  # MLflow has no auth of its own


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


def submit_documented_job(stack, run_name: str, *overrides: str) -> subprocess.CompletedProcess:
    """The documented `ray job submit` line with a run name (and a submission id to ask Ray how it ended)."""
    submission_id = f"crate-{run_name}-{uuid.uuid4().hex[:4]}"
    line = documented_submit_line().replace("ray job submit", f"ray job submit --submission-id {submission_id}", 1)
    submitted = in_stack_shell(stack["dir"], " ".join([line, f"train.run_name={run_name}", *overrides]), timeout=420)
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(stack["env"]["RAY_API_SERVER_ADDRESS"]).get_job_status(submission_id)
    assert status == JobStatus.SUCCEEDED, submitted.stdout[-6000:] + submitted.stderr[-3000:]
    return submitted


@pytest.fixture(scope="module")
def pretraining_run(stack):
    """A smoke pretraining job submitted exactly as the docs say; returns its MLflow run (REST API JSON)."""
    run_name = f"stack-e2e-{uuid.uuid4().hex[:6]}"
    submit_documented_job(stack, run_name)
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


def stack_session(stack) -> dict:
    """The stack's processes and listening sockets, found independently of crate.ops.stack: the services' process trees
    and everything pointing into the stack's Ray temp dir."""
    state = stack["state"]
    processes = session_processes(state["ray_temp_dir"], list(state["pids"].values()))
    return {"processes": processes, "sockets": listening_sockets(processes)}


def test_every_process_of_the_stack_listens_on_loopback_only(stack, pretraining_run):
    state = stack["state"]
    assert_loopback_only(state["ray_temp_dir"], list(state["pids"].values()), RAY_PROCESSES)


def test_down_leaves_no_process_and_no_listening_port_behind(stack, pretraining_run):
    import psutil

    before = stack_session(stack)
    names = {p.name() for p in before["processes"].values()}
    assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names  # the ones an env marker cannot find
    stopped = run_stack("down", "--dir", str(stack["dir"]))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    survivors = [f"{pid} {p.name()}" for pid, p in before["processes"].items() if p.is_running()
                 and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, survivors
    assert stack_processes(StackState(**stack["state"])) == []
    assert not session_processes(stack["state"]["ray_temp_dir"], [])
    ports = {int(address.rsplit(":", 1)[1]) for _, address in before["sockets"]}
    listening = {c.laddr.port for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert not ports & listening, f"still listening after down: {sorted(ports & listening)}"
    assert not Path(stack["state"]["ray_temp_dir"]).exists()
    assert run_stack("status", "--dir", str(stack["dir"])).returncode == 3


def test_a_resubmitted_run_resumes_from_its_checkpoint_after_down_and_up(stack, pretraining_run):
    """The first job's checkpoints are in the stack's storage, not in Ray's uploaded working dir that `down`
    removed; the same run name, sent again with a longer budget, continues from the last one."""
    run_dir = stack["dir"] / "runs" / pretraining_run["name"]
    assert (run_dir / f"checkpoint_{SMOKE_STEPS:08d}").is_dir(), sorted(p.name for p in stack["dir"].rglob("*"))[:50]
    started = run_stack("up", "--dir", str(stack["dir"]), *stack["overrides"])
    assert started.returncode == 0, started.stdout + started.stderr
    assert str(stack["dir"] / "runs") in started.stdout  # `up` says where jobs keep their state
    stack["state"] = json.loads((stack["dir"] / "stack.json").read_text())
    resumed = submit_documented_job(stack, pretraining_run["name"], f"train.max_steps={SMOKE_STEPS + 2}")
    assert re.search(rf"resumed at step {SMOKE_STEPS} from checkpoint_{SMOKE_STEPS:08d}", resumed.stdout), \
        resumed.stdout[-4000:]
    assert (run_dir / f"checkpoint_{SMOKE_STEPS + 2:08d}").is_dir()
