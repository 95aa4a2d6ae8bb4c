"""Reading the interpretability results tables (RESULTS_SCHEMA, `crate.interp.schema`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

from crate.errors import ConfigError

log = logging.getLogger(__name__)


def results_path(path: str | Path) -> Path:
    """A results.parquet file, or the interpretability output directory that holds one."""
    path = Path(path)
    resolved = path / "results.parquet" if path.is_dir() else path
    if not resolved.is_file():
        raise ConfigError("results", f"no results table at {path} (expected a results.parquet file or a directory "
                                f"holding one, as jobs/interpret.py writes)")
    return resolved


def read_results(paths: Sequence[str | Path]) -> pl.DataFrame:
    """The result rows of several tables; a key present in more than one is kept once (the first). Tables of an
    earlier schema lack some key columns (schema 3 added reading and windows): those read as null."""
    from crate.interp.schema import RESULT_KEY

    tables = []
    for path in paths:
        table = pl.read_parquet(results_path(path))
        missing = [name for name in RESULT_KEY if name not in table.columns]
        tables.append(table.with_columns([pl.lit(None, dtype=pl.String).alias(name) for name in missing]))
    table = distinct_labels(pl.concat(tables, how="diagonal_relaxed"))
    unique = table.unique(subset=list(RESULT_KEY), keep="first", maintain_order=True)
    if len(unique) < len(table):
        log.warning("%d result rows appear in more than one table; each is counted once", len(table) - len(unique))
    return unique


def distinct_labels(table: pl.DataFrame) -> pl.DataFrame:
    """Two models (other `model_sha256`) that share a label — the same run name and step, other weights — are
    relabelled `<label>-<sha12>` each, so no table, plot or view merges their scores."""
    if "model_sha256" not in table.columns:
        return table
    shared = (table.group_by("model").agg(pl.col("model_sha256").n_unique().alias("models"))
              .filter(pl.col("models") > 1)["model"])
    if shared.is_empty():
        return table
    log.warning("results of different models share the labels %s: each is shown with its model_sha256 prefix",
                ", ".join(shared.to_list()))
    suffixed = pl.concat_str([pl.col("model"), pl.lit("-"), pl.col("model_sha256").str.slice(0, 12)])
    return table.with_columns(pl.when(pl.col("model").is_in(shared.to_list())).then(suffixed)
                              .otherwise(pl.col("model")).alias("model"))


def feature_label(feature_kind: str) -> str:
    """What follows a model's label for its features: nothing for its neurons, "+SAE" for an SAE on them,
    "+SAE@SITE" for an SAE on another site, "@SITE" for the values at a hook point or module (`hook:SITE`)."""
    kind, _, site = feature_kind.partition(":")
    if kind == "neurons":
        return ""
    if kind == "hook":
        return f"@{site}"
    return f"+{kind.upper()}" + (f"@{site}" if site else "")


def metric_order(metrics: Iterable[str]) -> list[str]:
    """The schema's order (tar, random, top, anthropic), then any others alphabetically."""
    from crate.interp.schema import METRICS

    return sorted(set(metrics), key=lambda m: (METRICS.index(m) if m in METRICS else len(METRICS), m))


@dataclass(frozen=True)
class ExplainedNeuron:
    layer: int
    neuron: int
    metric: str
    score: float
    explanation: str | None
    checkpoint: str | None  # the checkpoint the score was computed on


def top_explained(results: str | Path, k: int, metric: str | None = None, layer: int | None = None) -> list[ExplainedNeuron]:
    """The `k` model neurons (not SAE features) with the highest finite score under `metric` (default: the
    first metric in the table), optionally within one layer."""
    table = read_results([results]).filter(pl.col("feature_kind") == "neurons")
    if table.is_empty():
        raise ValueError(f"{results} holds no scored model neurons")
    metrics = table["metric"].unique(maintain_order=True).to_list()
    metric = metric or metrics[0]
    if metric not in metrics:
        raise ValueError(f"{results} has no metric {metric!r}; it has {', '.join(metrics)}")
    chosen = table.filter((pl.col("metric") == metric) & pl.col("score").is_finite())
    if layer is not None:
        chosen = chosen.filter(pl.col("layer") == layer)
    rows = chosen.sort(["score", "layer", "neuron"], descending=[True, False, False]).head(k)
    if rows.is_empty():
        raise ValueError(f"{results} has no finite {metric} score" + (f" in layer {layer}" if layer is not None else ""))
    return [ExplainedNeuron(r["layer"], r["neuron"], metric, r["score"], r["explanation"], r["checkpoint"])
            for r in rows.iter_rows(named=True) if math.isfinite(r["score"])]
