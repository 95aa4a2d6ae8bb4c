"""A Ray cluster of several nodes on this machine, for the multi-node tests: Ray's own `ray.cluster_utils.Cluster`
(what Ray's test suite uses), every node a raylet of its own on 127.0.0.1 with its own CPUs, a custom resource
naming it (so a test can put a worker exactly there), a resource every worker node has and the head lacks (so
training workers never land on the head, which a test never kills), and a node-local scratch directory (Ray's temp
dir and TMPDIR of every process on the node) that no other node reads and that `remove` deletes with the node.

GCS health checks run every half second, so a killed node is declared dead in a few seconds, not Ray's default 30.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from crate.ops.raynode import WORKER_NODE  # every worker node has 1; the head has none
from ports import free_port
RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "CRATE_RAY_STARTED_HERE", "RAY_AUTH_MODE", "RAY_TMPDIR")
HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                 "health_check_failure_threshold": 4}


class MultiNodeCluster:
    """A head (`head_cpus`, the driver, Ray Train's controller, Ray Data's read tasks) plus worker nodes added by
    name; the driver (this process) is connected. `shutdown` stops every node and restores the Ray environment."""

    def __init__(self, head_cpus: int = 1, dashboard: bool = False, object_store_mb: int = 100):
        from ray.cluster_utils import Cluster

        from crate.cluster import LOOPBACK, keep_ray_on_loopback

        self._saved_env = {key: os.environ.get(key) for key in RAY_ENV}
        os.environ.pop("RAY_ADDRESS", None)
        keep_ray_on_loopback()  # every raylet and worker inherits it: all of the cluster listens on 127.0.0.1
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # 2 busy cores start workers slowly
        # Short on purpose: Ray puts unix sockets under each node's temp dir (107-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="crate-mn-", dir="/tmp"))
        (self.root / "ray").mkdir()
        os.environ["RAY_TMPDIR"] = str(self.root)  # Cluster notes its address in $RAY_TMPDIR/ray, not /tmp/ray
        self.object_store = object_store_mb << 20
        self.nodes: dict[str, object] = {}
        head_args = self._node_args("head", head_cpus, {})
        if dashboard:  # Tune with Train frees a trial's placement group through the State API the dashboard serves
            port = free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
            head_args |= {"include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": port}
        else:
            head_args |= {"include_dashboard": False}
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args | {"_system_config": HEALTH_CHECKS})
        self.nodes["head"] = self.cluster.head_node
        os.environ["RAY_ADDRESS"] = self.address
        import ray

        ray.init(address=self.address)
        ray.data.DataContext.get_current().enable_progress_bars = False

    @property
    def address(self) -> str:
        return self.cluster.address

    def scratch(self, name: str) -> Path:
        return self.root / name

    def _node_args(self, name: str, num_cpus: int, resources: dict[str, float]) -> dict:
        from crate.cluster import LOOPBACK

        scratch = self.scratch(name)
        (scratch / "tmp").mkdir(parents=True)
        return {"node_ip_address": LOOPBACK, "num_cpus": num_cpus, "resources": {name: 1.0, **resources},
                "object_store_memory": self.object_store, "temp_dir": str(scratch / "ray"),
                "env_vars": {"TMPDIR": str(scratch / "tmp")}}

    def add_worker_node(self, name: str, num_cpus: int = 1, timeout_s: float = 60) -> str:
        """Start a worker node called `name` (also its custom resource); returns its Ray node id."""
        node = self.cluster.add_node(wait=False, **self._node_args(name, num_cpus, {WORKER_NODE: 1.0}))
        self.cluster._wait_for_node(node, timeout=timeout_s)
        self.nodes[name] = node
        return node.node_id

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def name_of(self, node_id: str) -> str:
        return next(name for name, node in self.nodes.items() if node.node_id == node_id)

    def remove(self, name: str, timeout_s: float = 60) -> None:
        """Kill the worker node `name` (its raylet, object store and every worker on it, at once), wait until the
        cluster sees it dead, and delete its scratch."""
        import ray

        node = self.nodes.pop(name)
        self.cluster.remove_node(node, allow_graceful=False)
        deadline = time.monotonic() + timeout_s
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} still alive {timeout_s:.0f} s after it was killed")
            time.sleep(0.2)
        shutil.rmtree(self.scratch(name))

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
