"""The interpretability job on Ray: records collected by sharded actors, scored by an actor pool, one MLflow run
linked to the training run, idempotent reruns — and a driver SIGKILLed mid-scoring that resumes with no lost or
duplicated rows."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from crate.config import load_config
from crate.interp import InterpConfig, run_interpretability
from crate.interp.schema import RESULT_KEY, read_provenance
from crate.interp.store import ResultStore
from crate.model import build_model, save_model
from test_interp_http import FakeOpenAI

pytestmark = pytest.mark.integration  # Ray actors and the job as a subprocess

REPO = Path(__file__).resolve().parents[1]
TEXT = ("The cat sat on the mat. A dog ran after the cat, and the cat ran up a tree. "
        "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n")


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp-job")
    torch.manual_seed(0)
    save_model(build_model("crate-tiny"), root / "tiny.pt", mlflow_run_id="train-run-1", run_name="tiny-run", step=5)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXT * (i % 5 + 1)}) + "\n" for i in range(60)))
    return root


def overrides(subject, out, **extra) -> list[str]:
    base = {"checkpoint": subject / "tiny.pt", "corpus": subject / "corpus.jsonl", "output_dir": out,
            "records.blocks": 12, "records.block_length": 64, "records.window": 16, "records.top": 10,
            "records.random": 10, "records.quantile_pool": 20, "records.per_quantile": 2, "records.batch_blocks": 4,
            "sample": 6, "metrics": "[tar,random]", "tracking.system_metrics": "false",
            "tracking.uri": f"sqlite:///{subject}/mlflow.db", **extra}
    return [f"{k}={v}" for k, v in base.items()]


def test_job_collects_with_actors_scores_and_tracks_one_linked_run(cluster, subject, tmp_path):
    cfg = load_config(InterpConfig, None, overrides(subject, tmp_path, **{"workers.collect_actors": 2}))
    summary = run_interpretability(cfg)
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.num_rows == 2 * 6 * 2 and len({tuple(r.values()) for r in table.select(list(RESULT_KEY)).to_pylist()}) == 24
    failures = [r["reason"] for r in table.to_pylist() if r["status"] == "failed"]
    assert not failures, failures[:3]
    assert set(table["checkpoint_run_id"].to_pylist()) == {"train-run-1"} and set(table["model"].to_pylist()) == {"tiny-run@5"}  # named by its training run
    assert [(m["metric"], m["layers"]) for m in summary["models"]] == [("random", 2), ("tar", 2)]
    records_dir = next((tmp_path / "records").iterdir())
    provenance = read_provenance(records_dir / "layer_00.parquet")
    assert provenance["checkpoint_run_id"] == "train-run-1" and provenance["blocks"] == 12
    assert provenance["corpus"] == str(subject / "corpus.jsonl")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{subject}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["crate.model_run_id"] == "train-run-1" and run.data.tags["crate.job"] == "interpret"
    history = client.get_metric_history(run.info.run_id, "crate-paper/tar/mean")
    assert sorted(m.step for m in history) == [0, 1]
    assert "layers.png" in [a.path for a in client.list_artifacts(run.info.run_id)]

    again = run_interpretability(cfg)  # everything is done: nothing is rescored, the same run is reopened
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert pq.read_table(tmp_path / "results.parquet").equals(table)


def rows_written(out: Path) -> int:
    """Rows committed to the store's database (read-only, beside the running job)."""
    database = out / "results.sqlite"
    if not database.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # the job has not created the table yet
        return 0


def test_a_killed_job_resumes_without_lost_or_duplicated_rows(cluster, subject, tmp_path):
    server = FakeOpenAI(latency_s=0.25)
    command = [sys.executable, str(REPO / "jobs" / "interpret.py"), "--backend", "http", "--sample", "8",
               "backend.explainer_model=fake", f"backend.base_url={server.url}", "workers.actors=1",
               "backend.prompt_format=crate-v1", "random_only=rescore",  # the fake server's format; one explanation per neuron
               "workers.concurrency=2", "workers.compact_every=3", "tracking.enabled=false",
               *overrides(subject, tmp_path, sample=8)]
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONPATH": str(REPO)}
    try:
        job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 120
        while rows_written(tmp_path) < 6 and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, f"the job ended before it could be killed: {job.stderr.read().decode()[-2000:]}"
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        store = ResultStore(tmp_path)  # the lock died with the driver
        before = {tuple(r[k] for k in RESULT_KEY): r["created_at"] for r in store.table().to_pylist()}
        store.close()
        explained_before = sum(path.endswith("/chat/completions") for path, _, _ in server.requests)
        assert 6 <= len(before) < 32

        finished = subprocess.run(command, env=env, capture_output=True, timeout=300)
        assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    finally:
        server.close()
    table = pq.read_table(tmp_path / "results.parquet")
    keys = [tuple(r[k] for k in RESULT_KEY) for r in table.to_pylist()]
    assert len(keys) == len(set(keys)) == 2 * 8 * 2  # 2 layers × 8 sampled neurons × 2 metrics, once each
    after = {tuple(r[k] for k in RESULT_KEY): r["created_at"] for r in table.to_pylist()}
    assert all(after[key] == created for key, created in before.items())  # finished work was kept, not redone
    explained = sum(path.endswith("/chat/completions") for path, _, _ in server.requests)
    assert explained - explained_before <= 16 - len(before) // 2 + 2  # only unfinished neurons (+ those in flight)
    failures = [r["reason"] for r in table.to_pylist() if r["status"] == "failed"]
    assert not failures, failures[:3]


def test_bad_input_is_refused_before_any_work(subject, tmp_path):
    from crate.errors import ConfigError

    cases = {"checkpoint": {"checkpoint": tmp_path / "missing.pt"}, "layers": {"layers": "[0,5]"},
             "corpus": {"corpus": tmp_path / "missing.jsonl"},
             "backend.explainer_model": {"backend.kind": "hf", "backend.explainer_model": tmp_path / "no-model"},
             "records.block_length": {"records.block_length": 128, "records.window": 16}}
    for field, bad in cases.items():
        cfg = load_config(InterpConfig, None, overrides(subject, tmp_path / field, **bad))
        with pytest.raises(ConfigError) as error:
            run_interpretability(cfg)
        assert error.value.field == field, error.value
        assert not (tmp_path / field / "records").exists()


def test_actors_that_ask_for_gpus_the_cluster_lacks_fail_at_start_naming_the_field(cluster, subject, tmp_path):
    from crate.errors import ConfigError

    cases = {"workers.gpus_per_actor": {"workers.gpus_per_actor": 1},  # the backends, after the records
             "workers.collect_gpus": {"workers.actors": 0, "workers.collect_actors": 1, "workers.collect_gpus": 1}}
    for field, asks in cases.items():
        cfg = load_config(InterpConfig, None, overrides(subject, tmp_path / field, **asks, **{"workers.gpu_wait_s": 2}))
        started = time.monotonic()
        with pytest.raises(ConfigError) as error:
            run_interpretability(cfg)
        assert error.value.field == field and "gpu_wait_s" in str(error.value), error.value
        assert time.monotonic() - started < 60 and not (tmp_path / field / "results.parquet").exists()


def test_the_readme_command_after_the_quickstart_runs_on_its_tiny_model(cluster, subject, tmp_path):
    # The quickstart's model has a 64-token context: the collection follows it unless told otherwise.
    checkpoint = tmp_path / "runs" / "quickstart" / "checkpoint_00000150" / "model.pt"
    torch.manual_seed(0)
    save_model(build_model("crate-tiny"), checkpoint, mlflow_run_id="train-run-2", run_name="quickstart", step=150)
    command = [sys.executable, str(REPO / "jobs" / "interpret.py"), "--checkpoint",
               "runs/quickstart/checkpoint_00000150/model.pt", "--corpus", "stdlib://val", "--metric", "tar,random"]
    env = {**os.environ, "RAY_ADDRESS": cluster, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "| crate-paper | tar |" in finished.stdout and "| crate-paper | random |" in finished.stdout, finished.stdout
    (out,) = (tmp_path / "interp").iterdir()
    assert out.name.startswith("quickstart@150-") and (out / "summary.json").is_file()
