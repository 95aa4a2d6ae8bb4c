"""The paper's aggregation of per-feature scores, stated once; every summary and Table 2 use it.

    layer score   mean of the layer's finite scores (undefined and failed ones are excluded, and counted);
                  its spread is the population standard deviation of those scores
    model score   mean, and population variance, across layers of the layer scores, over the layers
                  `scored_layers` keeps: all of them, except the last for models of at least
                  `EXCLUDE_LAST_FROM` = 6 layers — the paper keeps every layer of its 1-3-layer models and
                  drops the last of its 6- and 12-layer ones; for depths it never reports (4, 5, 8, 24, ...)
                  the threshold decides, so every depth follows one rule
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

EXCLUDE_LAST_FROM = 6


def scored_layers(layers: Iterable[int], n_layer: int, exclude_last_from: int = EXCLUDE_LAST_FROM) -> list[int]:
    """The layers that enter a model's mean under the paper's rule."""
    return sorted(l for l in layers if not (n_layer >= exclude_last_from and l == n_layer - 1))


def layer_stats(scores: Iterable[float]) -> dict[str, float | int]:
    """mean and population std of the finite scores; `scored` of them, `nan` others (undefined or failed)."""
    values = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "scored": int(finite.size), "nan": int(values.size - finite.size)}


def across_layers(layer_means: Mapping[int, float]) -> tuple[float, float]:
    """Mean and population variance of the finite layer means."""
    means = [m for m in layer_means.values() if m is not None and math.isfinite(m)]
    if not means:
        return float("nan"), float("nan")
    return float(np.mean(means)), float(np.var(means))
