"""Training engines: the step machinery around a model, behind one small interface.

- `TorchEngine`: plain AdamW (fused on CUDA), autocast bf16, optional torch.compile; DDP across workers.
  The core step the benchmark compares against, and the path for torch-only hosts.
- `DeepSpeedEngine`: a DeepSpeed engine with ZeRO stage 0-3 and the same client-side `torch.optim.AdamW`
  (a config-named optimizer would JIT-compile a fused op first, ~100 s on CPU).

Both train in the same mixed precision (docs/precision.md): fp32 weights, optimizer state and gradient
accumulation, bf16 autocast compute (`precision: bf16`), an fp32 loss. DeepSpeed gets it from its `torch_autocast`
section, not from `bf16`, which would make the weights and the accumulated gradients bf16.

Both do gradient accumulation and grad-norm clipping, and take the learning rate from the caller every step so
the schedule is one pure function (`crate.train.schedule`). One optimizer step is:

    engine.set_lr(lr)
    for inputs, targets in micro_batches: engine.forward_backward(inputs, targets)
    grad_norm = engine.finish_step()
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crate.model.checkpoint import load_data
from crate.model.lm import LanguageModel
from crate.train.config import TrainConfig

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device):
    """The forward's precision context: bf16 autocast over fp32 weights, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def build_optimizer(model: LanguageModel, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    o = train.optim
    return torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda")


class Engine:
    optimizer: torch.optim.Optimizer
    module: LanguageModel
    device: torch.device  # where the model is, so where data, evaluation and metrics go
    num_params: int  # the model's (counted before ZeRO-3 partitions it: partitioned parameters have numel() 0)
    skipped_steps = 0  # optimizer steps the engine declined so far (non-finite gradients); torch never skips

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class TorchEngine(Engine):
    kind = "torch"

    def __init__(self, model: LanguageModel, train: TrainConfig, device: torch.device, precision: str):
        self.num_params = model.num_params()
        self.module = model.to(device)
        self.device = device
        self.accum = train.grad_accum_steps
        self.grad_clip = train.optim.grad_clip
        self.optimizer = build_optimizer(model, train, device)
        self.autocast = autocast(precision, device)
        forward = torch.compile(model) if train.compile else model
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None)
        self._forward = forward
        self._distributed = distributed
        self._micro_step = 0

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One micro-batch; gradients accumulate until the optimizer step. Returns the (unscaled) loss."""
        boundary = (self._micro_step + 1) % self.accum == 0
        sync = self._forward.no_sync() if self._distributed and not boundary else contextlib.nullcontext()
        with sync:
            with self.autocast:
                _, loss = self._forward(inputs, targets)
            (loss / self.accum).backward()
        self._micro_step += 1
        return loss.detach()

    def finish_step(self) -> float:
        """Clip, update, zero the gradients; returns the global grad norm before clipping."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def eval_context(self):
        return self.autocast

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:  # replicated state: one copy
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = load_data(directory / "engine.pt", map_location=self.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.state_dict()


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    TAG = "engine"

    def __init__(self, model: LanguageModel, train: TrainConfig, device: torch.device, precision: str):
        import deepspeed

        self.num_params = model.num_params()
        self.zero_stage = train.zero_stage
        self.grad_clip = train.optim.grad_clip
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        optimizer = build_optimizer(model, train, device)
        # DeepSpeed would place the model on cuda:LOCAL_RANK; device_rank makes it this worker's device.
        args = argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            args=args, model=model.to(device), optimizer=optimizer,
            config=deepspeed_config(train, precision, device))
        if self.engine.device != device:
            raise RuntimeError(f"DeepSpeed placed the model on {self.engine.device}, this worker's device is {device}")
        self.device = self.engine.device
        self.autocast = autocast(precision, device)
        if train.compile:
            self.engine.compile()
        self.module: LanguageModel = self.engine.module

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _, loss = self.engine(inputs, targets)  # under the engine's torch_autocast
        self.engine.backward(loss)  # DeepSpeed scales by 1/accum and reduces at the boundary
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-batch; the boundary's step is finish_step's
        return loss.detach()

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps  # DeepSpeed's "OVERFLOW! Skipping step"

    def finish_step(self) -> float:
        if self.zero_stage == 0:
            # Without ZeRO, DeepSpeed clips fp32 gradients but keeps no norm: clip here (its clipping is off).
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
            self.engine.step()
            return float(norm)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def eval_context(self):
        return self.autocast

    def save(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG)  # collective: every rank writes its shard

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag=self.TAG)  # collective

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole fp32 state dict on rank 0 (None elsewhere). Collective under ZeRO-3."""
        import deepspeed

        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.zero_stage < 3:
            return self.module.state_dict() if rank == 0 else None
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()} if rank == 0 else None


def deepspeed_config(train: TrainConfig, precision: str, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON for a TrainConfig (the only place it is written)."""
    zero: dict[str, Any] = {"stage": train.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": device.type == "cuda"}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["memory_efficient_linear"] = False  # else DeepSpeed replaces torch's F.linear process-wide
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.optim.grad_clip if train.zero_stage > 0 else 0.0,  # stage 0: DeepSpeedEngine clips
        "zero_optimization": zero,
        # fp32 weights and gradients, bf16 autocast forward. No module listed as lower-precision safe: gradients
        # are reduced in fp32 too (as DDP does), not rounded to bf16 at each micro-batch's reduction.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_engine(model: LanguageModel, train: TrainConfig, device: torch.device):
    precision = resolve_precision(train.precision, device)
    engine_class = DeepSpeedEngine if train.engine == "deepspeed" else TorchEngine
    return engine_class(model, train, device, precision)
