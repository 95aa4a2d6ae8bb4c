"""Pretraining across several Ray nodes with every checkpoint in a real S3 store (tests/multinode.py's cluster on
this machine, crate.objectstore's moto server): two DeepSpeed workers on two different worker nodes under ZeRO-2
and ZeRO-3, `train.storage_path=s3://...`; a whole worker node killed mid-run (the one holding rank 0, then the
one holding rank 1) and replaced, the run continuing from the bucket's last checkpoint at the same world size with
the same losses and the same blocks as an uninterrupted run; a run resumed by name on a fresh cluster."""

import json
import os
import subprocess
import sys
import threading
import time

from pathlib import Path

import pytest

from crate.config import load_config
from crate.data import train_batches
from crate.model import load_checkpoint
from crate.objectstore import ARTIFACTS_URI, STORAGE_URI, LocalObjectStore, list_files, read_text
from crate.train import PretrainConfig, launch
from crate.train.loop import chain_digest
from multinode import WORKER_NODE, MultiNodeCluster, free_port

pytestmark = pytest.mark.integration

STEPS, CHECKPOINT_EVERY = 12, 4


class Cluster:
    """The module's cluster (head + node_a + node_b), replaceable by a fresh one."""

    def __init__(self):
        self.nodes = MultiNodeCluster(head_cpus=1)
        self.workers = ["node_a", "node_b"]
        for name in self.workers:
            self.nodes.add_worker_node(name)
        self.added = 0

    def replace(self, name: str) -> str:
        """Kill worker node `name` (its scratch deleted) and add a fresh one; returns the new node's name."""
        self.nodes.remove(name)
        assert not self.nodes.scratch(name).exists()
        self.added += 1
        new = f"node_new{self.added}"
        self.nodes.add_worker_node(new)
        self.workers = [w for w in self.workers if w != name] + [new]
        return new

    def restart(self) -> None:
        self.nodes.shutdown()
        self.__init__()


@pytest.fixture(scope="module")
def store():
    with LocalObjectStore() as s3:
        saved = {key: os.environ.get(key) for key in s3.env}
        os.environ.update(s3.env)  # the driver, and through it every Ray process it starts, reaches the store
        yield s3
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def cluster(store):
    cluster = Cluster()
    yield cluster
    cluster.nodes.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(store, tmp_path_factory):
    """An MLflow tracking server whose artifact root is the bucket (the server proxies artifacts: clients need no
    S3 access of their own)."""
    import requests

    port, tmp = free_port(), tmp_path_factory.mktemp("mlflow")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                               "--artifacts-destination", ARTIFACTS_URI],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=open(tmp / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        raise TimeoutError((tmp / "server.log").read_text()[-3000:])
    yield url
    os.killpg(server.pid, 15)
    server.wait(timeout=60)


def config(run_name, *extra):
    return load_config(PretrainConfig, "smoke", [
        "train.num_workers=2", "train.cpus_per_worker=1", "train.placement_strategy=STRICT_SPREAD",
        f"train.worker_resources.{WORKER_NODE}=1", "train.controller_failure_limit=0", "train.max_failures=2",
        "data.read_cpus=0.25", "tracking.enabled=false", f"train.storage_path={STORAGE_URI}",
        f"train.run_name={run_name}", f"train.max_steps={STEPS}", f"train.optim.decay_steps={STEPS}",
        "train.log_interval=1", "train.eval_interval=100", f"train.checkpoint_interval={CHECKPOINT_EVERY}",
        "train.keep_checkpoints=3", *extra])


def trainer_state(run_name, step):
    return json.loads(read_text(f"{STORAGE_URI}/{run_name}/checkpoint_{step:08d}/trainer_state.json"))


def losses(state):
    return [(step, loss) for step, loss in state["history"]["train"]]


@pytest.fixture(scope="module")
def reference(cluster):
    """An uninterrupted ZeRO-2 run: what every interrupted one must reproduce."""
    result = launch(config("reference"))
    assert result.checkpoint == f"{STORAGE_URI}/reference/checkpoint_{STEPS:08d}"
    return trainer_state("reference", STEPS)


def test_ranks_run_on_distinct_worker_nodes_and_write_every_shard_to_the_bucket(cluster, reference):
    nodes = reference["nodes"]
    assert len(set(nodes)) == 2 and set(nodes) <= {cluster.nodes.node_id(w) for w in cluster.workers}, nodes
    files = list_files(f"{STORAGE_URI}/reference/checkpoint_{STEPS:08d}")
    assert {"model.pt", "trainer_state.json", "manifest_rank0.json", "manifest_rank1.json", "data_state_rank0.json",
            "data_state_rank1.json", "rng_rank0.pt", "rng_rank1.pt"} <= set(files), files
    assert {"engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(files), files
    assert [step for step, _ in losses(reference)] == list(range(1, STEPS + 1))


def test_every_block_is_trained_on_once_across_the_nodes(reference):
    """Each rank's digest is that of its own share of the stream, computed here from the data alone; the two
    shares have no block in common."""
    cfg = config("reference")
    per_rank = STEPS * cfg.train.grad_accum_steps
    blocks, digests = [], []
    for rank in range(2):
        stream, digest, mine = train_batches(cfg.data, cfg.train.micro_batch_size, rank, 2), "", []
        for _ in range(per_rank):
            batch = next(stream)
            digest = chain_digest(digest, batch.tokens)
            mine += [row.numpy().tobytes() for row in batch.tokens]
        stream.close()
        blocks.append(mine)
        digests.append(digest)
    assert reference["data_digests"] == digests
    assert len(set(blocks[0]) | set(blocks[1])) == len(blocks[0]) + len(blocks[1]) == 2 * per_rank * 4


def launch_in_background(cfg) -> tuple[threading.Thread, dict]:
    """The driver in a thread: the main thread kills and adds nodes (Ray's node startup installs signal handlers,
    which only the main thread may)."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = launch(cfg)
        except BaseException as error:  # noqa: BLE001 - raised again in the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_for_checkpoint(run_name: str, step: int, driver: threading.Thread, timeout_s: float = 600) -> None:
    """Until Ray Train has registered the run's checkpoint at `step` in the bucket."""
    deadline = time.monotonic() + timeout_s
    while driver.is_alive() and time.monotonic() < deadline:
        try:
            if f"checkpoint_{step:08d}" in read_text(f"{STORAGE_URI}/{run_name}/checkpoint_manager_snapshot.json"):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step {step} of {run_name} (driver alive: {driver.is_alive()})")


@pytest.mark.parametrize("rank", [0, 1], ids=["rank0-node-killed", "rank1-node-killed"])
def test_a_killed_node_is_replaced_and_training_continues_from_the_bucket(cluster, reference, rank):
    run_name = f"node-loss-rank{rank}"
    driver, outcome = launch_in_background(config(run_name))
    wait_for_checkpoint(run_name, CHECKPOINT_EVERY, driver)
    killed = cluster.nodes.name_of(trainer_state(run_name, CHECKPOINT_EVERY)["nodes"][rank])
    new = cluster.replace(killed)  # the node holding `rank` dies mid-run; its scratch is deleted; a new one joins
    driver.join(timeout=600)
    assert not driver.is_alive(), "the run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    state = trainer_state(run_name, STEPS)
    assert outcome["result"].metrics["step"] == STEPS
    survivor = next(w for w in cluster.workers if w != new)
    assert sorted(state["nodes"]) == sorted([cluster.nodes.node_id(new), cluster.nodes.node_id(survivor)])
    # no step lost or repeated, the same losses as the uninterrupted run, the same blocks on every rank
    assert [step for step, _ in losses(state)] == list(range(1, STEPS + 1))
    assert [loss for _, loss in losses(state)] == pytest.approx([loss for _, loss in losses(reference)], rel=1e-5)
    assert state["data_digests"] == reference["data_digests"]


def test_zero3_shards_land_in_the_bucket_and_a_run_resumes_by_name_on_a_fresh_cluster(cluster, mlflow_server):
    tracked = ["tracking.enabled=true", f"tracking.uri={mlflow_server}", "tracking.system_metrics=false"]
    launch(config("zero3", "train.zero_stage=3", "train.max_steps=4", *tracked))
    files = list_files(f"{STORAGE_URI}/zero3/checkpoint_00000004")
    assert {"engine/zero_pp_rank_0_mp_rank_00_model_states.pt",
            "engine/zero_pp_rank_1_mp_rank_00_model_states.pt", "model.pt"} <= set(files), files
    cluster.restart()  # nothing of the first cluster's nodes is left: the bucket alone holds the run
    result = launch(config("zero3", "train.zero_stage=3", "train.max_steps=6", *tracked))
    state = trainer_state("zero3", 6)
    assert [step for step, _ in losses(state)] == list(range(1, 7))
    assert set(state["nodes"]) <= {cluster.nodes.node_id(w) for w in cluster.workers}
    assert load_checkpoint(result.model_file).metadata["step"] == 6  # straight from the bucket


def test_mlflow_keeps_the_runs_checkpoint_and_plots_in_the_bucket(mlflow_server, tmp_path):
    """After the ZeRO-3 run above: its MLflow run (one, continued on the fresh cluster) serves the model and the
    loss curve, and their bytes are in the artifact bucket."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("crate-lm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["crate.run_name"] == "zero3"
    metadata = load_checkpoint(client.download_artifacts(run.info.run_id, "model/model.pt", str(tmp_path))).metadata
    assert metadata["step"] == 6 and metadata["mlflow_run_id"] == run.info.run_id
    plot = Path(client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = list_files(ARTIFACTS_URI)
    assert any(f.endswith(f"{run.info.run_id}/artifacts/model/model.pt") for f in stored), stored
    assert any(f.endswith(f"{run.info.run_id}/artifacts/plots/loss_curve.png") for f in stored), stored
