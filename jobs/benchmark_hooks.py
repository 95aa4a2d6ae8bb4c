"""Time the models' forward pass with no hook set, and caching every hook point, on this machine.

    python jobs/benchmark_hooks.py                                  # crate-12l and gpt-12l, 1 × 256 tokens, CPU
    PYTHONPATH=/path/to/older/checkout python jobs/benchmark_hooks.py   # the same forward of another commit

Prints JSON: machine, date, the commit of the `crate` package imported, and per preset the median forward
seconds (random weights and tokens, eval, no_grad), plus `run_with_cache` of every hook point where the
imported models have hook points. Models are timed in turns, so slow drifts of a shared machine hit all alike.
Where they have hook points it also prints what the hook points add to a forward with no hook set, measured
directly (on a loaded machine the forward's own noise is far larger): the hook point calls of one forward
times the cost of one call of an unhooked HookPoint.
"""

import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import torch

import crate
from crate.cli import parse_config, run_job, setup_logging
from crate.config import Range
from crate.model import build_model


@dataclass
class HookBenchmarkConfig:
    presets: list[str] = field(default_factory=lambda: ["crate-12l", "gpt-12l"])  # models timed in turns
    batch: Annotated[int, Range(1)] = 1  # sequences per forward pass
    seq_len: Annotated[int, Range(1)] = 256  # tokens per sequence
    repeats: Annotated[int, Range(1)] = 15  # timed forward passes per preset (after one warm-up)
    threads: Annotated[int, Range(1)] = 1  # torch CPU threads: 1 keeps a shared machine's numbers comparable


def _commit() -> str:
    source = Path(crate.__file__).resolve().parent
    try:
        return subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def benchmark_hooks(config: HookBenchmarkConfig) -> dict:
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    models = {name: build_model(name).eval() for name in config.presets}
    idx = torch.randint(0, 50257, (config.batch, config.seq_len))
    passes = {f"{name} forward": (lambda m=model: m(idx)) for name, model in models.items()}
    passes.update({f"{name} run_with_cache(all)": (lambda m=model: m.run_with_cache(idx))
                   for name, model in models.items() if hasattr(model, "run_with_cache")})
    times: dict[str, list[float]] = {label: [] for label in passes}
    for fn in passes.values():
        fn()  # warm-up
    for _ in range(config.repeats):
        for label, fn in passes.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    result = {}
    for name, model in models.items():
        if hasattr(model, "hook_dict"):
            points = {id(p): p for p in model.hook_dict.values()}
            point, x, n = next(iter(points.values())), torch.zeros(1), 100_000
            start = time.perf_counter()
            for _ in range(n):
                point(x)
            per_call = (time.perf_counter() - start) / n
            result[f"{name} hook points"] = {"calls_per_forward": len(points), "us_per_call": round(per_call * 1e6, 3),
                                             "ms_per_forward": round(len(points) * per_call * 1e3, 3)}
    return {
        "hook_overhead": result,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(), "crate": str(Path(crate.__file__).resolve().parent),
        "config": dataclasses.asdict(config),
        "median_s": {label: round(statistics.median(t), 4) for label, t in times.items()},
        "min_s": {label: round(min(t), 4) for label, t in times.items()},
    }


def main(argv=None) -> None:
    setup_logging()
    config, _ = parse_config(HookBenchmarkConfig, __doc__, argv)
    print(json.dumps(benchmark_hooks(config), indent=1))


if __name__ == "__main__":
    sys.exit(run_job(main))
