"""The torch-only install is a real install: a fresh virtual environment (no system site-packages) gets
`pip install torch==2.13.0 -e <a copy of the repository>` from pip's cache and index, and has none of the
orchestration stack. In it the model builds, the single-process trainer trains through its job, the GPU host's
checks run, and a job that needs Ray says in one line which extra brings it."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from crate.cli import CLUSTER_MODULES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
INSTALL = ["torch==2.13.0", "-e"]  # + the repository: the README's install, less the cluster extra


def cluster_extra() -> list[str]:
    """The import names of pyproject.toml's `cluster` extra (each distribution's name, as Python spells it)."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cluster"]
    return [re.split(r"[\[=<>~ ;]", requirement)[0].replace("-", "_") for requirement in extra]


@pytest.fixture(scope="module")
def torch_only(tmp_path_factory, repository_copy):
    """(the venv's python, the copy it installed, its environment): PYTHONPATH unset, so the install is what runs."""
    work = tmp_path_factory.mktemp("torch-only")
    repo = repository_copy(work / "crate-lm")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    python = work / "venv" / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", *INSTALL, str(repo)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    return python, repo, env


def run(torch_only, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    python, repo, env = torch_only
    return subprocess.run([python, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_cluster_extra_is_what_the_jobs_name_when_it_is_missing():
    assert sorted(CLUSTER_MODULES) == sorted(cluster_extra())


def test_the_install_has_the_core_and_none_of_the_cluster_extra(torch_only):
    probe = ("import importlib.util, json, crate, torch; print(json.dumps([torch.__version__, crate.__file__, "
             f"[m for m in {cluster_extra()!r} if m != 'requests' and importlib.util.find_spec(m)]]))")
    out = run(torch_only, "-c", probe)
    assert out.returncode == 0, out.stderr[-3000:]
    torch_version, crate_file, present = json.loads(out.stdout)
    assert torch_version.startswith("2.13.0") and Path(crate_file).is_relative_to(torch_only[1])
    assert present == []  # (requests comes with the tokenizer and the hub client, so it may be there)


def test_the_model_and_the_single_process_trainer_run_with_torch_alone(torch_only, tmp_path):
    model = run(torch_only, "-c", "import torch; from crate.model import build_model; "
                                  "print(tuple(build_model('crate-tiny')(torch.zeros(1, 8, dtype=torch.long))[0].shape[:2]))")
    assert model.returncode == 0 and model.stdout.strip() == "(1, 8)", model.stderr[-3000:]
    out = run(torch_only, "jobs/pretrain.py", "--config", "smoke", "train.launcher=local", "data.engine=local",
              "train.engine=torch", f"train.storage_path={tmp_path}", "train.run_name=torch-only")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("run torch-only: 6 steps"), out.stdout
    assert (tmp_path / "torch-only" / "checkpoint_00000006" / "model.pt").is_file()
    assert "without tracking" in out.stderr  # MLflow missing: the job says so and goes on


def test_a_job_that_needs_ray_says_in_one_line_which_extra_to_install(torch_only, tmp_path):
    out = run(torch_only, "jobs/pretrain.py", "--config", "smoke", f"train.storage_path={tmp_path}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == ("pretrain.py: error: this needs ray, which the torch-only install leaves "
                                           "out; install the orchestration stack with: pip install -e '.[cluster]'")


def test_the_device_check_runs_on_torch_alone_one_json_line_per_check(torch_only):
    out = run(torch_only, "platform/gpu-check", "--dry-run", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {line["check"]: line for line in map(json.loads, out.stdout.splitlines())}
    assert set(lines) == {"environment", "fwd_bwd/crate/eager", "fwd_bwd/crate/compile", "fwd_bwd/gpt/eager",
                          "fwd_bwd/gpt/compile", "torch_engine", "benchmark/core", "benchmark/platform",
                          "records", "benchmark_records", "summary"}
    assert all(line["ok"] for line in lines.values()), lines
    assert "DeepSpeed" in lines["benchmark/platform"]["skipped"]
    assert [r["preset"] for r in lines["benchmark/core"]["results"]] == ["crate-tiny", "gpt-tiny"]
