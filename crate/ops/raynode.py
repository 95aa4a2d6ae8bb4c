"""One Ray worker node of the local stack, on loopback: what `ray start --address ... --block` does.

`ray start` refuses to start a worker node while Ray's multi-node support is off, and with it on turns the
requested 127.0.0.1 into the host's network address (crate.cluster); so the stack starts its worker nodes the way
Ray's own `ray.cluster_utils.Cluster` does, as a `ray._private.node.Node` joined to the head's GCS, with every
process on 127.0.0.1. The node runs until SIGTERM/SIGINT (then stops its processes) or until one of them dies.

    python -m crate.ops.raynode --address 127.0.0.1:6379 --num-cpus 2 --temp-dir DIR [--resources JSON]

Every node gets the custom resource WORKER_NODE, plus those given.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Sequence

from crate.cluster import LOOPBACK, keep_ray_on_loopback

log = logging.getLogger(__name__)
WORKER_NODE = "crate_worker_node"  # a custom resource every worker node has (1) and the head lacks: a job puts
#                                    its workers on worker nodes with train.worker_resources.crate_worker_node=1


def run_node(address: str, num_cpus: int | None, temp_dir: str, resources: dict[str, float],
             object_store_memory: int | None = None, env: dict[str, str] | None = None) -> int:
    keep_ray_on_loopback()
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    params = RayParams(node_ip_address=LOOPBACK, gcs_address=address, num_cpus=num_cpus, num_gpus=0,
                       resources={WORKER_NODE: 1.0, **resources}, temp_dir=temp_dir, object_store_memory=object_store_memory,
                       include_log_monitor=False, node_manager_port=0, min_worker_port=0, max_worker_port=0,
                       env_vars=env)
    params.dashboard_agent_listen_port = None  # a free one: the head's agent has the configured port
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=True)
    log.info("Ray node %s joined %s", node.node_id, address)
    print(f"node {node.node_id}", flush=True)
    while not stop.wait(1.0):
        if not node.remaining_processes_alive():
            log.error("a process of the node died: stopping the node")
            break
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    return 0 if stop.is_set() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crate.ops.raynode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the head's GCS address")
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--temp-dir", required=True, help="this node's own Ray temp dir")
    parser.add_argument("--resources", type=json.loads, default={}, help="custom resources, JSON")
    parser.add_argument("--object-store-memory", type=int)
    parser.add_argument("--tmpdir", help="TMPDIR of every process of the node (its scratch)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_node(args.address, args.num_cpus, args.temp_dir, args.resources, args.object_store_memory,
                    {"TMPDIR": args.tmpdir} if args.tmpdir else None)


if __name__ == "__main__":
    sys.exit(main())
