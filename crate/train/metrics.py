"""Throughput, MFU and the loss history behind the loss-curve plot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from crate.plots import pyplot

# Dense bf16 peak per device (FLOP/s), by substring of the CUDA device name. 1,979 TFLOP/s is H100's
# sparsity figure; the dense one is 989.
KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in KNOWN_PEAK_FLOPS.items() if key in name), None)


class Throughput:
    """Tokens/s and MFU over the interval since the last `measure()`."""

    def __init__(self, flops_per_token: int, peak_flops_per_device: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device
        self.world_size = world_size
        self._start = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def measure(self, device: torch.device) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed  # all ranks together
        self._start, self._tokens = now, 0
        metrics = {"perf/tokens_per_s": tokens_per_s, "perf/tokens_per_s_per_device": tokens_per_s / self.world_size}
        if self.peak:
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
        if device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return metrics


@dataclass
class LossHistory:
    """(step, value) pairs kept in the checkpoint so the loss curve survives restarts."""

    train: list[tuple[int, float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    @classmethod
    def from_dict(cls, data: dict | None) -> "LossHistory":
        data = data or {}
        return cls([tuple(p) for p in data.get("train", [])], [tuple(p) for p in data.get("val", [])])

    def figure(self, title: str):
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 4))
        if self.train:
            ax.plot(*zip(*self.train), label="train", linewidth=1)
        if self.val:
            ax.plot(*zip(*self.val), "o-", label="validation", markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig
