"""Ray actors around the two heavy stages; the stages themselves (crate.interp.collect, crate.interp.scoring) never
import Ray.

- `collect_sharded`: each collection actor loads the model once and runs the collector core over its share of
  the batches (interleaved, so every actor sees the whole stream's range); the driver merges the states
  (associative, so the result equals one pass).
- `score_tasks`: a pool of backend actors (one per GPU for in-process models, or N request workers for HTTP),
  each with `concurrency` features in flight; the driver keeps at most actors × concurrency tasks submitted and
  hands every finished feature's rows to `on_rows` at once. A crashed actor is restarted by Ray and its tasks
  retried (`max_actor_restarts`); a task that still fails becomes failed rows, never a failed job.
  With `workers.actors=0` the same contract runs in the driver process instead (`LocalScoringPool`: one backend,
  `concurrency` features in flight on threads, no Ray).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from crate.cluster import connect_ray
from crate.errors import ConfigError
from crate.interp.collect import RecordCollector, collect
from crate.interp.protocols import ScoringTask
from crate.interp.scoring import failed_rows

log = logging.getLogger(__name__)


def _no_gpu(field: str, gpus: float) -> ConfigError | None:
    """The error of an actor given `gpus` GPUs that sees no CUDA device (None when it sees one, or wants none)."""
    if gpus <= 0 or torch.cuda.is_available():
        return None
    return ConfigError(field, f"this actor was given {gpus:g} GPU(s) but sees no CUDA device "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}, "
                              f"torch {torch.__version__}); give it a GPU node or set {field}=0")


class CollectionWorker:
    """Loads the model once (checked against the driver's model_sha256) and collects shards on its device. A worker
    given GPUs that sees none loads nothing and says so in `ready`."""

    def __init__(self, checkpoint: str, features: str, sha256: str, gpus: float = 0.0):
        from crate.interp.features import feature_source
        from crate.interp.subject import load_subject_model, model_sha256
        from crate.model import resolve_device

        self.problem = _no_gpu("workers.collect_gpus", gpus)
        if self.problem:
            return
        self.model = load_subject_model(checkpoint)
        loaded = model_sha256(self.model.inner)
        if loaded != sha256:  # records must come from the model the driver named
            raise RuntimeError(f"{checkpoint} changed after the job started: model_sha256 {loaded[:12]}"
                               f", the job's {sha256[:12]}")
        self.source = feature_source(features)
        self.device = resolve_device("auto")

    def ready(self) -> str:
        if self.problem:
            raise self.problem
        return self.device.type

    def collect(self, batches, spec, features: dict[int, np.ndarray], seed: int) -> RecordCollector:
        return collect(self.model, batches, spec, self.source, features, seed, self.device).to("cpu")


_local_instance = False  # whether this process started the Ray instance it uses (no autoscaler to add GPUs)


def _connect() -> bool:
    global _local_instance
    _local_instance = connect_ray() or _local_instance
    return _local_instance


def check_gpus(gpus: float, field: str) -> None:
    """Join Ray; a ConfigError naming `field` when actors asking for `gpus` GPUs each can never get them: the Ray
    instance was started here (no autoscaler) and has fewer. A cluster may still add GPU nodes (see `_started`)."""
    import ray

    local = _connect()
    if gpus > 0 and local and ray.cluster_resources().get("GPU", 0) < gpus:
        raise ConfigError(field, f"asks for {gpus:g} GPU(s) per actor; the local Ray instance has "
                                 f"{ray.cluster_resources().get('GPU', 0):g}")


def _started(calls: list, field: str, gpus: float, wait_s: float) -> list:
    """The results of one start-up call per actor; a ConfigError naming `field` when actors that want GPUs cannot
    get them: a cluster that has none to give within `wait_s` (an autoscaler adds GPU nodes only for pending
    actors, so waiting is the only way to know), or an actor that got a GPU slot but sees no CUDA device."""
    import ray
    from ray.exceptions import RayTaskError

    ready, pending = ray.wait(calls, num_returns=len(calls), timeout=wait_s if gpus > 0 else None)
    if pending:
        raise ConfigError(field, f"{len(pending)} actor(s) asking for {gpus:g} GPU(s) did not start within "
                                 f"workers.gpu_wait_s={wait_s:g}s (the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs)")
    try:
        return ray.get(ready)
    except RayTaskError as error:
        if isinstance(error.cause, ConfigError):
            raise ConfigError(error.cause.field, error.cause.message) from None
        raise


def collect_sharded(checkpoint: str, sha256: str, features_spec: str, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                    spec, features: dict[int, np.ndarray], seed: int, workers) -> RecordCollector:
    import ray

    check_gpus(workers.collect_gpus, "workers.collect_gpus")
    actors, gpus = workers.collect_actors, workers.collect_gpus
    worker = ray.remote(num_cpus=1, num_gpus=gpus)(CollectionWorker)
    handles = [worker.remote(checkpoint, features_spec, sha256, gpus) for _ in range(actors)]
    try:
        _started([h.ready.remote() for h in handles], "workers.collect_gpus", gpus, workers.gpu_wait_s)
        shards = [list(batches[i::actors]) for i in range(actors)]
        pending = [h.collect.remote(shard, spec, features, seed) for h, shard in zip(handles, shards) if shard]
        merged = None
        with tqdm(total=len(pending), unit="shard", desc="collect") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                shard = ray.get(done[0])
                merged = shard if merged is None else merged.merge(shard)
                bar.update(1)
    finally:
        for h in handles:
            ray.kill(h)
    return merged


class ScoringWorker:
    """One backend; a worker given GPUs that sees none builds nothing and says so in `identity`."""

    def __init__(self, backend_config, seed: int, gpus: float = 0.0):
        from crate.interp.backends import build_backend

        self.problem = _no_gpu("workers.gpus_per_actor", gpus)
        if not self.problem:
            self.backend = build_backend(backend_config, seed)

    def identity(self) -> dict[str, str]:
        from crate.interp.scoring import identity

        if self.problem:
            raise self.problem
        return identity(self.backend)

    def score(self, task: ScoringTask, metrics: tuple[str, ...], seed: int) -> list[dict]:
        from crate.interp.scoring import score_task

        return score_task(task, metrics, self.backend, seed)


class ScoringPool:
    """Backend actors; `identity` names the backend for the results' key before any task runs."""

    def __init__(self, backend_config, workers, seed: int):
        import ray

        check_gpus(workers.gpus_per_actor, "workers.gpus_per_actor")
        options = dict(num_cpus=workers.cpus_per_actor, num_gpus=workers.gpus_per_actor,
                       max_concurrency=workers.concurrency, max_restarts=workers.max_actor_restarts,
                       max_task_retries=workers.max_actor_restarts)
        actor = ray.remote(**options)(ScoringWorker)
        self.actors = [actor.remote(backend_config, seed + i, workers.gpus_per_actor) for i in range(workers.actors)]
        self.concurrency = workers.concurrency
        try:
            self.identity = _started([a.identity.remote() for a in self.actors], "workers.gpus_per_actor",
                                     workers.gpus_per_actor, workers.gpu_wait_s)[0]
        except BaseException:
            self.close()
            raise

    def score_tasks(self, tasks: Iterable[tuple[ScoringTask, tuple[str, ...]]], total: int, seed: int,
                    on_rows: Callable[[list[dict]], None]) -> None:
        import ray
        from ray.exceptions import RayError

        limit = len(self.actors) * self.concurrency
        in_flight: dict = {}
        load = [0] * len(self.actors)
        queue = iter(tasks)
        with tqdm(total=total, unit="neuron", desc="score", smoothing=0.05, mininterval=2.0) as bar:
            while True:
                while len(in_flight) < limit and (item := next(queue, None)) is not None:
                    i = load.index(min(load))
                    in_flight[self.actors[i].score.remote(*item, seed)] = (item, i)
                    load[i] += 1
                if not in_flight:
                    break
                done, _ = ray.wait(list(in_flight), num_returns=1)
                (task, metrics), i = in_flight.pop(done[0])
                load[i] -= 1
                try:
                    rows = ray.get(done[0])
                except RayError as error:
                    log.warning("layer %d neuron %d: worker failed: %s", task.layer, task.neuron, error)
                    rows = failed_rows(task, metrics, self.identity, seed, f"worker failed: {type(error).__name__}")
                on_rows(rows)
                bar.update(1)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class LocalScoringPool:
    """`workers.actors=0`: one backend in the driver process, `concurrency` features in flight on threads."""

    def __init__(self, backend_config, workers, seed: int):
        from crate.interp.backends import build_backend
        from crate.interp.scoring import identity

        problem = _no_gpu("workers.gpus_per_actor", workers.gpus_per_actor)
        if problem:
            raise problem
        self.backend = build_backend(backend_config, seed)
        self.concurrency = workers.concurrency
        self.identity = identity(self.backend)

    def score_tasks(self, tasks: Iterable[tuple[ScoringTask, tuple[str, ...]]], total: int, seed: int,
                    on_rows: Callable[[list[dict]], None]) -> None:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from crate.interp.scoring import score_task

        queue = iter(tasks)
        in_flight: set = set()
        with ThreadPoolExecutor(self.concurrency) as threads, \
                tqdm(total=total, unit="neuron", desc="score", smoothing=0.05, mininterval=2.0) as bar:
            while True:
                while len(in_flight) < self.concurrency and (item := next(queue, None)) is not None:
                    in_flight.add(threads.submit(score_task, *item, self.backend, seed))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:  # score_task turns every error into failed rows
                    on_rows(future.result())
                    bar.update(1)

    def close(self) -> None:
        self.backend.close()
