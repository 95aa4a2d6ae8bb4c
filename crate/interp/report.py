"""Per-layer and per-model summaries of a results table, and the paper's per-layer score plot.

Scores are reported ×100 (paper Table 2). A layer's mean is over its "scored" features; "undefined" (NaN) scores
are counted, never averaged; "failed" ones are counted separately. When a layer was sampled (`--sample N` of its
F features), `ci95` is the half-width of a 95% t-interval on the layer mean (from the sample standard deviation)
with the finite-population correction √((F−n)/(F−1)); over all F features it is 0. `std` and the model means
follow the one rule of `crate.interp.aggregate`: over all layers (`mean`), and without the last layer for models
of 6 or more layers (`mean_excl_last`; equal to `mean` otherwise).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pyarrow as pa

from crate.interp.aggregate import across_layers, layer_stats, scored_layers
from crate.plots import pyplot

GROUP = ("model", "features", "protocol", "metric", "backend", "prompt_version", "seed")


def _t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def layer_summary(table: pa.Table, layer_sizes: Mapping[int, int] | None = None) -> list[dict]:
    """One dict per (GROUP…, layer): n, scored, undefined, failed, mean, std, ci95 (×100)."""
    rows = table.select([*GROUP, "layer", "score", "status"]).to_pylist()
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((*(row[k] for k in GROUP), row["layer"]), []).append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        scores = np.array([r["score"] for r in members if r["status"] == "scored"], dtype=np.float64) * 100
        stats = layer_stats(scores)
        n = stats["scored"]
        population = (layer_sizes or {}).get(key[-1])
        ci95 = float("nan")
        if n > 1:
            fpc = math.sqrt(max(population - n, 0) / (population - 1)) if population and population > 1 else 1.0
            ci95 = _t_quantile(n - 1) * float(scores.std(ddof=1)) / math.sqrt(n) * fpc
        out.append({**dict(zip((*GROUP, "layer"), key)), "n": len(members), "scored": n,
                    "undefined": sum(r["status"] == "undefined" for r in members),
                    "failed": sum(r["status"] == "failed" for r in members),
                    "mean": stats["mean"], "std": stats["std"], "ci95": ci95})
    return out


def model_summary(layers: list[dict], n_layer: int) -> list[dict]:
    """Per GROUP: the mean of the layer means over all layers, and under the paper's last-layer rule."""
    groups: dict[tuple, list[dict]] = {}
    for row in layers:
        groups.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    out = []
    for key, rows in groups.items():
        means = {r["layer"]: r["mean"] for r in rows if not math.isnan(r["mean"])}
        kept = {l: means[l] for l in scored_layers(means, n_layer)}
        mean_excl_last, variance_excl_last = across_layers(kept)
        out.append({**dict(zip(GROUP, key)), "layers": len(means), "mean": across_layers(means)[0],
                    "mean_excl_last": mean_excl_last, "variance_excl_last": variance_excl_last,
                    "undefined": sum(r["undefined"] for r in rows), "failed": sum(r["failed"] for r in rows)})
    return out


def plot_layers(layers: list[dict], n_layer: int, title: str):
    """Mean score ×100 per layer, one line per metric, with 95% CI (sampled) or std/10 bars (the paper's scaling)."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(7, 4))
    series: dict[str, list[dict]] = {}
    for row in layers:
        series.setdefault(f"{row['protocol']} {row['metric']} ({row['backend']})", []).append(row)
    for label, rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["layer"])
        bars = [r["ci95"] if not math.isnan(r["ci95"]) else r["std"] / 10 for r in rows]
        axis.errorbar([r["layer"] for r in rows], [r["mean"] for r in rows], yerr=np.nan_to_num(bars), marker="o",
                      capsize=3, label=label)
    if scored_layers([n_layer - 1], n_layer) == []:
        axis.axvspan(n_layer - 1.5, n_layer - 0.5, color="0.9", label="excluded from the paper's mean")
    axis.set_xticks(sorted({r["layer"] for r in layers}))
    axis.set_xlabel("layer")
    axis.set_ylabel("score (Pearson × 100)")
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"


def format_summary(summary: Mapping) -> str:
    """The job's summary as a table to read: one line per protocol × metric (scores ×100), then where it is."""
    scored: dict[tuple, int] = {}
    for row in summary["layers"]:
        key = (row["protocol"], row["metric"])
        scored[key] = scored.get(key, 0) + row["scored"]
    lines = [f"{summary['model']} (model_sha256 {str(summary.get('model_sha256'))[:12]}), backend {summary['backend']}",
             "| protocol | metric | layers | mean | mean excl. last | scored | undefined | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(summary["models"], key=lambda r: (r["protocol"], r["metric"])):
        lines.append(f"| {row['protocol']} | {row['metric']} | {row['layers']} | {_number(row['mean'])} | "
                     f"{_number(row['mean_excl_last'])} | {scored.get((row['protocol'], row['metric']), 0)} | "
                     f"{row['undefined']} | {row['failed']} |")
    if not summary["models"]:
        lines.append("| (no scores) | | | | | | | |")
    if "rows" in summary:
        lines.append(f"failed: {summary['failed_rows']} of {summary['rows']} result rows"
                     + (f"; {summary['quarantined']} unreadable log lines quarantined" if summary.get("quarantined") else ""))
    lines.append(f"output: {summary['output_dir']} (summary.json, results.parquet, layers.png)")
    if summary.get("mlflow_run_id"):
        lines.append(f"MLflow run: {summary['mlflow_run_id']}")
    return "\n".join(lines)
