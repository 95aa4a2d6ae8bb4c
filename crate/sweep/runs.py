"""The sweep in MLflow: one parent run, whose children are the trials' own training runs (each opened by the
pretraining loop on rank 0 with `mlflow.parentRunId` and the sweep/trial tags). After the sweep every child is
marked with its trial's outcome; a trial ASHA stopped ends KILLED (its run was cut off, never closed), and no run
of the sweep is left RUNNING."""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

from crate.config import flatten
from crate.sweep.config import SweepConfig
from crate.sweep.state import RUN_SCOPE
from crate.sweep.trial import SWEEP_TAG, TRIAL_TAG
from crate.tracking import Tracker, TrackingConfig
from crate.tracking.job import TrackedJob

log = logging.getLogger("crate.sweep")

OUTCOME_TAG = "crate.sweep.outcome"
# outcome -> the MLflow status its run ends with
RUN_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def parent_tracking(cfg: SweepConfig) -> TrackingConfig:
    """The trials' tracking settings (same server and experiment); the idle driver samples no system metrics."""
    return dataclasses.replace(cfg.trial.tracking, system_metrics=False)


def parent_job(cfg: SweepConfig, name: str, sweep_id: str, experiment: str, resume: bool,
               legacy_run_id: str | None = None) -> TrackedJob:
    """The sweep's parent run, kept in the experiment's `mlflow_runs.json` and reopened by `--resume`."""
    params = {**{f"space.{key}": dim.describe() for key, dim in cfg.space.items()},
              **{key: value for key, value in flatten(cfg).items() if not key.startswith(("trial.", "space."))},
              "trial.model": cfg.trial.model.preset or cfg.trial.model.arch,
              "trial.max_steps": cfg.trial.train.max_steps, "trial.tokens": cfg.trial.train.max_steps * cfg.trial.tokens_per_step}
    tags = {SWEEP_TAG: sweep_id, "crate.kind": "sweep", "crate.sweep.metric": cfg.metric}
    return TrackedJob(parent_tracking(cfg), "sweep", name, params=params, tags=tags, location=experiment,
                      scope=RUN_SCOPE, resume=resume, legacy_run_id=legacy_run_id)


def mark_trial_runs(parent: Tracker, sweep_id: str, outcomes: dict[str, str]) -> dict[str, str]:
    """Tag every child run with its trial's outcome and end it with the matching status. A trial that was
    restarted from scratch (retried before its first checkpoint) has older runs: those are `superseded`.
    Returns trial id -> MLflow run id of the trial's run."""
    if not parent.active:
        return {}
    try:
        experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
        children = parent.client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and "
                                                                           f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
                                             order_by=["attributes.start_time DESC"], max_results=10_000)
    except Exception as error:  # noqa: BLE001 - tracking never takes the sweep down
        log.warning("could not list the sweep's trial runs in MLflow (%s); they are left unmarked", error)
        return {}
    run_ids: dict[str, str] = {}
    for run in children:
        trial = run.data.tags.get(TRIAL_TAG)
        if trial not in outcomes:
            continue
        outcome = outcomes[trial] if trial not in run_ids else "superseded"
        run_ids.setdefault(trial, run.info.run_id)
        child = Tracker(parent.config, parent.client, run.info.run_id)
        child.set_tags({OUTCOME_TAG: outcome})
        status = final_status(outcome, run.info.status)
        if status != run.info.status:
            child.end(status)
    return run_ids


def final_status(outcome: str, current: str) -> str:
    """A superseded attempt keeps how it ended and is closed (KILLED) only if it was cut off while running."""
    if outcome == "superseded":
        return "KILLED" if current == "RUNNING" else current
    return RUN_STATUS[outcome]


def count_outcomes(outcomes: Iterable[str]) -> dict[str, int]:
    counts = {name: 0 for name in ("completed", "stopped", "failed")}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts
