"""Data pipeline benchmarks on CPU: what feeds the GPUs, and at what memory.

1. tokenize+pack per core: the in-process engine (one core) over `files` raw files, one epoch;
2. scaling: the Ray engine over the same files with 1, 2, ... concurrent read tasks;
3. pretokenized: the same files pretokenized, read back as training batches and with `read_blocks`;
4. bounded memory: the Ray engine streams every file of the corpus (more bytes than the object store holds)
   while the object store's use is sampled: backpressure must keep it below its capacity.

Throughput counts the tokens of the training batches the consumer received (B x (context+1) per batch)
over wall time, pipeline start-up included.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import resource
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator

from crate.cluster import connect_ray
from crate.data.config import DataConfig
from crate.data.shards import pretokenize
from crate.data.sources import resolve_input
from crate.data.stream import read_blocks, train_batches
from crate.config import Range
from crate.errors import ConfigError

log = logging.getLogger(__name__)
SHARED_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"  # next to the checkout, when present
H100_TOKENS_PER_S = 480_000  # the CRATE-12L training goal per H100


@dataclass
class DataBenchmarkConfig:
    corpus: str = ""  # default: the shared Pile stand-in when present, else the built-in corpus
    files: Annotated[int, Range(1)] = 2  # raw files for the per-core, scaling and pretokenized runs
    context: Annotated[int, Range(1)] = 1024  # tokens per example (data.context)
    micro_batch_size: Annotated[int, Range(1)] = 8  # examples per batch read
    # Ray engine concurrency to compare
    read_tasks: Annotated[list[int], Range(1)] = field(default_factory=lambda: [1, 2])
    object_store_mb: Annotated[int, Range(80)] = 100  # the Ray instance's object store for the whole benchmark
    memory_run: bool = True  # stream the whole corpus through the capped object store

    def __post_init__(self) -> None:
        if not self.read_tasks:
            raise ConfigError("read_tasks", "must list at least one count")


def benchmark_data(cfg: DataBenchmarkConfig) -> Iterator[dict[str, Any]]:
    """One result dict per measurement, machine description first."""
    import ray

    corpus = cfg.corpus or (str(SHARED_CORPUS) if SHARED_CORPUS.is_dir() else "stdlib://train")
    units = resolve_input(corpus, DataConfig(), raw=True).units
    yield machine(corpus)
    with tempfile.TemporaryDirectory() as scratch:
        subset = Path(scratch) / "subset"
        subset.mkdir()
        for unit in units[: cfg.files]:
            os.symlink(unit.url.removeprefix("file://"), subset / unit.name.replace("/", "_"))
        data = DataConfig(train=str(subset), val=str(subset), context=cfg.context, engine="local")

        yield {"measure": "tokenize+pack, in-process engine", "cores": 1, "files": cfg.files,
               **one_epoch(data, cfg.micro_batch_size)}
        connect_ray(num_cpus=os.cpu_count(), object_store_memory=cfg.object_store_mb * 2**20,
                    include_dashboard=False, log_to_driver=False)
        try:
            for tasks in cfg.read_tasks:
                ray_data = DataConfig(**{**data.__dict__, "engine": "ray", "read_tasks": tasks})
                yield {"measure": "tokenize+pack, Ray engine", "cores": tasks, "files": cfg.files,
                       **one_epoch(ray_data, cfg.micro_batch_size)}
            tokens_dir = Path(scratch) / "tokens"
            started = time.perf_counter()
            index = pretokenize(str(subset), tokens_dir, data, shard_bytes=1, progress=False)  # a shard per file
            seconds = time.perf_counter() - started
            yield {"measure": "pretokenize (Ray tasks, one per file)", "cores": min(os.cpu_count(), cfg.files),
                   "tokens": index["n_tokens"], "seconds": round(seconds, 2),
                   "tokens_per_s": round(index["n_tokens"] / seconds)}
            pretokenized = DataConfig(**{**data.__dict__, "train": str(tokens_dir)})
            yield {"measure": "pretokenized training batches", "cores": 1,
                   **one_epoch(pretokenized, cfg.micro_batch_size, index["n_tokens"] // (cfg.context + 1))}
            yield {"measure": "pretokenized read_blocks", "cores": 1, **read_all(str(tokens_dir), cfg.context + 1)}
            if cfg.memory_run:
                everything = DataConfig(train=corpus, val=str(subset), context=cfg.context, engine="ray",
                                        read_tasks=max(cfg.read_tasks))
                yield {"measure": "bounded memory: whole corpus, Ray engine", "cores": max(cfg.read_tasks),
                       "files": len(units), "object_store_mb": cfg.object_store_mb,
                       **with_object_store_samples(lambda: one_epoch(everything, cfg.micro_batch_size))}
        finally:
            ray.shutdown()


def one_epoch(cfg: DataConfig, batch_size: int, blocks: int | None = None) -> dict[str, Any]:
    """Consume one epoch (raw text: until the state enters epoch 1; pretokenized: `blocks` blocks).

    `startup_s` is the wait for the first batch (Ray: worker processes, imports, the first table);
    `tokens_per_s` counts everything, `steady_tokens_per_s` the batches after the first.
    """
    started = time.perf_counter()
    stream = train_batches(cfg, batch_size, 0, 1)
    n_tokens, first = 0, None
    for batch in stream:
        n_tokens += batch.tokens.numel()
        first = first or (time.perf_counter(), n_tokens)
        if batch.state.get("epoch", 0) >= 1 or (blocks is not None and batch.state["blocks"] + batch_size > blocks):
            break
    stream.close()
    ended = time.perf_counter()
    stats = stream.stats()
    return {"tokens": n_tokens, "seconds": round(ended - started, 2), "tokens_per_s": round(n_tokens / (ended - started)),
            "startup_s": round(first[0] - started, 2),
            "steady_tokens_per_s": round((n_tokens - first[1]) / max(ended - first[0], 1e-9)),
            "documents": stats["documents"], "skipped": stats["skipped"],
            "consumer_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def read_all(source: str, block_length: int) -> dict[str, Any]:
    started = time.perf_counter()
    n_tokens = sum(len(block) for block in read_blocks(source, block_length, 10**9))
    seconds = time.perf_counter() - started
    return {"tokens": n_tokens, "seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds)}


def with_object_store_samples(measure) -> dict[str, Any]:
    """Run `measure()` while sampling the object store's use every 0.25 s (peak and spilled MiB)."""
    import ray
    from ray._private.internal_api import memory_summary

    address, samples, done = ray.get_runtime_context().gcs_address, [], threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            summary = memory_summary(address=address, stats_only=True)
            used = re.search(r"Plasma memory usage (\d+) MiB", summary)
            spilled = re.search(r"Spilled (\d+) MiB", summary)
            samples.append((int(used.group(1)) if used else 0, int(spilled.group(1)) if spilled else 0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = measure()
    finally:
        done.set()
        sampler.join()
    result["streamed_mb_as_uint16"] = round(result["tokens"] * 2 / 2**20)
    result["object_store_peak_mb"] = max((used for used, _ in samples), default=0)
    result["object_store_spilled_mb"] = max((spilled for _, spilled in samples), default=0)
    return result


def machine(corpus: str) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"measure": "machine", "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "commit": commit or "unknown", "corpus": corpus}


def summary(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results and the cores-per-H100 estimates."""
    rows = ["| measurement | cores | tokens | seconds | first batch (s) | tokens/s | after the first batch |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results[1:]:
        steady = r.get("steady_tokens_per_s")
        rows.append(f"| {r['measure']} | {r['cores']} | {r['tokens']:,} | {r['seconds']:.1f} | "
                    f"{r.get('startup_s', '')} | {r['tokens_per_s']:,} | {'' if steady is None else f'{steady:,}'} |")
    per_core = {r["measure"]: r.get("steady_tokens_per_s", r["tokens_per_s"]) for r in results[1:] if r["cores"] == 1}
    for measure, rate in per_core.items():
        rows.append(f"\nestimate: {H100_TOKENS_PER_S / rate:.2f} cores per H100 at {H100_TOKENS_PER_S:,} tokens/s "
                    f"({measure})")
    memory = next((r for r in results if r["measure"].startswith("bounded memory")), None)
    if memory:
        rows.append(f"\nbounded memory: streamed {memory['streamed_mb_as_uint16']} MiB of tokens through a "
                    f"{memory['object_store_mb']} MB object store; peak use {memory['object_store_peak_mb']} MiB, "
                    f"spilled {memory['object_store_spilled_mb']} MiB, consumer peak RSS "
                    f"{memory['consumer_peak_rss_mb']} MiB")
    return "\n".join(rows)
