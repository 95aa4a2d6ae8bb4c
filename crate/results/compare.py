"""The paper's Table 2 from interpretability results tables: per model and metric, the mean across layers and
the population variance across layers of the per-layer mean scores, and CRATE's relative improvement over GPT.

    per-layer score  s̄_l = mean of the layer's scores (NaN — undefined or failed — excluded, and counted)
    mean             (1/|ℒ|) Σ_{l∈ℒ} s̄_l            variance  (1/|ℒ|) Σ_{l∈ℒ} (s̄_l − mean)²
    ℒ                all layers, except the last one for models with ≥ 6 layers (`crate.interp.aggregate`, the
                     one rule every summary uses; both versions are reported)
    improvement      (mean_CRATE − mean_GPT) / |mean_GPT|, per metric and averaged over metrics, for models of
                     the same depth (the paper's "up to 103%")

A series is one model's features under one protocol and backend: the model's neurons, the values at one of its
sites (`--features hook:SITE`, a series per site), or the features of its SAEs (one SAE per layer, from separate
`--features sae:PATH` runs, pooled into one "+SAE" series per site as the paper's GPT-SAE rows). Any subject is a
model here: our CRATE and GPT checkpoints and Hugging Face models (arch = their model type, e.g. `gpt2`) appear
side by side; the improvement pairs only our CRATE and GPT neurons. Scores are Pearson correlations; reports
show them ×100 as the paper does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import polars as pl

from crate.config import Range
from crate.errors import ConfigError
from crate.interp.aggregate import EXCLUDE_LAST_FROM, across_layers, layer_stats, scored_layers
from crate.plots import pyplot, save
from crate.results.tables import feature_label, metric_order, read_results
from crate.tracking import TrackingConfig, resolve_locations
from crate.tracking.job import TrackedJob
from crate.train.checkpoint import last_validation_loss

log = logging.getLogger(__name__)

SERIES = ("model", "feature_kind", "arch", "n_layer", "protocol", "backend")
PAPER_RULE, ALL_LAYERS = "paper", "all"


@dataclass
class CompareConfig:
    results: list[str] = field(default_factory=list)  # results.parquet files, or interpretability output dirs
    output_dir: str = "comparison"  # where table2.md, table2.csv and layers.png go
    metrics: list[str] = field(default_factory=list)  # restrict to these metrics (default: all present)
    protocol: str | None = None  # restrict to one protocol (default: all present)
    # models with at least this many layers drop their last layer
    exclude_last_from: Annotated[int, Range(2)] = EXCLUDE_LAST_FROM
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the MLflow run

    def __post_init__(self) -> None:
        if not self.results:
            raise ConfigError("results", "give at least one results table: compare.py RESULTS...")


@dataclass
class Comparison:
    layers: pl.DataFrame  # one row per series × metric × layer
    summary: pl.DataFrame  # one row per series × metric × rule, with the model's validation loss where known
    improvements: pl.DataFrame  # one row per CRATE/GPT pair × metric × rule (+ metric "average")


def layer_scores(results: pl.DataFrame) -> pl.DataFrame:
    """Per series × metric × layer: mean and std of the finite scores, the number scored and the NaNs."""
    keys = [*SERIES, "metric", "layer"]
    rows = [{**dict(zip(keys, key)), **layer_stats(group["score"].to_list())}
            for key, group in results.group_by(keys, maintain_order=True)]
    schema = {**{k: results.schema[k] for k in keys}, "mean": pl.Float64, "std": pl.Float64, "scored": pl.Int64,
              "nan": pl.Int64}
    return pl.DataFrame(rows, schema=schema).sort(keys)


def summarise(layers: pl.DataFrame, exclude_last_from: int = EXCLUDE_LAST_FROM) -> pl.DataFrame:
    """Mean and population variance across layers of the per-layer means, under both layer rules."""
    rows = []
    for key, group in layers.group_by([*SERIES, "metric"], maintain_order=True):
        series = dict(zip([*SERIES, "metric"], key))
        for rule in (PAPER_RULE, ALL_LAYERS):
            used = group
            if rule == PAPER_RULE:
                kept = scored_layers(group["layer"].to_list(), series["n_layer"], exclude_last_from)
                used = group.filter(pl.col("layer").is_in(kept))
            mean, variance = across_layers(dict(zip(used["layer"].to_list(), used["mean"].to_list())))
            rows.append({**series, "rule": rule, "layers": ",".join(map(str, used["layer"].to_list())),
                         "mean": mean, "variance": variance, "scored": int(used["scored"].sum()),
                         "nan": int(used["nan"].sum())})
    return pl.DataFrame(rows)


def improvements(summary: pl.DataFrame) -> pl.DataFrame:
    """CRATE's relative improvement over GPT, neuron against neuron, at equal depth, protocol and backend;
    per metric and averaged over the metrics both have ("average": ratio of the metric-averaged means)."""
    neurons = summary.filter(pl.col("feature_kind") == "neurons")
    crate = neurons.filter(pl.col("arch") == "crate")
    gpt = neurons.filter(pl.col("arch") == "gpt")
    on = ["n_layer", "protocol", "backend", "metric", "rule"]
    pairs = crate.join(gpt, on=on, suffix="_gpt").select(
        *on, crate=pl.col("model"), gpt=pl.col("model_gpt"), crate_mean=pl.col("mean"), gpt_mean=pl.col("mean_gpt"))
    if pairs.is_empty():
        return pairs.with_columns(improvement=pl.lit(None, dtype=pl.Float64))
    average = (pairs.group_by(["crate", "gpt", "n_layer", "protocol", "backend", "rule"], maintain_order=True)
               .agg(crate_mean=pl.col("crate_mean").mean(), gpt_mean=pl.col("gpt_mean").mean())
               .with_columns(metric=pl.lit("average")))
    both = pl.concat([pairs, average.select(pairs.columns)])
    return both.with_columns(improvement=(pl.col("crate_mean") - pl.col("gpt_mean")) / pl.col("gpt_mean").abs())


def validation_losses(results: pl.DataFrame) -> pl.DataFrame:
    """Per model, the validation loss of its checkpoint: the last evaluation in the trainer state that the
    pretraining job saves beside `model.pt` (null for checkpoints without one, e.g. remote or released ones)."""
    rows = [{"model": model, "val_loss": last_validation_loss(checkpoint)}
            for model, checkpoint in results.select("model", "checkpoint").unique(maintain_order=True).iter_rows()]
    return pl.DataFrame(rows, schema={"model": pl.String, "val_loss": pl.Float64}).unique("model", keep="first")


def compare(results: pl.DataFrame, exclude_last_from: int = EXCLUDE_LAST_FROM) -> Comparison:
    if results["n_layer"].null_count():  # rows without the model's depth: assume its deepest scored layer is last
        log.warning("some results do not record the model's depth; taking the deepest scored layer as its last")
        results = results.with_columns(pl.col("n_layer").fill_null(pl.col("layer").max().over("model") + 1))
    layers = layer_scores(results)
    summary = summarise(layers, exclude_last_from).join(validation_losses(results), on="model", how="left")
    return Comparison(layers, summary, improvements(summary))


def series_label(model: str, feature_kind: str, protocol: str, backend: str, several: dict[str, bool]) -> str:
    label = model + feature_label(feature_kind)
    extra = [v for k, v in (("protocol", protocol), ("backend", backend)) if several[k]]
    return f"{label} ({', '.join(extra)})" if extra else label


# ---------------------------------------------------------------------------------------------------------
def render_markdown(comparison: Comparison, exclude_last_from: int = EXCLUDE_LAST_FROM) -> str:
    summary = comparison.summary
    several = {k: summary[k].n_unique() > 1 for k in ("protocol", "backend")}
    metrics = metric_order(summary["metric"].unique())
    ordered = summary.sort(["n_layer", "arch", "feature_kind", "model"])
    lines = ["# Neuron-level interpretability across layers (the paper's Table 2)", "",
             "Scores are Pearson correlations ×100: per layer the mean over its scored features (undefined and "
             "failed scores excluded), then the mean and the population variance across layers of those "
             f"per-layer means. Last layer excluded for models with ≥ {exclude_last_from} layers, as the paper "
             "does; the same numbers over all layers follow. Val loss: the checkpoint's last validation loss "
             "(nats/token), where its training state is at hand.", ""]
    for rule, title in ((PAPER_RULE, f"last layer excluded from {exclude_last_from} layers on"),
                        (ALL_LAYERS, "all layers")):
        rows = ordered.filter(pl.col("rule") == rule)
        lines += [f"## Mean (variance) across layers — {title}", "",
                  "| model | L | features | val loss | " + " | ".join(metrics) + " |",
                  "|---|---|---|---|" + "---|" * len(metrics)]
        for key, group in rows.group_by(["model", "feature_kind", "protocol", "backend", "n_layer"],
                                        maintain_order=True):
            model, kind, protocol, backend, n_layer = key
            cells = {r["metric"]: f"{100 * r['mean']:.2f} ({1e4 * r['variance']:.2f})" for r in group.iter_rows(named=True)}
            loss = group["val_loss"][0]
            lines.append(f"| {series_label(model, kind, protocol, backend, several)} | {n_layer} | {kind} | "
                         f"{'—' if loss is None else f'{loss:.3f}'} | " + " | ".join(cells.get(m, "—") for m in metrics) + " |")
        lines.append("")
    gains = comparison.improvements
    if not gains.is_empty():
        columns = [*metrics, "average"]
        lines += ["## Relative improvement of CRATE over GPT (means, last-layer rule)", "",
                  "| CRATE | GPT | L | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
        for key, group in gains.filter(pl.col("rule") == PAPER_RULE).sort("n_layer").group_by(
                ["crate", "gpt", "n_layer", "protocol", "backend"], maintain_order=True):
            cells = {r["metric"]: f"{100 * r['improvement']:+.1f}%" for r in group.iter_rows(named=True)}
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells.get(c, "—") for c in columns) + " |")
        lines.append("")
    lines += ["## Coverage", "", "| model | features | metric | layers | scored | NaN (undefined or failed) |",
              "|---|---|---|---|---|---|"]
    for r in ordered.filter(pl.col("rule") == ALL_LAYERS).iter_rows(named=True):
        lines.append(f"| {r['model']} | {r['feature_kind']} | {r['metric']} | {r['layers']} | {r['scored']} | {r['nan']} |")
    return "\n".join(lines) + "\n"


def plot_layers(comparison: Comparison, path: str | Path, exclude_last_from: int = EXCLUDE_LAST_FROM) -> Path:
    """One panel per metric, one line per series: the per-layer mean ×100 with ± its standard error; a layer
    the last-layer rule drops is drawn hollow."""
    import matplotlib.ticker

    plt = pyplot()

    layers = comparison.layers
    several = {k: layers[k].n_unique() > 1 for k in ("protocol", "backend")}
    metrics = metric_order(layers["metric"].unique())
    all_series = layers.select(SERIES).unique(maintain_order=True).sort(["n_layer", "arch", "feature_kind", "model"])
    colors = {key: plt.cm.tab10(i % 10) for i, key in enumerate(all_series.iter_rows())}  # one colour per series
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for key, group in layers.filter(pl.col("metric") == metric).group_by(list(SERIES), maintain_order=True):
            series = dict(zip(SERIES, key))
            label = series_label(series["model"], series["feature_kind"], series["protocol"], series["backend"], several)
            x = group["layer"].to_numpy()
            y = 100 * group["mean"].to_numpy().astype(float)
            sem = 100 * group["std"].to_numpy().astype(float) / group["scored"].clip(lower_bound=1).to_numpy() ** 0.5
            color = colors[tuple(key)]
            style = "--" if series["feature_kind"] != "neurons" else "-"
            ax.plot(x, y, style, marker="o", color=color, label=label)
            ax.fill_between(x, y - sem, y + sem, color=color, alpha=0.15)
            if series["n_layer"] >= exclude_last_from:
                last = x == series["n_layer"] - 1
                ax.plot(x[last], y[last], "o", markerfacecolor="white", color=color)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title=metric, xlabel="layer", ylabel="score ×100 (mean over features)")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_loss_vs_scores(comparison: Comparison, path: str | Path) -> Path:
    """One panel per metric: each model's mean score across layers (last-layer rule) against its validation loss,
    CRATE and GPT in their own colours — up and to the left is more interpretable at better loss."""
    plt = pyplot()

    summary = comparison.summary.filter((pl.col("rule") == PAPER_RULE) & pl.col("val_loss").is_not_null())
    metrics = metric_order(summary["metric"].unique())
    colors = {"crate": "tab:blue", "gpt": "tab:orange"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for row in summary.filter(pl.col("metric") == metric).iter_rows(named=True):
            marker = "o" if row["feature_kind"] == "neurons" else "s"
            ax.scatter(row["val_loss"], 100 * row["mean"], color=colors.get(row["arch"], "grey"), marker=marker)
            ax.annotate(row["model"].split("@")[0], (row["val_loss"], 100 * row["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set(title=metric, xlabel="validation loss (nats/token)", ylabel="score ×100 (mean across layers)")
        ax.scatter([], [], color=colors["crate"], label="CRATE")
        ax.scatter([], [], color=colors["gpt"], label="GPT")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save(fig, path)


def write_comparison(comparison: Comparison, output_dir: str | Path, exclude_last_from: int = EXCLUDE_LAST_FROM) -> list[Path]:
    """table2.md, table2.csv (summary), layers.csv (per-layer means), improvements.csv, layers.png and, where the
    models' validation losses are known, loss_vs_interpretability.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table2.md", out / "table2.csv", out / "layers.csv", out / "improvements.csv"]
    paths[0].write_text(render_markdown(comparison, exclude_last_from), encoding="utf-8")
    comparison.summary.write_csv(paths[1])
    comparison.layers.write_csv(paths[2])
    comparison.improvements.write_csv(paths[3])
    paths.append(plot_layers(comparison, out / "layers.png", exclude_last_from))
    if comparison.summary["val_loss"].is_not_null().any():
        paths.append(plot_loss_vs_scores(comparison, out / "loss_vs_interpretability.png"))
    return paths


def run_compare(config: CompareConfig) -> tuple[Comparison, list[Path]]:
    """The compare job: read, compare, write the files, log them to MLflow; returns the comparison and the files
    written (the markdown table first, which the job script prints)."""
    config = resolve_locations(config)
    with TrackedJob(config.tracking, "compare", "compare", config=config) as job:
        results = read_results(config.results)
        if config.protocol:
            results = results.filter(pl.col("protocol") == config.protocol)
        if config.metrics:
            results = results.filter(pl.col("metric").is_in(config.metrics))
        if results.is_empty():
            raise ValueError(f"no result rows left to compare in {config.results} (protocol={config.protocol}, "
                             f"metrics={config.metrics or 'all'})")
        comparison = compare(results, config.exclude_last_from)
        paths = write_comparison(comparison, config.output_dir, config.exclude_last_from)
        for path in paths:
            job.tracker.log_artifact(path, "comparison")
        for row in comparison.summary.filter(pl.col("rule") == PAPER_RULE).iter_rows(named=True):
            name = re.sub(r"[^\w\-. /]", "_", f"{row['model']}.{row['feature_kind']}.{row['metric']}")  # MLflow's charset
            job.tracker.log_metrics({f"{name}.mean": 100 * row["mean"], f"{name}.variance": 1e4 * row["variance"]},
                                    step=0)
    return comparison, paths
