"""The pretraining configuration: model, data, training and tracking sections, validated together."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

from crate.config import Range, check_name
from crate.data import DataConfig
from crate.errors import ConfigError
from crate.model.config import ModelConfig, preset_fields
from crate.objectstore import STORAGE_VAR
from crate.tracking import TrackingConfig


@dataclass
class OptimConfig:
    lr: Annotated[float, Range(0, exclusive_low=True)] = 6e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 6e-5  # cosine floor (10% of peak)
    warmup_steps: Annotated[int, Range(0)] = 2000  # linear warmup from 0 to lr
    decay_steps: int | None = None  # step at which the cosine reaches min_lr; default: train.max_steps
    weight_decay: Annotated[float, Range(0)] = 0.1  # on ≥2-D tensors only (matrices, embeddings, the ISTA dictionary)
    beta1: Annotated[float, Range(0, 1, exclusive_high=True)] = 0.9  # AdamW's first-moment decay
    beta2: Annotated[float, Range(0, 1, exclusive_high=True)] = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator term
    grad_clip: Annotated[float, Range(0)] = 1.0  # global grad-norm clip; 0 disables

    def __post_init__(self) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")


@dataclass
class TrainConfig:
    run_name: str | None = None  # a re-submitted job with the same name resumes from its last checkpoint
    # where checkpoints go, <storage_path>/<run name>/checkpoint_<step>/: a local path or s3://, gs://;
    # default $CRATE_STORAGE_PATH, else ./runs
    storage_path: str = field(default_factory=lambda: os.environ.get(STORAGE_VAR, "./runs"))
    launcher: Literal["ray", "local"] = "ray"  # local: one process, no Ray (torch-only hosts)
    num_workers: Annotated[int, Range(1)] = 1  # Ray Train workers, one process each
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: Annotated[float, Range(0, exclusive_low=True)] = 1.0  # CPUs Ray reserves for each worker
    # How Ray places the workers on nodes: PACK fills a node first; SPREAD (best effort) and STRICT_SPREAD (one
    # worker per node, or the job waits) put them on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources each worker requests
    engine: Literal["deepspeed", "torch"] = "deepspeed"  # torch: plain AdamW (DDP across workers), no sharding
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    compile: bool = False  # torch.compile (engine.compile() under DeepSpeed)
    micro_batch_size: Annotated[int, Range(1)] = 12  # sequences per worker per forward pass
    # sequences per optimizer step (480 x 1024 = 491,520 tokens, the paper's)
    global_batch_size: Annotated[int, Range(1)] = 480
    max_steps: Annotated[int, Range(1)] = 600_000  # optimizer steps of the run
    # token budget; when set, max_steps = ceil(max_tokens / tokens per step)
    max_tokens: Annotated[int | None, Range(1)] = None
    log_interval: Annotated[int, Range(1)] = 10  # steps between training-loss lines (and MLflow points)
    eval_interval: Annotated[int, Range(1)] = 1000  # steps between evaluations on the validation blocks
    eval_blocks: Annotated[int, Range(1)] = 200  # validation blocks per evaluation (same blocks every time)
    checkpoint_interval: Annotated[int, Range(1)] = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: Annotated[int, Range(1)] = 3  # the newest checkpoints kept; older ones are deleted
    # optimizer steps the engine skips in a row (DeepSpeed: overflow) before the run stops
    max_skipped_steps: Annotated[int, Range(1)] = 10
    # worker failures Ray Train recovers from by restarting at the last checkpoint
    max_failures: Annotated[int, Range(0)] = 3
    # Ray's default retries a worker group that cannot start forever
    controller_failure_limit: Annotated[int, Range(0)] = 3
    seed: int = 1337  # torch's seed on every worker: weight init, dropout
    peak_flops: float | None = None  # per device, for MFU; default: the dense bf16 peak of the device (PEAK_FLOPS_TABLE)
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its learning-rate schedule

    def __post_init__(self) -> None:
        if self.run_name:  # None or empty: the job names the run
            check_name("run_name", self.run_name)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"DeepSpeed ZeRO stages are 0, 1, 2 and 3, got {self.zero_stage}")
        if self.global_batch_size % (self.micro_batch_size * self.num_workers):
            raise ConfigError("global_batch_size",
                              f"{self.global_batch_size} sequences per step cannot be split into micro-batches of "
                              f"{self.micro_batch_size} on {self.num_workers} workers (must be a multiple of "
                              f"{self.micro_batch_size * self.num_workers})")
        if self.launcher == "local" and self.num_workers != 1:
            raise ConfigError("num_workers", "the local launcher runs one process; use launcher=ray for more workers")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU") or amount <= 0:
                raise ConfigError(f"worker_resources.{name}", f"must be a custom resource (not CPU or GPU: those "
                                                              f"are cpus_per_worker and use_gpu) > 0, got {amount}")

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


# What a resumed run may change against its checkpoint's config: the budget, the cadence, and where and on how
# many workers it runs (the same optimizer steps on other hardware). Any other change (model, data, optimizer,
# batch, seed, precision) would quietly make the rest of the run a different experiment under the old name.
RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.max_tokens", "data.token_budget",
    "train.log_interval", "train.eval_interval", "train.checkpoint_interval", "train.keep_checkpoints",
    "train.max_skipped_steps",
    "train.num_workers", "train.cpus_per_worker", "train.placement_strategy", "train.worker_resources*", "train.use_gpu", "train.launcher", "train.engine",
    "train.zero_stage", "train.compile", "train.max_failures", "train.controller_failure_limit",
    "train.peak_flops", "train.storage_path",
    "data.engine", "data.read_tasks", "data.read_cpus", "data.task_bytes", "data.prefetch_batches",
    "data.retries", "data.retry_backoff_s",
    "tracking.*",
})


def resumable(name: str) -> bool:
    """Whether the dotted config field `name` may differ from the checkpoint's on resume."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RESUMABLE_CHANGES)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**preset_fields("crate-tiny")))  # the network
    data: DataConfig = field(default_factory=DataConfig)  # the corpora and how they become blocks
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop, its engine and where it runs
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the MLflow run

    def __post_init__(self) -> None:
        if self.data.context > self.model.block_size:
            raise ConfigError("data.context", f"{self.data.context} tokens exceed model.block_size "
                                              f"{self.model.block_size}")
        if self.train.launcher == "local" and self.data.engine == "ray":
            raise ConfigError("data.engine", "the local launcher runs without Ray: set data.engine=local")
        if self.train.max_tokens is not None:
            self.train.max_steps = -(-self.train.max_tokens // self.tokens_per_step)

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.context

    @property
    def decay_steps(self) -> int:
        return self.train.optim.decay_steps or self.train.max_steps
