"""Throughput, MFU and the loss history behind the loss-curve plot."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import torch

from crate.plots import pyplot

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak per device (FLOP/s) from NVIDIA's datasheets (which print the sparsity figure,
# twice these), matched against the CUDA device name as whole words, the specific variants before the family:
# "NVIDIA H100 PCIe" is not an SXM H100, and "NVIDIA L40S" is not an L40, nor either an L4.
PEAK_FLOPS_TABLE: list[tuple[str, float]] = [
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835e12),
    (r"\bH200\b", 989e12),  # SXM
    (r"\bGH200\b", 989e12),
    (r"\bA100\b", 312e12),  # SXM and PCIe alike
    (r"\bA10G\b", 125e12),
    (r"\bA10\b", 125e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
]


def table_peak_flops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name, None for a device it does not list."""
    return next((flops for pattern, flops in PEAK_FLOPS_TABLE if re.search(pattern, device_name, re.IGNORECASE)),
                None)


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The per-device peak MFU is measured against: `train.peak_flops` if set, else the table's; logged."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = configured if configured is not None else table_peak_flops(name) if device.type == "cuda" else None
    if peak:
        log.info("MFU against %.0f TFLOP/s per device (%s, %s)", peak / 1e12, name,
                 "train.peak_flops" if configured is not None else "bf16 dense peak table")
    else:
        log.info("no MFU: no known peak for %s (set train.peak_flops)", name)
    return peak


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
