"""Where the training loop runs: a Ray Train worker, or one plain process. The loop only sees this interface.

Both keep checkpoints as `<storage_path>/<run_name>/checkpoint_<step>/`: Ray Train persists what every worker
reports into that directory; the local runtime writes it itself (atomically, keeping the newest N complete ones).
Both resume only from a checkpoint that verifies against its manifests (`crate.train.checkpoint.verify`): the
local runtime takes the newest that does, Ray Train offers only its latest registered one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from crate.model import resolve_device
from crate.train.checkpoint import is_marked_complete, newest_complete

log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def single_process_env() -> None:
    """The torch.distributed environment and process group of a world of one."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        # The group is set up here, over a file, because the env:// rendezvous DeepSpeed would use starts a
        # TCPStore that listens on every interface ('::') whatever MASTER_ADDR says.
        store = Path(tempfile.mkdtemp(prefix="crate-process-group-")) / "store"
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


class LocalRuntime:
    """A single process without Ray (hosts with torch alone)."""

    rank, world_size, local_rank = 0, 1, 0
    node_id = "local"  # no Ray: one process on this host

    def __init__(self, run_dir: str | os.PathLike, keep_checkpoints: int):
        self.run_dir = Path(run_dir)
        self.keep = keep_checkpoints
        self.last_checkpoint: Path | None = None  # the newest written, or the one resumed from
        self.run_dir.mkdir(parents=True, exist_ok=True)
        single_process_env()

    def device(self, use_gpu: bool) -> torch.device:
        return resolve_device("auto" if use_gpu else "cpu")

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.run_dir.glob("checkpoint_*") if p.is_dir())

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        """The newest checkpoint that verifies (the ones skipped are logged); CheckpointError if none does."""
        self.last_checkpoint = newest_complete(reversed(self.checkpoints()))
        yield self.last_checkpoint

    def new_checkpoint_dir(self, step: int) -> Path:
        staging = self.run_dir / f".staging_{checkpoint_name(step)}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, step: int = 0) -> None:
        if checkpoint_dir is None:
            return
        final = self.run_dir / checkpoint_name(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(checkpoint_dir, final)  # a checkpoint exists complete or not at all
        self.last_checkpoint = final
        # Keep the newest N complete ones, the one just written (finite: checked before writing) always among them.
        keep = set([p for p in self.checkpoints() if is_marked_complete(p)][-self.keep:]) | {final}
        for old in self.checkpoints():
            if old not in keep and old.name < final.name:
                if not is_marked_complete(old):
                    log.info("removing incomplete checkpoint %s", old)
                shutil.rmtree(old, ignore_errors=True)


class RayRuntime:
    """A Ray Train worker: rank and world from the train context, checkpoints through `ray.train.report`."""

    def __init__(self):
        import ray
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.node_id = ray.get_runtime_context().get_node_id()  # the Ray node this worker runs on

    def device(self, use_gpu: bool) -> torch.device:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield newest_complete([Path(directory)])

    def new_checkpoint_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{checkpoint_name(step)}_"))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, step: int = 0) -> None:
        import ray.train

        # A barrier: every rank reports the same number of times; Ray merges the ranks' directories.
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_name(step) if checkpoint_dir else None)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
