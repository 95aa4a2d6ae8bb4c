"""Training-step throughput for any preset on whatever device is present, without Ray.

Two steps per preset, CRATE and GPT side by side:
- the **core step**: the model + AdamW (fused on CUDA), autocast bf16 on GPUs, `torch.compile` — the
  `TorchEngine` with compile on;
- the **platform step**: the DeepSpeed engine with exactly the configuration `jobs/pretrain.py` builds from
  the given recipe (`crate.train.engine.DeepSpeedEngine`), in one process.

Both train in the same numerics (fp32 weights and gradients, bf16 autocast compute: docs/precision.md), so the
gap between them is the platform's overhead alone. Each prints one JSON line: tokens/s, ms per optimizer step,
peak memory, MFU against the device's peak (named in the line, with the device) and the ratio to a matmul
ceiling measured here (a large square matmul in the training precision).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Annotated, Iterator

import torch

from crate.config import Range, load_config
from crate.model import build_model, resolve_device
from crate.train.config import PretrainConfig
from crate.train.engine import DeepSpeedEngine, TorchEngine, resolve_precision
from crate.train.metrics import peak_flops
from crate.train.runtime import single_process_env


@dataclass
class StepBenchmarkConfig:
    presets: list[str] = dataclasses.field(default_factory=lambda: ["crate-tiny", "gpt-tiny"])  # models, side by side
    recipe: str = "quickstart"  # the pretraining recipe whose engine settings the platform step uses
    steps: str = "core,platform"  # which steps to measure
    micro_batch_size: int | None = None  # default: the recipe's
    context: int | None = None  # default: the recipe's data.context
    compile: bool | None = None  # default: on for CUDA, off on CPU (compiling takes minutes on 2 cores)
    warmup: Annotated[int, Range(0)] = 3  # untimed steps first
    iters: Annotated[int, Range(1)] = 10  # timed steps per configuration


def matmul_ceiling(device: torch.device, precision: str, n: int | None = None) -> float:
    """FLOP/s of a large square matmul in the training precision (what the device really sustains)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(kind: str, preset: str, cfg: PretrainConfig, device: torch.device, warmup: int, iters: int,
            ceiling: float) -> dict:
    train = dataclasses.replace(cfg.train, num_workers=1, global_batch_size=cfg.train.micro_batch_size)
    precision = resolve_precision(train.precision, device)
    model = build_model(preset, block_size=max(cfg.data.context, 1))
    if kind == "platform":
        single_process_env()
        engine = DeepSpeedEngine(model, train, device, precision)
    else:
        engine = TorchEngine(model, train, device, precision)
    tokens = torch.randint(0, 50257, (train.micro_batch_size, cfg.data.context + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        engine.set_lr(train.optim.lr)
        engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
        engine.finish_step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    tokens_per_s = train.micro_batch_size * cfg.data.context / seconds
    flops = model.flops_per_token(cfg.data.context) * tokens_per_s
    peak = peak_flops(device, cfg.train.peak_flops)
    return {
        "step": kind, "preset": preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "precision": precision, "compile": train.compile,
        "engine": f"deepspeed-zero{train.zero_stage}" if kind == "platform" else "torch",
        "micro_batch_size": train.micro_batch_size, "context": cfg.data.context,
        "ms_per_step": round(seconds * 1e3, 2), "tokens_per_s": round(tokens_per_s, 1),
        "tflops": round(flops / 1e12, 4), "peak_tflops": round(peak / 1e12, 1) if peak else None,
        "mfu": round(flops / peak, 4) if peak else None,
        "ratio_to_matmul_ceiling": round(flops / ceiling, 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def benchmark_steps(bench: StepBenchmarkConfig) -> Iterator[dict]:
    device = resolve_device("auto")
    cfg = load_config(PretrainConfig, bench.recipe, ["train.launcher=local", "data.engine=local"])
    if bench.context:  # the benchmark builds each preset with this context, whatever the recipe's model
        cfg.data = dataclasses.replace(cfg.data, context=bench.context)
    compile_ = bench.compile if bench.compile is not None else device.type == "cuda"
    micro = bench.micro_batch_size or cfg.train.micro_batch_size
    cfg.train = dataclasses.replace(cfg.train, compile=compile_, micro_batch_size=micro,
                                    global_batch_size=micro * cfg.train.num_workers)
    ceiling = matmul_ceiling(device, resolve_precision(cfg.train.precision, device))
    for preset in bench.presets:
        for kind in bench.steps.split(","):
            yield measure(kind.strip(), preset, cfg, device, bench.warmup, bench.iters, ceiling)
