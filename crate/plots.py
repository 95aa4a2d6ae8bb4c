"""Headless figures: every plot a job writes (PNG files, MLflow artifacts) is drawn with `pyplot()` and written
with `save()`. matplotlib is imported on first use, so importing a module that plots costs nothing."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend: jobs run on servers and Ray workers without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write and close `fig` (figures left open pile up in long jobs)."""
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
