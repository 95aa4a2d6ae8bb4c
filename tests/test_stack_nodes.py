"""`platform/stack up --nodes 3`, for real: a Ray head and two worker nodes on loopback, the S3 store and MLflow
with its artifact root in the store; a task on each worker node writes to the bucket and an MLflow artifact lands
there; the README's multi-node `ray job submit` command, as written, trains on the two worker nodes with its
checkpoint in the bucket; `down` stops every process; after `up` the bucket and the artifact are still there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from crate.ops.stack import StackState, stack_processes
from ports import free_ports

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "platform" / "stack"
README = REPO / "README.md"

WRITE = """
import ray, mlflow, tempfile, pathlib
from crate.objectstore import STORAGE_URI, filesystem
ray.init()
assert sum(n["Alive"] for n in ray.nodes()) == 3, ray.nodes()

@ray.remote(num_cpus=0)
def write(name):
    import os
    fs, path = filesystem(f"{STORAGE_URI}/probe/{name}.txt")
    with fs.open_output_stream(path) as out:
        out.write(ray.get_runtime_context().get_node_id().encode())
    return os.environ["TMPDIR"]

scratch = ray.get([write.options(resources={name: 0.01}).remote(name) for name in ("node1", "node2")])
assert len(set(scratch)) == 2 and all(path.endswith("/tmp") for path in scratch), scratch
with mlflow.start_run(experiment_id=mlflow.create_experiment("nodes")) as run:
    note = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    note.write_text("kept in the bucket")
    mlflow.log_artifact(str(note))
print("RUN", run.info.run_id)
"""

READ = """
import sys, mlflow
from crate.objectstore import ARTIFACTS_URI, STORAGE_URI, list_files, read_text
assert list_files(f"{STORAGE_URI}/probe") == ["node1.txt", "node2.txt"], list_files(STORAGE_URI)
run_id = sys.argv[1]
assert any(f.endswith(f"{run_id}/artifacts/note.txt") for f in list_files(ARTIFACTS_URI)), list_files(ARTIFACTS_URI)
path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="note.txt")
assert open(path).read() == "kept in the bucket"
print("READ OK")
"""


CHECKPOINTED = """
import sys
from crate.objectstore import STORAGE_URI, list_files
files = list_files(f"{STORAGE_URI}/{sys.argv[1]}")
assert any(f.endswith("/model.pt") for f in files), files
print("CHECKPOINT OK")
"""


def readme_submit_command() -> str:
    """The `ray job submit` command of the README's "Several nodes" section, continuation lines joined, as a user
    pastes it."""
    section = README.read_text().split("\n## Several nodes\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    lines = [line for line in block.splitlines() if line.startswith("ray job submit ")]
    assert len(lines) == 1, f"expected one `ray job submit` command in the README's Several nodes block: {block}"
    return lines[0]


def stack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK), *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHON": sys.executable})


def in_stack_shell(stack_dir: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` in a shell that sourced the stack's env file, as the docs tell users to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(["bash", "-c", f'set -a; . {stack_dir}/env; set +a; "$0" -c "$1" "${{@:2}}"',
                           sys.executable, script, *args], capture_output=True, text=True, timeout=300, env=env)


def submit_readme_job(stack_dir: Path, run_name: str) -> subprocess.CompletedProcess:
    """The README's `ray job submit` command, typed from the repository in a shell that sourced the stack's env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "PYTHONPATH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    command = f"{readme_submit_command()} train.run_name={run_name}"
    return subprocess.run(["bash", "-c", f"set -a; . {stack_dir}/env; set +a; {command}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_stack_of_three_nodes_keeps_its_bucket_and_artifacts_across_down_and_up(tmp_path):
    gcs, dashboard, client, agent, mlflow, s3 = free_ports(6)
    up = ["up", "--nodes", "3", "--dir", str(tmp_path / "stack"), "ray.num_cpus=1", "node_cpus=1",
          f"ray.port={gcs}", f"ray.dashboard_port={dashboard}", f"ray.client_port={client}",
          f"ray.dashboard_agent_port={agent}", f"mlflow.port={mlflow}", f"s3.port={s3}", "s3.snapshot_interval_s=1"]
    started = stack(*up)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for line in ("node1", "node2", "s3 ", "s3://crate-checkpoints/runs", "s3://crate-mlflow/artifacts"):
            assert line in started.stdout, started.stdout
        wrote = in_stack_shell(tmp_path / "stack", WRITE)
        assert wrote.returncode == 0, wrote.stdout + wrote.stderr[-4000:]
        run_id = wrote.stdout.split("RUN ", 1)[1].split()[0]
        # the README's multi-node pretraining, as written: two workers on the two worker nodes, checkpoints in
        # the bucket
        trained = submit_readme_job(tmp_path / "stack", "readme-nodes")
        assert trained.returncode == 0 and "succeeded" in trained.stdout, \
            trained.stdout[-6000:] + trained.stderr[-3000:]
        checkpointed = in_stack_shell(tmp_path / "stack", CHECKPOINTED, "readme-nodes")
        assert "CHECKPOINT OK" in checkpointed.stdout, checkpointed.stdout + checkpointed.stderr[-4000:]
    finally:
        state = StackState.load(tmp_path / "stack")
        stopped = stack("down", "--dir", str(tmp_path / "stack"))
    assert stopped.returncode == 0, stopped.stderr
    assert stack_processes(state) == []
    assert (tmp_path / "stack" / "s3" / "manifest.json").is_file()
    restarted = stack(*up)
    try:
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        read = in_stack_shell(tmp_path / "stack", READ, run_id)
        assert read.returncode == 0 and "READ OK" in read.stdout, read.stdout + read.stderr[-4000:]
    finally:
        assert stack("down", "--dir", str(tmp_path / "stack")).returncode == 0
