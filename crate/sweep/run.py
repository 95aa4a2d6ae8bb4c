"""The sweep driver: check everything, open the MLflow parent run, run (or resume) the Tune experiment, then
mark the trials' runs and write the report.

Layout under `<trial.train.storage_path>/<name>/`: Tune's experiment (one folder per trial), `crate-sweep.json`
(sweep id, config), `mlflow_runs.json` (the parent run), `trials/<name>-<trial id>/` (each trial's Ray Train run
and checkpoints) and `report/` (summary.csv, summary.md, plots/).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import posixpath
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import polars as pl

from crate.cluster import connect_ray
from crate.config import to_dict
from crate.data import check_sources
from crate.errors import ConfigError
from crate.sweep.config import SweepConfig
from crate.sweep.report import ETA, LAMBDA, TrialRecord, markdown, summary_table, write_report
from crate.sweep.runs import count_outcomes, mark_trial_runs, parent_job
from crate.sweep.state import SweepState, check_same_config, read_state, write_state
from crate.sweep.trial import COMPLETED, TrialSetup, run_trial
from crate.tracking import resolve_locations
from crate.train import PretrainConfig
from crate.train.launch import storage_location

log = logging.getLogger("crate.sweep")


@dataclass
class SweepResult:
    name: str
    experiment: str  # the Tune experiment's location
    parent_run_id: str | None
    table: pl.DataFrame | None  # None when the sweep was interrupted before every trial ended
    tracking: str = ""  # the parent run's store and the command that opens it

    def summary(self) -> str:
        if self.table is None:
            return f"sweep {self.name} was interrupted; continue it with --resume name={self.name}"
        return (f"{markdown(self.table)}\nsweep {self.name}: report in {self.experiment}/report, MLflow parent run "
                f"{self.parent_run_id or '(tracking off)'}" + (f"\n{self.tracking}" if self.tracking else ""))


def run_sweep(cfg: SweepConfig, resume: bool = False) -> SweepResult:
    """Run the sweep `cfg` describes (or continue it): every check before the first trial, then Tune, then the
    report. An interrupted sweep returns a result without a table."""
    name, storage, experiment, state = locate(cfg, resume)
    preflight(cfg)
    base = pinned_trial(cfg.trial, experiment)
    sweep_id = state.sweep_id if state else f"{name}-{uuid.uuid4().hex[:6]}"
    job = parent_job(cfg, name, sweep_id, experiment, resume=state is not None,
                     legacy_run_id=state.parent_run_id if state else None)
    with job:
        parent = job.tracker
        if state is None:
            write_state(experiment, SweepState(sweep_id, None, to_dict(cfg)))
        setup = TrialSetup(sweep_id=sweep_id, name=name, base=base, parent_run_id=parent.run_id, proxy=cfg.proxy)
        log.info("sweep %s (%s): %s; every trial %s for %d steps (%s tokens), up to %d at once; experiment %s",
                 name, sweep_id, ", ".join(f"{k} {d.describe()}" for k, d in cfg.space.items()),
                 base.model.preset or base.model.arch, base.train.max_steps,
                 f"{base.train.max_steps * base.tokens_per_step:,}", cfg.max_concurrent_trials, experiment)
        grid = build_tuner(cfg, setup, storage, name, experiment, resume).fit()
        records = trial_records(grid, base)
        ended = sum(r.outcome != "unfinished" for r in records)
        if ended < cfg.expected_trials:
            job.end("KILLED")
            log.warning("sweep %s stopped after %d of %d trials; continue it with --resume name=%s", name, ended,
                        cfg.expected_trials, name)
            return SweepResult(name, experiment, parent.run_id, None)
        run_ids = mark_trial_runs(parent, sweep_id, {r.trial_id: r.outcome for r in records})
        for record in records:
            record.run_id = run_ids.get(record.trial_id)
        keys = list(dict.fromkeys([*(k for k in (LAMBDA, ETA) if base.model.arch == "crate"), *cfg.space]))
        table = summary_table(records, keys, cfg.metric, cfg.mode)
        publish_report(table, cfg, name, experiment, parent, keys)
    return SweepResult(name, experiment, parent.run_id, table, parent.describe())


def locate(cfg: SweepConfig, resume: bool) -> tuple[str, str, str, SweepState | None]:
    """The sweep's name, storage root, experiment location and saved state; a new sweep must not exist yet and
    a resumed one must, with the same config."""
    if resume and cfg.name is None:
        raise ConfigError("name", "--resume needs the name of the sweep to continue (name=<sweep>)")
    name = cfg.name or f"ista-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = storage_location(cfg.trial.train.storage_path)
    experiment = posixpath.join(storage, name)
    state = read_state(experiment)
    if resume and state is None:
        raise ConfigError("name", f"no sweep {name!r} at {experiment} to resume")
    if not resume and state is not None:
        raise ConfigError("name", f"sweep {name!r} already exists at {experiment}: --resume it or choose another name")
    if state is not None:
        check_same_config(state.config, to_dict(cfg), name)
    return name, storage, experiment, state


def preflight(cfg: SweepConfig) -> None:
    """What would otherwise fail in every trial, or hang: the corpus, the cluster's size, the State API."""
    import ray

    check_sources(cfg.trial.data, "trial.data")
    connect_ray()
    check_capacity(cfg, ray.cluster_resources())
    check_state_api()


def pinned_trial(trial: PretrainConfig, experiment: str) -> PretrainConfig:
    """The trials' config with everything a trial actor would resolve against its own working directory (Tune
    moves it into the trial's folder) resolved here; trial runs are stored inside the sweep."""
    trial = resolve_locations(trial)
    return dataclasses.replace(trial, train=dataclasses.replace(trial.train,
                                                                storage_path=posixpath.join(experiment, "trials")))


def trial_resources(cfg: SweepConfig) -> dict[str, float]:
    """What one trial may hold at once: its driver, its Train workers and their Ray Data read tasks (each worker
    keeps up to `read_tasks` running; counting fewer lets one trial's reads starve the next trial's workers)."""
    t, d = cfg.trial.train, cfg.trial.data
    reads = t.num_workers * d.read_tasks * d.read_cpus if d.engine == "ray" else 0.0
    return {"CPU": cfg.trial_cpus + t.num_workers * t.cpus_per_worker + reads,
            "GPU": float(t.num_workers) if t.use_gpu else 0.0}


def check_capacity(cfg: SweepConfig, cluster: Mapping[str, float]) -> None:
    """ConfigError unless `max_concurrent_trials` trials fit the cluster at once (a trial that can never be
    placed would wait forever)."""
    need = trial_resources(cfg)
    t, d = cfg.trial.train, cfg.trial.data
    have = {"CPU": cfg.cluster_cpus if cfg.cluster_cpus is not None else cluster.get("CPU", 0.0),
            "GPU": cfg.cluster_gpus if cfg.cluster_gpus is not None else cluster.get("GPU", 0.0)}
    parts = (f"trial driver {cfg.trial_cpus:g} + {t.num_workers} worker(s) x {t.cpus_per_worker:g}"
             + (f" + {t.num_workers * d.read_tasks} read task(s) x {d.read_cpus:g}" if d.engine == "ray" else ""))
    for kind in ("CPU", "GPU"):
        if not need[kind]:
            continue
        fits = math.floor(have[kind] / need[kind] + 1e-9)
        if fits < 1:
            raise ConfigError("trial.train.num_workers",
                              f"one trial needs {need[kind]:g} {kind}s ({parts if kind == 'CPU' else 'one per worker'}), "
                              f"but the cluster has {have[kind]:g} (set cluster_{kind.lower()}s if it autoscales)")
        if cfg.max_concurrent_trials > fits:
            raise ConfigError("max_concurrent_trials",
                              f"{cfg.max_concurrent_trials} trials at once need {cfg.max_concurrent_trials * need[kind]:g} "
                              f"{kind}s ({need[kind]:g} each), but the cluster has {have[kind]:g}: at most {fits} fit")


def check_state_api() -> None:
    """Ray Train frees the workers' placement group of a trial that Tune stops (ASHA) or ends from a detached
    cleaner that asks the State API whether the trial's controller is still alive; without Ray's dashboard
    those resources leak and later trials wait forever. Fail now instead."""
    import ray
    from ray.util.state import list_nodes

    node = ray.get_runtime_context().get_node_id()
    try:
        nodes = {n.node_id for n in list_nodes(limit=10_000, timeout=30)}
    except Exception as error:  # noqa: BLE001 - any failure means the same thing here
        raise RuntimeError(f"Ray's State API is unavailable ({type(error).__name__}); sweeps need the Ray dashboard "
                           f"(ray start --head --include-dashboard=true, or ray.init(include_dashboard=True))") from None
    if node not in nodes:
        raise RuntimeError("Ray's State API answers for another Ray cluster (its nodes do not include this one); "
                           "set RAY_API_SERVER_ADDRESS to this cluster's dashboard")


def build_tuner(cfg: SweepConfig, setup: TrialSetup, storage: str, name: str, experiment: str, resume: bool):
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": cfg.trial_cpus})
    if resume and tune.Tuner.can_restore(experiment):
        log.info("resuming sweep %s: finished trials are kept, unfinished ones continue", name)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.search.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials, scheduler=scheduler(cfg),
                                    search_alg=searcher(cfg), trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
    )


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    from ray import tune

    build = {"grid": tune.grid_search, "choice": tune.choice,
             "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: build[dim.kind](list(dim.values)) for key, dim in cfg.space.items()}


def scheduler(cfg: SweepConfig):
    if cfg.scheduler.kind == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Time is the training step (not Tune's iteration count), so a resumed trial keeps its place in the rungs.
    # Every rung lies at or before the last evaluation before the end, and nothing stops a trial at its end:
    # a completed trial must live on to score the proxy and report completion.
    return ASHAScheduler(time_attr="step", max_t=cfg.last_eval_before_end, grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor, stop_last_trials=False)


def searcher(cfg: SweepConfig):
    points = [dict(point) for point in cfg.search.points_to_evaluate]
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=points or None, seed=cfg.search.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=cfg.search.seed,
                                 max_concurrent=cfg.max_concurrent_trials)


def trial_dirname(trial) -> str:
    return trial.trial_id


def trial_records(grid, base: PretrainConfig) -> list[TrialRecord]:
    """Each trial's parameters, outcome and last result. Tune marks the last result `done` when a trial ends or
    its scheduler stops it; a trial without an error, a completion report or that mark was cut off by an
    interrupted sweep (`unfinished`)."""
    defaults = {LAMBDA: base.model.ista_sparsity, ETA: base.model.ista_step_size}
    records = []
    for result in grid:
        metrics = dict(result.metrics or {})
        params = result.config or trial_params(result)
        outcome = ("failed" if result.error else "completed" if metrics.get(COMPLETED)
                   else "stopped" if metrics.get("done") else "unfinished")
        records.append(TrialRecord(trial_id=metrics.get("trial_id") or posixpath.basename(result.path),
                                   params={**defaults, **params}, outcome=outcome, metrics=metrics,
                                   error=error_line(result.error) if result.error else None))
    return records


def trial_params(result) -> dict[str, Any]:
    """The sampled fields Tune saved for a trial that never reported ({} for one that never started)."""
    import json

    try:
        with result.filesystem.open_input_stream(posixpath.join(result.path, "params.json")) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return {}


def error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def publish_report(table: pl.DataFrame, cfg: SweepConfig, name: str, experiment: str, parent, keys: list[str]) -> None:
    """The report into `<experiment>/report` and onto the parent run, with the sweep's outcome counts."""
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "report"
        write_report(table, directory, cfg.metric, cfg.mode, cfg.grid_keys, keys, name)
        filesystem, root = pyarrow.fs.FileSystem.from_uri(experiment)
        filesystem.create_dir(posixpath.join(root, "report"), recursive=True)
        pyarrow.fs.copy_files(str(directory), posixpath.join(root, "report"),
                              source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=filesystem)
        parent.log_artifact(directory)
    counts = count_outcomes(table["outcome"])
    parent.log_metrics({f"sweep/trials_{outcome}": n for outcome, n in counts.items()}, step=0)
    best = table.filter(pl.col("outcome") == "completed").head(1)
    if len(best) and best[cfg.metric][0] is not None:
        parent.log_metrics({f"best/{cfg.metric}": best[cfg.metric][0]}, step=0)
        parent.set_tags({"crate.sweep.best_trial": best["trial"][0]})
    log.info("sweep %s: %s; report in %s/report", name, ", ".join(f"{n} {o}" for o, n in counts.items()), experiment)
