"""How fast the collector core makes every record of every neuron (README "Interpretability": the speed goal is
CRATE-12L, 36,864 neurons, 8000 × 1024 tokens, < 30 s on one H100).

Timed stages, in the order a batch meets them (CUDA synchronised at each stage boundary in the breakdown run):
    forward    the model up to the deepest layer (float32, TF32 on CUDA: the records' precision), no LM head
    stats      per-neuron count / sum / sum of squares / positives / max
    top        exact top-k selection (segment max → top segments → top units → slot merge)
    sample     random + quantile-pool sampling (one sort of unit hashes per batch, an arc per neuron)
    windows    gathering the activation windows of units that enter a selection
    finalize   ranking, quantile bins, token windows → record columns
    write      parquet files (zstd) + completion marker
The headline `total_s` comes from a separate run without per-stage synchronisation. Blocks are loaded (and
tokenized, for text corpora) before timing starts; a trained checkpoint gives sparser activations than a
random initialisation, which changes how many units enter a selection but not the work per batch.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from crate.errors import ConfigError
from crate.interp.collect import StageTimer, batched, collect, records_matmuls, with_neighbours
from crate.interp.config import CollectionConfig
from crate.interp.features import ModelNeurons
from crate.interp.records import write_records


@dataclass
class RecordsBenchmarkConfig:
    preset: str = "crate-12l"  # model preset (random weights) when no checkpoint is given
    checkpoint: str | None = None  # a model checkpoint to time instead of the preset
    corpus: str | None = None  # a crate.data corpus URI; None: seeded random token ids
    device: str = "auto"  # auto: cuda when available
    seed: int = 0  # random weights and token ids
    records: CollectionConfig = field(default_factory=lambda: CollectionConfig(windows="centered"))  # what is collected
    output: str = "benchmark_records.json"  # the result, as JSON

    def __post_init__(self) -> None:
        if self.records.windows == "auto":
            self.records = self.records.resolved("crate-paper")


def _blocks(cfg: RecordsBenchmarkConfig, vocab: int) -> list[np.ndarray]:
    spec = cfg.records
    if cfg.corpus is None:
        rng = np.random.default_rng(cfg.seed)
        return list(rng.integers(0, min(vocab, 50257), (spec.blocks, spec.block_length)))
    from crate.data import read_blocks

    blocks = list(read_blocks(cfg.corpus, spec.block_length, spec.blocks))
    if len(blocks) < spec.blocks:
        raise ConfigError("records.blocks", f"{cfg.corpus} holds only {len(blocks)} blocks of {spec.block_length} tokens")
    return blocks


def _batches(blocks: list[np.ndarray], spec: CollectionConfig) -> list[tuple]:
    """The job's batches: stream windows bring their neighbouring blocks (crate.interp.collect.with_neighbours)."""
    batches = list(batched(blocks, spec.batch_blocks))
    return with_neighbours(batches) if spec.windows == "stream" else batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def benchmark_records(cfg: RecordsBenchmarkConfig) -> dict:
    from crate.model import build_model, load_model, resolve_device

    device = resolve_device(cfg.device)
    model = (load_model(cfg.checkpoint) if cfg.checkpoint else build_model(cfg.preset)).to(device).eval()
    cfg = dataclasses.replace(cfg, records=cfg.records.for_context(model.config.block_size))  # block_length: the model's
    spec, n_layer = cfg.records, model.config.n_layer
    blocks = _blocks(cfg, model.config.vocab_size)
    features = {layer: np.arange(model.config.n_neurons) for layer in range(n_layer)}
    source = ModelNeurons()
    collect(model, _batches(blocks[:spec.batch_blocks], spec), spec, source, features, cfg.seed, device)  # warm-up

    with tempfile.TemporaryDirectory() as directory:
        _sync(device)
        started = time.perf_counter()
        collector = collect(model, _batches(blocks, spec), spec, source, features, cfg.seed, device)
        write_records(collector, directory, {"benchmark": dataclasses.asdict(cfg)})
        _sync(device)
        total_s = time.perf_counter() - started
        n_records = sum(pq.read_metadata(path).num_rows for path in Path(directory).glob("layer_*.parquet"))
    timer = StageTimer(sync=True)
    with tempfile.TemporaryDirectory() as directory:
        collector = collect(model, _batches(blocks, spec), spec, source, features, cfg.seed, device, timer)
        write_records(collector, directory, {"benchmark": dataclasses.asdict(cfg)}, timer)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": cfg.checkpoint or cfg.preset, "neurons": n_layer * model.config.n_neurons,
        "blocks": len(blocks), "block_length": spec.block_length, "tokens": len(blocks) * spec.block_length,
        "records": n_records, "total_s": round(total_s, 3),
        "stages_s": {k: round(v, 3) for k, v in timer.seconds.items()},
        "plain_forward_s": round(_plain_forward_s(model, blocks, spec.batch_blocks, n_layer, device), 3),
        "torch": torch.__version__, "settings": dataclasses.asdict(spec),
    }


@torch.no_grad()
def _plain_forward_s(model, blocks, batch_blocks: int, n_layer: int, device: torch.device) -> float:
    """The same forward (up to the last block, no LM head) with nothing collected: the floor."""
    _sync(device)
    started = time.perf_counter()
    with records_matmuls(device):  # the precision records are collected in
        for _, tokens in batched(blocks, batch_blocks):
            model.hidden_states(torch.tensor(tokens, device=device), n_layer)
    _sync(device)
    return time.perf_counter() - started
