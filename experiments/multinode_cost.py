"""What the multi-node path costs against the single-node one, on this machine (recorded in docs/benchmarks.md).

- tokens/s of the same tiny run (the smoke recipe, 2 DeepSpeed ZeRO-2 workers, `steps` steps): one Ray node with
  the checkpoints on its local disk, vs three Ray nodes (tests/multinode.py: a head and two worker nodes, one worker
  on each) with the checkpoints in the local S3 store (crate.objectstore);
- the time to persist one of those checkpoints: copied to a local folder vs uploaded to the bucket with pyarrow (what
  Ray Train does with a `storage_path`).

    PYTHONPATH=. python experiments/multinode_cost.py [steps]      # one JSON line per measurement
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the multi-node cluster the tests use

from crate.cluster import connect_ray  # noqa: E402
from crate.config import load_config  # noqa: E402
from crate.objectstore import STORAGE_URI, LocalObjectStore, filesystem  # noqa: E402
from crate.train import PretrainConfig, launch  # noqa: E402
from multinode import WORKER_NODE, MultiNodeCluster  # noqa: E402

RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CRATE_RAY_STARTED_HERE")


def train(storage: str, run_name: str, steps: int, *extra: str) -> dict:
    cfg = load_config(PretrainConfig, "smoke", [
        "train.num_workers=2", "train.cpus_per_worker=1", "data.read_cpus=0.25", "tracking.enabled=false",
        f"train.storage_path={storage}", f"train.run_name={run_name}", f"train.max_steps={steps}",
        f"train.optim.decay_steps={steps}", f"train.log_interval={steps}", "train.eval_interval=100000",
        f"train.checkpoint_interval={steps}", *extra])
    started = time.perf_counter()
    result = launch(cfg)
    return {"tokens_per_s": round(result.metrics["perf/tokens_per_s"]), "wall_s": round(time.perf_counter() - started, 1),
            "checkpoint": result.checkpoint}


def single_node(steps: int, tmp: Path) -> dict:
    import ray

    saved = {key: os.environ.get(key) for key in RAY_ENV}
    connect_ray(num_cpus=3, object_store_memory=200 << 20, include_dashboard=False)
    try:
        return train(str(tmp / "runs"), "single", steps)
    finally:
        ray.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def multi_node(steps: int) -> dict:
    cluster = MultiNodeCluster(head_cpus=1)
    try:
        for name in ("node_a", "node_b"):
            cluster.add_worker_node(name)
        return train(STORAGE_URI, "multi", steps, "train.placement_strategy=STRICT_SPREAD",
                     f"train.worker_resources.{WORKER_NODE}=1")
    finally:
        cluster.shutdown()


def persist_times(checkpoint: Path, tmp: Path, repeats: int = 5) -> dict:
    import pyarrow.fs

    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    local, bucket = [], []
    for i in range(repeats):
        started = time.perf_counter()
        shutil.copytree(checkpoint, tmp / f"copy{i}")
        local.append(time.perf_counter() - started)
        fs, path = filesystem(f"{STORAGE_URI}/persist/copy{i}")
        started = time.perf_counter()
        pyarrow.fs.copy_files(str(checkpoint), path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
        bucket.append(time.perf_counter() - started)
    return {"checkpoint_mb": round(size / 2**20, 1), "local_disk_s": round(statistics.median(local), 3),
            "bucket_s": round(statistics.median(bucket), 3)}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    tmp = Path(tempfile.mkdtemp(prefix="crate-cost-"))
    with LocalObjectStore() as store:
        os.environ.update(store.env)
        single = single_node(steps, tmp)
        print(json.dumps({"path": "1 node, local disk", "steps": steps, **single}), flush=True)
        multi = multi_node(steps)
        print(json.dumps({"path": "3 nodes, S3 bucket", "steps": steps, **multi}), flush=True)
        print(json.dumps({"persist": "one checkpoint", **persist_times(Path(single["checkpoint"]), tmp)}), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
