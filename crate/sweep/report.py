"""The sweep's trade-off report: one row per trial (polars -> CSV and markdown), validation loss against λ and η
(a heatmap when both are grids), and the loss-vs-sparsity Pareto front with the paper's default λ = η = 0.1
marked. Only completed trials can be on a front: a stopped trial saw fewer tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from crate.plots import pyplot, save
from crate.sweep.config import EVAL_METRICS

LAMBDA, ETA = "model.ista_sparsity", "model.ista_step_size"
PAPER_DEFAULT = {LAMBDA: 0.1, ETA: 0.1}  # arXiv 2410.16443 trains every CRATE with η = λ = 0.1
OBJECTIVES = (*EVAL_METRICS, "proxy_tar/mean")
SHORT = {LAMBDA: "λ", ETA: "η", "model.ista_steps": "ISTA steps", "model.ista_overcomplete": "overcomplete",
         "train.optim.lr": "lr", "val/loss": "val loss", "val/ppl": "val ppl", "neurons/active_per_token": "active/token",
         "neurons/dead_fraction": "dead", "neurons/zero_fraction": "zero", "neurons/lasso_objective": "LASSO obj.",
         "neurons/relative_recon_error": "recon err", "proxy_tar/mean": "proxy TaR"}
# Pareto axes: (column, label, True when more is better)
SPARSITY_AXES = (("neurons/active_per_token", "mean active neurons per token", False),
                 ("neurons/dead_fraction", "dead neuron fraction", False),
                 ("proxy_tar/mean", "interpretability proxy (token-set TaR ×100)", True))


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]  # every searched field's value, plus λ and η even when they are not searched
    outcome: str  # completed | stopped | failed
    metrics: dict[str, Any]  # the trial's last result
    error: str | None = None
    run_id: str | None = None


def summary_table(records: Sequence[TrialRecord], keys: Sequence[str], metric: str, mode: str) -> pl.DataFrame:
    """One row per trial: completed trials best first, then stopped, then failed."""
    rows = [{"trial": r.trial_id, "outcome": r.outcome, **{k: r.params.get(k) for k in keys},
             "step": r.metrics.get("step"), "tokens": r.metrics.get("tokens_seen"),
             **{m: _number(r.metrics.get(m)) for m in OBJECTIVES}, "mlflow_run_id": r.run_id,
             "error": r.error} for r in records]
    table = pl.DataFrame(rows, infer_schema_length=None)
    rank = {"completed": 0, "stopped": 1, "failed": 2}
    return (table.with_columns(pl.col("outcome").replace_strict(rank, default=3).alias("_rank"))
            .sort(["_rank", metric, "trial"], descending=[False, mode == "max", False], nulls_last=True)
            .drop("_rank"))


def markdown(table: pl.DataFrame) -> str:
    """The table as GitHub markdown, rounded for reading (the CSV keeps full precision)."""
    columns = [c for c in table.columns if c not in ("mlflow_run_id", "error") and table[c].null_count() < len(table)]
    lines = ["| " + " | ".join(SHORT.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table.select(columns).iter_rows(named=True):
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(table: pl.DataFrame, directory: Path, metric: str, mode: str, grid_keys: Sequence[str],
                 keys: Sequence[str], title: str) -> list[Path]:
    """summary.csv, summary.md and the plots (those the trials' results allow) in `directory`; returns the files
    written."""
    directory.mkdir(parents=True, exist_ok=True)
    table.write_csv(directory / "summary.csv")
    (directory / "summary.md").write_text(markdown(table), encoding="utf-8")
    files = [directory / "summary.csv", directory / "summary.md"]
    if table[metric].is_null().all():
        return files  # no trial reported anything to plot (all failed)
    (directory / "plots").mkdir(exist_ok=True)
    files.append(directory / "plots" / "loss_vs_lambda_eta.png")
    numeric = [k for k in keys if table[k].dtype.is_numeric()]
    if LAMBDA in grid_keys and ETA in grid_keys:
        plot_heatmap(table, metric, mode, title, files[-1])
    elif numeric:
        plot_against_params(table, [k for k in (LAMBDA, ETA) if k in numeric] or numeric, metric, title, files[-1])
    else:
        files.pop()
    if any(table[column].is_not_null().any() for column, _, _ in SPARSITY_AXES):
        files.append(directory / "plots" / "pareto.png")
        plot_pareto(table, metric, mode, title, files[-1])
    return files


def pareto_front(points: Sequence[tuple[float, float]], x_higher_better: bool, y_higher_better: bool) -> list[int]:
    """Indices of the non-dominated points, ordered by x: no other point is at least as good on both axes and
    better on one."""
    sx, sy = (-1 if x_higher_better else 1), (-1 if y_higher_better else 1)
    order = sorted(range(len(points)), key=lambda i: (sx * points[i][0], sy * points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if sy * points[i][1] < best_y:
            front.append(i)
            best_y = sy * points[i][1]
    return front


# --------------------------------------------------------------------------------------------------
def plot_heatmap(table: pl.DataFrame, metric: str, mode: str, title: str, path: Path) -> None:
    """Grid sweeps: the metric of the best completed trial in every (λ, η) cell."""
    plt = pyplot()
    lams, etas = sorted(table[LAMBDA].unique().to_list()), sorted(table[ETA].unique().to_list())
    values = [[math.nan] * len(lams) for _ in etas]
    notes = [[""] * len(lams) for _ in etas]
    for row in table.iter_rows(named=True):
        i, j = etas.index(row[ETA]), lams.index(row[LAMBDA])
        value = row[metric]
        if row["outcome"] == "completed" and value is not None and not _better_or_equal(values[i][j], value, mode):
            values[i][j] = value
        elif row["outcome"] != "completed" and not notes[i][j]:
            notes[i][j] = "stopped" if row["outcome"] == "stopped" else "failed"
    fig, ax = plt.subplots(figsize=(1.3 * len(lams) + 2.5, 1.0 * len(etas) + 1.8))
    image = ax.imshow(values, cmap="viridis_r" if mode == "min" else "viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"final {metric}")
    for i in range(len(etas)):
        for j in range(len(lams)):
            value = values[i][j]
            red, green, blue, _ = image.cmap(image.norm(value)) if not math.isnan(value) else (1, 1, 1, 1)
            ax.text(j, i, f"{value:.3f}" if not math.isnan(value) else notes[i][j], ha="center", va="center", fontsize=8,
                    color="black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white")
            if _is_default(lams[j], etas[i]):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
    ax.set_yticks(range(len(etas)), [f"{v:g}" for v in etas])
    ax.set_xlabel("λ (ista_sparsity)")
    ax.set_ylabel("η (ista_step_size)")
    ax.set_title(f"{title}: {metric} (red: the paper's λ = η = 0.1)", fontsize=9)
    save(fig, path, dpi=110)


def plot_against_params(table: pl.DataFrame, keys: Sequence[str], metric: str, title: str, path: Path) -> None:
    """Other sweeps: the metric against each searched value (λ and η first), one point per trial."""
    plt = pyplot()
    varying = [k for k in keys if table[k].n_unique() > 1] or list(keys[:1])
    fig, axes = plt.subplots(1, len(varying), figsize=(5 * len(varying), 4), squeeze=False)
    done = table.filter((pl.col("outcome") == "completed") & pl.col(metric).is_not_null())
    stopped = table.filter((pl.col("outcome") == "stopped") & pl.col(metric).is_not_null())
    default = done.filter(_default_filter(done))
    for ax, key in zip(axes[0], varying):
        if len(stopped):
            ax.scatter(stopped[key], stopped[metric], facecolors="none", edgecolors="gray", label="stopped early (at its stop)")
        ax.scatter(done[key], done[metric], color="C0", label="completed", zorder=2)
        _mark_default(ax, default[key], default[metric])
        if table[key].min() > 0 and table[key].max() / table[key].min() > 10:
            ax.set_xscale("log")
        ax.set_xlabel(f"{SHORT.get(key, key)} ({key.split('.')[-1]})")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: {metric} per trial", fontsize=10)
    save(fig, path, dpi=110)


def plot_pareto(table: pl.DataFrame, metric: str, mode: str, title: str, path: Path) -> None:
    """The metric against each sparsity/interpretability measure, with the completed trials' Pareto front."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    axes_used = [axis for axis in SPARSITY_AXES if table[axis[0]].is_not_null().any()]
    fig, axes = plt.subplots(1, len(axes_used), figsize=(5.5 * len(axes_used), 4.5), squeeze=False)
    lams = [v for v in (table[LAMBDA] if LAMBDA in table.columns else []) if v and v > 0]
    norm = LogNorm(min(lams), max(lams)) if len(set(lams)) > 1 else None
    for ax, (column, label, higher_better) in zip(axes[0], axes_used):
        done = table.filter((pl.col("outcome") == "completed") & pl.col(column).is_not_null() & pl.col(metric).is_not_null())
        stopped = table.filter((pl.col("outcome") == "stopped") & pl.col(column).is_not_null())
        if len(stopped):
            ax.scatter(stopped[column], stopped[metric], facecolors="none", edgecolors="gray",
                       label="stopped early (at its stop)")
        color = dict(c=done[LAMBDA].to_list(), cmap="plasma", norm=norm) if norm else dict(color="C0")
        points = ax.scatter(done[column], done[metric], label="completed", zorder=2, **color)
        if norm:
            fig.colorbar(points, ax=ax, label="λ (ista_sparsity)")
        for row in done.iter_rows(named=True):
            ax.annotate(_point_label(row), (row[column], row[metric]), fontsize=6, xytext=(4, 4), textcoords="offset points")
        front = pareto_front(list(zip(done[column], done[metric])), higher_better, mode == "max")
        if len(front) > 1:
            ax.step([done[column][i] for i in front], [done[metric][i] for i in front], where="post", color="black",
                    linewidth=1, label="Pareto front (completed)")
        default = done.filter(_default_filter(done))
        _mark_default(ax, default[column], default[metric])
        ax.set_xlabel(label + (" (more is better)" if higher_better else ""))
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: {metric} vs sparsity", fontsize=10)
    save(fig, path, dpi=110)


def _mark_default(ax, xs, ys) -> None:
    label = "paper default λ = η = 0.1" if len(xs) else "paper default (not completed in this sweep)"
    ax.scatter(xs, ys, marker="*", s=380, facecolors="none", edgecolors="red", linewidths=1.5, label=label, zorder=3)


def _point_label(row: dict[str, Any]) -> str:
    return f"λ={row[LAMBDA]:g} η={row[ETA]:g}" if LAMBDA in row and ETA in row else str(row["trial"])


# --------------------------------------------------------------------------------------------------
def _default_filter(table: pl.DataFrame) -> pl.Expr:
    if LAMBDA not in table.columns or ETA not in table.columns:
        return pl.lit(False)
    return ((pl.col(LAMBDA) - PAPER_DEFAULT[LAMBDA]).abs() < 1e-12) & ((pl.col(ETA) - PAPER_DEFAULT[ETA]).abs() < 1e-12)


def _is_default(lam: float, eta: float) -> bool:
    return math.isclose(lam, PAPER_DEFAULT[LAMBDA]) and math.isclose(eta, PAPER_DEFAULT[ETA])


def _better_or_equal(current: float, candidate: float, mode: str) -> bool:
    if math.isnan(current):
        return False
    return current <= candidate if mode == "min" else current >= candidate


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
