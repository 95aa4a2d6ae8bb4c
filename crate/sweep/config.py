"""The sweep configuration: which pretraining run every trial is, which of its fields are searched, how trials
are scheduled, scored and placed. Everything is validated at load time, before Ray is touched.

    name: ista-grid
    recipe: crate-1l-pile          # every trial starts from this pretraining recipe ...
    trial:                         # ... with these fields changed (any PretrainConfig field)
      train: {max_tokens: 200000000}
    space:                         # dotted PretrainConfig fields -> one distribution each
      model.ista_sparsity: {grid: [0.05, 0.1, 0.2]}
      model.ista_step_size: {loguniform: [0.01, 1.0]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Mapping

from crate.config import Range, check_name, field_type, flatten, from_dict, merge, nest, read_source, to_dict
from crate.errors import ConfigError
from crate.train.config import PretrainConfig

# Reported by every training report (each eval), so ASHA can compare trials on them at any rung.
EVAL_METRICS = ("val/loss", "val/ppl", "neurons/active_per_token", "neurons/dead_fraction", "neurons/zero_fraction",
                "neurons/lasso_objective", "neurons/relative_recon_error")
ISTA_FIELDS = ("model.ista_sparsity", "model.ista_step_size", "model.ista_steps", "model.ista_overcomplete")
DIMENSION_KINDS = {"grid", "choice", "uniform", "loguniform"}


@dataclass
class Dimension:
    """One searched field; exactly one of these is set."""

    grid: list[Any] | None = None  # every value, in every combination with the other grid dimensions
    choice: list[Any] | None = None  # one value drawn uniformly per sample
    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None  # [low, high], low > 0: uniform in log space (λ and η span decades)

    def __post_init__(self) -> None:
        kinds = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ConfigError("kind", f"give exactly one of grid, choice, uniform, loguniform (got {kinds or 'none'})")
        values = getattr(self, kinds[0])
        if self.kind in ("grid", "choice"):
            if not values:
                raise ConfigError(self.kind, "is empty: give at least one value")
            return
        if len(values) != 2 or not values[0] < values[1]:
            raise ConfigError(self.kind, f"must be [low, high] with low < high, got {values}")
        if self.kind == "loguniform" and values[0] <= 0:
            raise ConfigError(self.kind, f"needs low > 0 (log scale), got {values}")

    @property
    def kind(self) -> str:
        return next(name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any]:
        return getattr(self, self.kind)

    def probes(self) -> list[Any]:
        """Values that every trial config must accept: the listed ones, or a range's ends and an interior point
        that is no integer (so a range over an integer field fails here, not in a trial)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        inner = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        return [low, high, inner if not float(inner).is_integer() else inner + (high - low) / 7]

    def describe(self) -> str:
        return f"{self.kind} {self.values}"


@dataclass
class SchedulerConfig:
    kind: Literal["asha", "fifo"] = "asha"  # asha: stop the worst trials early on `metric`; fifo: run all to the end
    grace_period: Annotated[int, Range(1)] = 1000  # training steps before ASHA may stop a trial (its first rung)
    # ASHA keeps the best 1/reduction_factor of the trials at every rung
    reduction_factor: Annotated[float, Range(1, exclusive_low=True)] = 3.0


@dataclass
class SearchConfig:
    algorithm: Literal["random", "optuna"] = "random"  # random: Tune's generator (grids expanded); optuna: TPE
    num_samples: Annotated[int, Range(1)] = 1  # random/optuna: trials drawn; grids: repeats of the whole grid
    seed: int = 0  # the search algorithm's
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)  # trials run first, e.g. the paper's default


@dataclass
class ProxyConfig:
    """The interpretability proxy scored on a completed trial's final model (`crate.interp.proxy_score`)."""

    enabled: bool = True  # score the proxy on every completed trial
    blocks: Annotated[int, Range(1)] = 64  # validation blocks of `data.context` tokens the neurons are recorded on
    neurons_per_layer: Annotated[int, Range(1)] = 64  # seeded sample of neurons per layer
    seed: int = 0  # the neuron sample


@dataclass
class SweepConfig:
    name: str | None = None  # the sweep's id in storage and MLflow; default ista-<date>-<time>; --resume needs it
    recipe: str = "quickstart"  # the pretraining recipe (name or YAML path) every trial starts from
    trial: PretrainConfig = field(default_factory=PretrainConfig)  # recipe + these changes: one trial's run
    # dotted `trial` field -> Dimension. YAML writes `model.ista_sparsity: {grid: [...]}`; an override
    # `space.model.ista_sparsity={loguniform: [0.01, 1]}` replaces that dimension, `...=null` drops it.
    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/loss"  # what the scheduler and the search compare trials on (reported at every evaluation)
    mode: Literal["min", "max"] = "min"  # whether lower or higher `metric` is better
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # how trials are stopped early
    search: SearchConfig = field(default_factory=SearchConfig)  # how trial points are drawn
    proxy: ProxyConfig = field(default_factory=ProxyConfig)  # the interpretability proxy of each final model
    # checked against what the cluster can place before any trial starts
    max_concurrent_trials: Annotated[int, Range(1)] = 1
    # the trial's own driver (a Tune actor): it launches Ray Train, then scores the proxy
    trial_cpus: Annotated[float, Range(0, exclusive_low=True)] = 0.25
    # retries of a failing trial; then it is marked failed and the sweep goes on
    max_failures: Annotated[int, Range(0)] = 1
    cluster_cpus: float | None = None  # most CPUs the cluster will ever have (autoscaling); default: what it has now
    cluster_gpus: float | None = None  # the same for GPUs

    @classmethod
    def defaults_for(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Config-loader hook: the recipe is the base that `trial:` changes."""
        recipe = raw.get("recipe", cls.recipe)
        try:
            return {"trial": read_source(recipe)}
        except ConfigError as error:
            raise ConfigError("recipe", error.message) from None

    def __post_init__(self) -> None:
        if self.name is not None:
            check_name("name", self.name)
        self.space = {key: from_dict(Dimension, value, f"space.{key}")
                      for key, value in flat_space(self.space).items() if value is not None}
        check_trial(self.trial)
        check_space(self.space, self.trial)
        for index, point in enumerate(self.search.points_to_evaluate):
            check_point(point, self.space, self.trial, f"search.points_to_evaluate[{index}]")
        if self.search.algorithm == "optuna":
            grids = [key for key, dim in self.space.items() if dim.kind == "grid"]
            if grids:
                raise ConfigError(f"space.{grids[0]}", "Optuna samples its points: use choice instead of grid")
            if self.search.num_samples < len(self.search.points_to_evaluate):
                raise ConfigError("search.num_samples", "Optuna's trials include points_to_evaluate: give at least "
                                                        f"{len(self.search.points_to_evaluate)}")
        if self.metric not in EVAL_METRICS:  # Tune requires the metric in every result a trial reports
            raise ConfigError("metric", f"{self.metric!r} is not reported by every trial result; choose one of "
                                        f"{', '.join(EVAL_METRICS)}")
        if self.scheduler.kind == "asha" and self.scheduler.grace_period > self.last_eval_before_end:
            raise ConfigError("scheduler.grace_period",
                              f"ASHA's first rung ({self.scheduler.grace_period} steps) must come at or before the last "
                              f"evaluation before a trial ends (step {self.last_eval_before_end} of "
                              f"{self.trial.train.max_steps}, every {self.trial.train.eval_interval}), or it never stops one")

    @property
    def last_eval_before_end(self) -> int:
        """The last step before the final one at which trials report (0 when they evaluate only at the end)."""
        t = self.trial.train
        return (t.max_steps - 1) // t.eval_interval * t.eval_interval

    @property
    def grid_keys(self) -> list[str]:
        return [key for key, dim in self.space.items() if dim.kind == "grid"]

    @property
    def expected_trials(self) -> int:
        """How many trials the sweep runs: every point to evaluate once, then `num_samples` (less those points)
        draws, each over the whole grid (Tune's count; Optuna's num_samples includes the points)."""
        points = len(self.search.points_to_evaluate)
        if self.search.algorithm == "optuna":
            return self.search.num_samples
        grid = math.prod(len(self.space[key].values) for key in self.grid_keys)
        return points + max(self.search.num_samples - points, 0) * grid


def flat_space(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys and nested mappings (what a dotted override makes) to dotted keys. Later entries win, so an
    override replaces the YAML's dimension whole; a None value (an entry to drop) is kept for the caller."""
    return flatten(raw, keep=lambda mapping: bool(DIMENSION_KINDS & set(mapping)))


def check_trial(trial: PretrainConfig) -> None:
    t = trial.train
    if t.launcher != "ray":
        raise ConfigError("trial.train.launcher", "every trial runs on Ray Train (Tune reports come from it)")
    if t.run_name is not None or trial.tracking.run_name is not None:
        raise ConfigError("trial.train.run_name" if t.run_name else "trial.tracking.run_name",
                          "the sweep names every trial's run (<sweep>-<trial id>); leave it unset")
    if t.checkpoint_interval % t.eval_interval:
        raise ConfigError("trial.train.checkpoint_interval",
                          f"must be a multiple of train.eval_interval ({t.eval_interval}): every report Tune receives "
                          f"must carry the validation metrics, and reports happen at checkpoints too")


def check_space(space: Mapping[str, Dimension], trial: PretrainConfig) -> None:
    if not space:
        raise ConfigError("space", "is empty: name at least one trial field to search, e.g. model.ista_sparsity")
    for key, dim in space.items():
        try:
            field_type(PretrainConfig, key, "trial config")
        except ConfigError as error:
            raise error.under("space") from None
        if key == "model.preset":
            raise ConfigError("space.model.preset", "a preset sets many fields at once; search the fields themselves")
        if key in ISTA_FIELDS and trial.model.arch != "crate":
            raise ConfigError(f"space.{key}", f"the trials' model is a {trial.model.arch!r}; ISTA fields are CRATE's")
        for value in dim.probes():
            trial_config(trial, {key: value}, f"space.{key}")


def check_point(point: Mapping[str, Any], space: Mapping[str, Dimension], trial: PretrainConfig, path: str) -> None:
    """A point to evaluate is one trial: a valid value for every searched field."""
    unknown, missing = sorted(set(point) - set(space)), [key for key in space if key not in point]
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", f"is not searched; space has: {', '.join(space)}")
    if missing:
        raise ConfigError(f"{path}.{missing[0]}", "missing: a point gives a value for every searched field")
    trial_config(trial, point, path)


def trial_config(base: PretrainConfig, params: Mapping[str, Any], path: str = "trial") -> PretrainConfig:
    """`base` with dotted `params` set, validated; errors name `path` and the offending value."""
    changes: dict[str, Any] = {}
    for key, value in params.items():
        changes = merge(changes, nest(key, value))
    try:
        return from_dict(PretrainConfig, merge(to_dict(base), changes))
    except ConfigError as error:
        assignments = ", ".join(f"{key}={value!r}" for key, value in params.items())
        raise ConfigError(path, f"{assignments}: {error}") from None
