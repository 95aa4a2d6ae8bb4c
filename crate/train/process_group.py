"""The Ray Train workers' torch.distributed process group, with its rendezvous store on one address.

Ray Train's own setup (`TorchConfig`, `init_method="env"`) lets torch start a `TCPStore` on rank 0 that listens on
every interface ('::') for the whole run, whatever `MASTER_ADDR` says: an unauthenticated key-value store that
anyone on the network could use to disturb the run. torch has no bind address for it but accepts a socket that is
already listening (`master_listen_fd`), so rank 0 binds one to its node's Ray address (127.0.0.1 on the
platform's local instances, the node's own address on a cluster) and the other ranks connect there. Everything
else (backend choice, the `RANK`/`LOCAL_RANK`/... variables, shutdown) stays Ray Train's.
"""

from __future__ import annotations

import datetime
import os
import socket

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
# Ray Train 2.60's backend (the project pins that version): subclassed to replace only the process group setup.
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_rendezvous_socket: socket.socket | None = None  # rank 0's, open as long as its process group lives


class BoundRendezvousConfig(TorchConfig):
    """`TorchConfig` whose rendezvous store listens on the rank-0 node's Ray address only."""

    @property
    def backend_cls(self):
        return _BoundRendezvousBackend


class _BoundRendezvousBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        address, port = worker_group.execute_single(0, listen_for_rendezvous)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend=backend_config.backend or "gloo",
                                                   world_rank=rank, world_size=len(worker_group), address=address,
                                                   port=port, timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


def listen_for_rendezvous() -> tuple[str, int]:
    """On rank 0: a socket listening on this node's Ray address, on a free port."""
    global _rendezvous_socket
    address = ray.util.get_node_ip_address()
    _rendezvous_socket = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    _rendezvous_socket.bind((address, 0))
    _rendezvous_socket.listen(socket.SOMAXCONN)
    return address, _rendezvous_socket.getsockname()[1]


def join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: int) -> None:
    timeout = datetime.timedelta(seconds=timeout_s)
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))  # for libraries that read them (DeepSpeed)
    if world_rank == 0:
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=_rendezvous_socket.fileno())
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)
