"""An in-process interpretability proxy for sweeps: the offline token-set baseline's TaR score per layer.

    from crate.interp import proxy_score
    metrics = proxy_score(model, blocks)        # blocks: (n, T) token ids — e.g. a few val blocks
    # {"proxy_tar/layer_0": 31.2, ..., "proxy_tar/mean": 27.5, "proxy_tar/undefined": 3}

Same machinery as the job (collector core, crate-paper TaR split, pooled Pearson), with torch alone: no Ray, no
LLM, no files, seconds on a CPU for small models. Scores are ×100, means over a seeded sample of
`neurons_per_layer` neurons per layer with NaN (undefined) scores left out and counted. It measures how well
single tokens explain a neuron — a cheap, monotone-ish signal for comparing sweep trials, not the paper's metric.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from crate.interp.backends.tokenset import TokenMatchSimulator, TokenSetExplainer
from crate.interp.backends.base import Backend
from crate.interp.collect import batched, collect
from crate.interp.config import CollectionConfig
from crate.interp.features import ModelNeurons
from crate.interp.protocols import InsufficientRecords, metric_groups
from crate.interp.records import group_records, gpt2_token_strings
from crate.interp.scoring import score_task


def proxy_score(model, blocks: np.ndarray | torch.Tensor | Iterable[np.ndarray], layers: Sequence[int] | None = None,
                neurons_per_layer: int = 64, seed: int = 0, window: int = 64, batch_blocks: int = 8) -> dict[str, float]:
    """{"proxy_tar/layer_<l>": mean ×100, "proxy_tar/mean": mean of the layer means, "proxy_tar/undefined": count}."""
    blocks = [np.asarray(b) for b in (blocks.cpu().numpy() if isinstance(blocks, torch.Tensor) else blocks)]
    if not blocks:
        raise ValueError("proxy_score needs at least one block of tokens")
    length = len(blocks[0])
    layers = list(range(model.config.n_layer)) if layers is None else list(layers)
    group, _ = metric_groups("crate-paper", ["tar"])[0]
    spec = CollectionConfig(blocks=len(blocks), block_length=length, window=min(window, length), windows="centered",
                            top=group.min_top, random=group.min_random, per_quantile=0, quantile_pool=0,
                            batch_blocks=batch_blocks)
    n = model.config.n_neurons
    features = {l: np.sort(np.random.default_rng([seed, l]).choice(n, min(neurons_per_layer, n), replace=False))
                for l in layers}
    device = next(model.parameters()).device
    collector = collect(model, batched(blocks, batch_blocks), spec, ModelNeurons(), features, seed, device)
    backend = Backend("tokenset", TokenSetExplainer(), TokenMatchSimulator())
    strings = gpt2_token_strings()
    metrics: dict[str, float] = {}
    undefined = 0
    for layer in layers:
        scores = []
        for records in group_records(collector.records(layer), layer, strings).values():
            try:
                row = score_task(group.task(records), ("tar",), backend, seed)[0]
            except InsufficientRecords:
                continue
            if row["status"] == "scored":
                scores.append(row["score"] * 100)
            else:
                undefined += 1
        metrics[f"proxy_tar/layer_{layer}"] = float(np.mean(scores)) if scores else float("nan")
    layer_means = [v for v in metrics.values() if not np.isnan(v)]
    metrics["proxy_tar/mean"] = float(np.mean(layer_means)) if layer_means else float("nan")
    metrics["proxy_tar/undefined"] = float(undefined)
    return metrics

