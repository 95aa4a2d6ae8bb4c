"""The driver side of pretraining: validate, then run the loop on Ray Train (or in this process)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from crate.cluster import connect_ray
from crate.config import to_dict
from crate.data import check_sources
from crate.errors import ConfigError
from crate.tracking.locations import absolute_location, describe_run, resolve_locations
from crate.tracking.provenance import code_version, package_versions
from crate.train.checkpoint import MODEL_FILE, TRAINER_STATE
from crate.train.config import PretrainConfig
from crate.train.loop import RunInfo, raise_returned_error, run_training, train_worker
from crate.train.runtime import LocalRuntime

log = logging.getLogger("crate.train")


@dataclass
class TrainingResult:
    run_name: str
    metrics: dict[str, Any]
    checkpoint: str  # the last checkpoint directory (local path or storage URI)
    tracking: str = "MLflow: tracking off"  # where the MLflow run is and how to open it

    @property
    def model_file(self) -> str:
        """The plain single-file checkpoint (config + fp32 weights) for interpretability and steering."""
        return f"{self.checkpoint.rstrip('/')}/{MODEL_FILE}"

    def summary(self) -> str:
        loss = self.metrics.get("val/loss")
        return (f"run {self.run_name}: {self.metrics.get('step', '?')} steps, "
                f"{self.metrics.get('tokens_seen', 0):,} tokens, val loss "
                f"{'n/a' if loss is None else f'{loss:.4f}'}\nmodel: {self.model_file}\n{self.tracking}")


def default_run_name(cfg: PretrainConfig) -> str:
    return f"{cfg.model.preset or cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_location(path: str) -> str:
    """Cloud URIs pass through; local paths become absolute (Ray Train requires it)."""
    return absolute_location(path)


def launch(cfg: PretrainConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
           callbacks: Sequence[Any] = ()) -> TrainingResult:
    """Check the inputs, then train. `parent_run_id`/`tags`/`callbacks` let a Tune trial nest and report.

    Every location the config leaves relative or to a default (tracking store, artifact root, storage path,
    corpus paths) is resolved here, against the launch directory: Ray Train runs its workers in Ray's own folder."""
    cfg = resolve_locations(cfg)
    check_sources(cfg.data)  # a missing corpus fails here, before any worker starts
    run = RunInfo(name=cfg.train.run_name or default_run_name(cfg), code_version=code_version(),
                  packages=package_versions(), tags=dict(tags or {}), parent_run_id=parent_run_id)
    job = {"config": to_dict(cfg), "run": dataclasses.asdict(run)}
    storage = cfg.train.storage_path
    if cfg.train.launcher == "local":
        runtime = LocalRuntime(Path(storage) / run.name, cfg.train.keep_checkpoints)
        metrics = run_training(job, runtime)
        last = runtime.last_checkpoint
        state = json.loads((last / TRAINER_STATE).read_text())
        return TrainingResult(run.name, metrics, str(last), tracking_summary(cfg, state.get("mlflow_run_id")))
    return _fit_on_ray(cfg, job, run.name, storage, callbacks)


def tracking_summary(cfg: PretrainConfig, run_id: str | None) -> str:
    """The run's MLflow id, store (or URL) and the command that opens it, for the job's final summary."""
    if not cfg.tracking.enabled or not run_id:
        return "MLflow: tracking off" if not cfg.tracking.enabled else "MLflow: no run (tracking failed, see above)"
    try:
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - the summary still names the run and its store
        experiment_id = None
    return describe_run(run_id, experiment_id, cfg.tracking.uri, cfg.tracking.artifact_root)


def check_shared_storage(storage: str, field: str = "train.storage_path") -> None:
    """On a cluster of several nodes, a local storage path must be one every node sees (a shared mount): the
    driver writes a marker there and a task on every other node looks for it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != ray.get_runtime_context().get_node_id()]
    if "://" in storage or not nodes:
        return
    marker = Path(storage) / f".crate-shared-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        sees = ray.remote(num_cpus=0)(lambda path: Path(path).exists())
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                        .remote(str(marker)) for node in nodes])
    finally:
        marker.unlink(missing_ok=True)
    if not all(seen):
        raise ConfigError(field, f"{storage} is local to the driver's node: {seen.count(False)} of the cluster's "
                                 f"{len(nodes) + 1} nodes cannot see it; give storage every node shares, e.g. "
                                 f"{field}=s3://<bucket>/runs or a path on a shared file system")


def _fit_on_ray(cfg: PretrainConfig, job: dict, run_name: str, storage: str, callbacks: Sequence[Any]) -> TrainingResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from crate.train.process_group import BoundRendezvousConfig

    started_here = connect_ray()
    if started_here:
        check_resources(cfg, ray.cluster_resources())
    check_shared_storage(storage)
    t = cfg.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job,
        torch_config=BoundRendezvousConfig(),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     placement_strategy=t.placement_strategy,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **t.worker_resources,
                                                           **({"GPU": 1} if t.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=t.max_failures,
                                                          controller_failure_limit=t.controller_failure_limit),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             callbacks=list(callbacks) or None),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    raise_returned_error(result.return_value)  # a deterministic error, returned by the workers so Ray does not retry
    metrics = dict(result.metrics or {})
    if result.checkpoint is None:
        return TrainingResult(run_name, metrics, "", tracking_summary(cfg, None))
    checkpoint = result.checkpoint
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAINER_STATE}") as stream:
        state = json.loads(stream.read())
    return TrainingResult(run_name, metrics, checkpoint_uri(checkpoint.path, storage),
                          tracking_summary(cfg, state.get("mlflow_run_id")))


def checkpoint_uri(path: str, storage: str) -> str:
    """Ray reports a checkpoint's path on its storage filesystem (`bucket/run/...` for `s3://bucket`): make it a
    URI that `crate.model.load_model` and every other job can open."""
    scheme = storage.split("://", 1)[0] if "://" in storage else None
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def check_resources(cfg: PretrainConfig, available: dict[str, float]) -> None:
    t = cfg.train
    reading = cfg.data.read_cpus if cfg.data.engine == "ray" else 0.0  # at least one read task must fit too
    need_cpu = t.num_workers * t.cpus_per_worker + reading
    if need_cpu > available.get("CPU", 0):
        raise ConfigError("train.cpus_per_worker",
                          f"{t.num_workers} workers x {t.cpus_per_worker} CPUs + {reading:g} for a Ray Data read task "
                          f"(data.read_cpus) = {need_cpu:g} CPUs, but this Ray instance has "
                          f"{available.get('CPU', 0):g}: the read tasks would never start")
    if t.use_gpu and t.num_workers > available.get("GPU", 0):
        raise ConfigError("train.use_gpu", f"{t.num_workers} GPU workers, but this Ray instance has "
                                           f"{available.get('GPU', 0):g} GPUs")
