"""The README's Quickstart, walked as a new user walks it: its first command, typed verbatim in a fresh copy of
the repository with nothing set in the environment (no MLFLOW_TRACKING_URI, no storage variables), then the
store that the README's `mlflow ui` command names holds the run, its loss history, its checkpoint and its plot.

The install half of the command is checked, not run: the environment running the suite has the package and the
pinned torch already (so `pip install` would be a no-op), and re-pointing its editable install at a temporary
copy would break it; the copy's own code is what runs (PYTHONPATH stands for that editable install)."""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e  # the README's commands in a fresh clone

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# What the test walks; a change to the README's commands must come here too.
QUICKSTART = "pip install torch==2.13.0 -e '.[cluster]' && python jobs/pretrain.py"
MLFLOW_UI = "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts"
TESTS = "platform/test"
CHAIN = """python jobs/interpret.py --checkpoint runs/crate-tiny-*/checkpoint_00000150/model.pt --corpus stdlib://val --metric tar,random
python jobs/compare.py interp/*/                   # the paper's Table 2 over the results under interp/
python jobs/view.py interp/*/ --output-dir viewer  # a static neuron viewer: open viewer/index.html"""
KEPT = ("PATH", "HOME", "LANG", "TORCH_EXTENSIONS_DIR")  # a user's shell has these; nothing of the platform's
NOISE = ("TrainingReport(", "Setting accelerator to CPU", "Creating initial MLflow database tables", "built successfully",
         "PreemptionWatcher", "Found multiple active Ray instances", "Starting execution of Dataset")


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_the_readme_names_the_commands_this_test_walks():
    quickstart = bash_blocks(readme_section("Quickstart"))
    assert quickstart[:4] == [QUICKSTART, MLFLOW_UI, CHAIN, TESTS]
    assert f"\n{TESTS}\n" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command, verbatim


def user_env(clone: Path) -> dict[str, str]:
    """A user's shell: nothing of the platform's set; the suite's venv first on PATH, the clone as the install."""
    env = {key: os.environ[key] for key in KEPT if key in os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(clone)
    return env


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, repository_copy):
    """The README's first command, run once in a fresh copy: (the copy, its completed process)."""
    install, command = (part.strip() for part in QUICKSTART.split("&&"))
    # the install is a no-op here: the pinned torch, this package and the extras it names are what the environment has
    pins = dict(re.findall(r"(\S+)==(\S+)", install))
    assert metadata.version("torch").split("+")[0] == pins["torch"] and metadata.version("crate-lm-platform")
    extras = re.search(r"-e '\.\[([\w,]+)\]'", install).group(1).split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in (r for extra in extras for r in optional[extra]):
        metadata.version(re.split(r"[\[=<>~ ;]", requirement)[0])  # PackageNotFoundError if the extra is missing
    clone = repository_copy(tmp_path_factory.mktemp("user") / "crate-lm")
    out = subprocess.run(command, shell=True, cwd=clone, env=user_env(clone), capture_output=True, text=True,
                         timeout=1400)
    return clone, out


@pytest.mark.timeout(1500)
def test_the_quickstart_as_written_trains_and_the_readme_store_shows_it(quickstart, tmp_path):
    clone, out = quickstart
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-4000:]

    # the store the README's command opens, from the directory the user launched in
    args = shlex.split(MLFLOW_UI)
    store_uri = args[args.index("--backend-store-uri") + 1]
    artifact_root = (clone / args[args.index("--default-artifact-root") + 1]).resolve()
    store = clone / store_uri.removeprefix("sqlite:///")
    assert store.is_file(), f"no store at {store}: {output[-3000:]}"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("crate-lm")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"

    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
    max_steps = int(run.data.params["train.max_steps"])
    assert sorted(steps) == sorted(set(steps)) and max(steps) == max_steps and len(steps) >= 10
    assert "loss/val" in run.data.metrics

    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(artifact_root), run.info.artifact_uri
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots"} <= artifacts, artifacts
    plot = Path(client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the checkpoint where the README says (<train.storage_path>/<run name>/checkpoint_<step>/, ./runs by default)
    name = run.data.tags["crate.run_name"]
    checkpoint = clone / "runs" / name / f"checkpoint_{max_steps:08d}"
    assert (checkpoint / "model.pt").is_file(), sorted(p.name for p in (clone / "runs").rglob("*"))[:20]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["mlflow_run_id"] == run.info.run_id

    # the summary names the run, its store and the command that opens it; the library noise stays out
    assert run.info.run_id in out.stdout and f"mlflow ui --backend-store-uri sqlite:///{store}" in out.stdout
    assert "sqlite:////tmp/ray/" not in output
    assert not [line for line in output.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.timeout(900)
def test_the_chain_after_the_quickstart_runs_as_written(quickstart):
    """pretrain → interpret → compare → view, each line of the README typed in the directory of the quickstart."""
    clone, trained = quickstart
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    for line in CHAIN.splitlines():
        out = subprocess.run(line, shell=True, cwd=clone, env=user_env(clone), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (line, (out.stdout + out.stderr)[-3000:])
    [results] = (clone / "interp").glob("*/results.parquet")
    assert (results.parent / "summary.json").is_file()
    assert (clone / "comparison" / "table2.md").read_text().count("crate") >= 1
    assert (clone / "viewer" / "index.html").is_file()


RAY_COMPONENTS_VIEW = """
import subprocess, sys, ray
other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
                          "print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
try:
    assert other.stdout.readline().strip() == "up"
    from crate.cluster import connect_ray
    connect_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    def components_view():  # what Ray Train's placement-group cleaner does: the State API, no address given
        from ray.util.state import list_nodes
        return len(list_nodes())

    print("nodes", ray.get(components_view.remote()))
finally:
    other.terminate()
    other.wait(120)
"""


@pytest.mark.timeout(600)
def test_rays_own_components_find_the_instance_a_job_started_with_another_one_on_the_host(tmp_path):
    """Otherwise Ray Train's placement-group cleaner prints a 30-line `Found multiple active Ray instances`
    traceback in every run on a machine where another Ray instance runs."""
    env = {key: os.environ[key] for key in KEPT if key in os.environ}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", RAY_COMPONENTS_VIEW], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=540)
    assert out.returncode == 0 and "nodes 1" in out.stdout, (out.stdout + out.stderr)[-3000:]


LOG_LINES = """
import logging, os
from crate.cli import setup_logging
setup_logging()
logging.getLogger("/ray/train/v2/_internal/execution/context.py").info(
    "Reporting training result 3: TrainingReport(checkpoint=..., metrics={...}) from rank 0")
logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
logging.getLogger("crate.train").info("step 10/150 | loss 7.1")
print(os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX") is not None)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_job_prints_its_own_lines_and_the_libraries_noise_only_when_verbose(verbose):
    env = {key: os.environ[key] for key in KEPT if key in os.environ}
    env.update(PYTHONPATH=str(ROOT), **({"CRATE_VERBOSE": "1"} if verbose else {}))
    out = subprocess.run([sys.executable, "-c", LOG_LINES], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "step 10/150 | loss 7.1" in out.stderr
    noise = [n for n in ("TrainingReport(", "Creating initial MLflow", "Setting accelerator to CPU") if n in out.stderr]
    assert (noise == ["TrainingReport(", "Creating initial MLflow", "Setting accelerator to CPU"]) if verbose else not noise
    assert out.stdout.strip() == str(not verbose)  # Ray's workers' lines are filtered on the driver the same way
