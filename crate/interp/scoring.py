"""Scoring one feature: explain, simulate, and the pooled Pearson correlation per metric (Bills et al. 2023).

score = corr(true, simulated) over the concatenation of all tokens of a metric's excerpts — not a mean of
per-excerpt correlations. True activations are raw; simulated ones are expected values on the 0..10 scale
(Pearson is affine-invariant). The correlation is undefined (NaN, status "undefined") when either side is constant
over those tokens, e.g. a sparse feature that never fires on its random excerpts; such scores are counted and
left out of every mean. Backend failures and unusable model output become status "failed" with the reason; no
exception leaves `score_task`.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from crate.interp.backends.base import Backend, BackendError
from crate.interp.prompts import PROMPT_VERSIONS, MalformedOutput
from crate.interp.protocols import ScoringTask

log = logging.getLogger(__name__)


def pearson(true: np.ndarray, simulated: np.ndarray) -> float:
    """Pearson correlation, NaN when either vector is constant (or empty)."""
    true, simulated = np.asarray(true, dtype=np.float64), np.asarray(simulated, dtype=np.float64)
    if true.size < 2 or np.ptp(true) == 0 or np.ptp(simulated) == 0:
        return float("nan")
    return float(np.corrcoef(true, simulated)[0, 1])


def identity(backend: Backend) -> dict[str, str]:
    """The result columns that name a backend: its `backend` key, models, reading and prompt format."""
    return {"backend": backend.name, "simulator_kind": backend.simulator.kind,
            "explainer_model": backend.explainer.model_name, "simulator_model": backend.simulator.model_name,
            "reading": backend.reading, "prompt_format": backend.prompt_format,
            "prompt_version": PROMPT_VERSIONS[backend.prompt_format]}


def _row(task: ScoringTask, metric: str, backend: dict[str, str], seed: int, **fields) -> dict:
    return {"layer": task.layer, "neuron": task.neuron, "protocol": task.protocol, "metric": metric, "seed": seed,
            "explain_excerpts": [e.ref for e in task.explain], "record_shortfall": task.record_shortfall,
            **backend, **fields}


def failed_rows(task: ScoringTask, metrics: Sequence[str], backend: dict[str, str], seed: int, reason: str,
                attempts: int = 0, duration_s: float = 0.0) -> list[dict]:
    """Rows for a feature that could not be scored; `backend` is `identity(backend)`."""
    return [_row(task, m, backend, seed, score=float("nan"), status="failed", reason=reason, explanation=None,
                 excerpts=[task.score[i].ref for i in task.metrics[m]], simulated=None, n_defaulted=0,
                 attempts=attempts, duration_s=duration_s) for m in metrics]


def score_task(task: ScoringTask, metrics: Sequence[str], backend: Backend, seed: int) -> list[dict]:
    """One row per metric (see RESULTS_SCHEMA; provenance columns are added by the job)."""
    started = time.perf_counter()
    backend.calls.reset()
    try:
        explanation = backend.explainer.explain(task.explain, seed + task.seed_offset)
        simulation = backend.simulator.simulate(explanation, task.score)
        if len(simulation.values) != len(task.score) or any(
                len(v) != len(e.tokens) for v, e in zip(simulation.values, task.score)):
            raise MalformedOutput("simulation does not match the excerpts' lengths")
    except (BackendError, MalformedOutput) as error:
        return failed_rows(task, metrics, identity(backend), seed, str(error), backend.calls.count,
                           time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - one feature's bug must not end a job of thousands
        log.warning("layer %d neuron %d: unexpected error", task.layer, task.neuron, exc_info=True)
        return failed_rows(task, metrics, identity(backend), seed, f"internal error: {type(error).__name__}: {error}",
                           backend.calls.count, time.perf_counter() - started)
    rows = []
    for metric in metrics:
        index = task.metrics[metric]
        true = np.concatenate([task.score[i].activations for i in index])
        simulated = np.concatenate([simulation.values[i] for i in index])
        score = pearson(true, simulated)
        undefined = np.isnan(score)
        reason = None
        if undefined:
            reason = "true activations are constant" if np.ptp(true) == 0 else "simulated activations are constant"
        rows.append(_row(task, metric, identity(backend), seed, score=score, status="undefined" if undefined else "scored",
                         reason=reason, explanation=explanation, excerpts=[task.score[i].ref for i in index],
                         simulated=[np.asarray(simulation.values[i], dtype=np.float32).tolist() for i in index],
                         n_defaulted=simulation.n_defaulted, attempts=backend.calls.count,
                         duration_s=time.perf_counter() - started))
    return rows
