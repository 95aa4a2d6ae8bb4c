"""The interpretability job: records → explain → simulate → score → summary, resumable, one MLflow run.

    python jobs/interpret.py --checkpoint ckpt.pt --corpus pile://val --metric tar,random --backend http \
        backend.explainer_model=… backend.base_url=http://vllm:8000/v1

Output directory (default `interp/<label>-<sha12>`, one per model, under `CRATE_STORAGE_PATH` when that is a local
folder — the stack's persistent one — else under the directory the job was started from; the label is
`<run>@<step>`, sha12 the start of its model_sha256): `model.json` (the one model it holds), `records/<collection_id>/`
(reused by any later job with the same model, corpus, features, seed and collection settings), the results table
(crate.interp.store), `summary.json`, `layers.png`. Rerunning the same command after a kill resumes: finished
records are reused, finished features are skipped, failed ones are retried, and the MLflow run of the same job
scope is reopened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from crate.errors import ConfigError
from crate.files import write_atomic
from crate.interp.collect import batched, collect, records_precision, with_neighbours
from crate.interp.config import InterpConfig
from crate.interp.features import feature_source
from crate.interp.prompts import PROMPT_VERSIONS
from crate.interp.protocols import InsufficientRecords, ScoringTask, metric_groups
from crate.interp.records import is_complete, read_feature_records, write_records
from crate.interp.report import layer_summary, model_summary, plot_layers
from crate.interp.schema import RESULTS_SCHEMA, result_key, write_parquet
from crate.interp.scoring import failed_rows
from crate.interp.store import DATABASE_FILE, LOG_FILE, RESULTS_FILE, ResultStore
from crate.interp.subject import Subject
from crate.model import resolve_device
from crate.objectstore import STORAGE_VAR
from crate.plots import save
from crate.tracking.job import TrackedJob

log = logging.getLogger(__name__)


class TooManyFailures(RuntimeError):
    """More than `max_failed_share` of the job's result rows failed; the summary is written, a rerun retries them."""

    def __init__(self, summary: dict, max_share: float):
        self.summary = summary
        failed, rows = summary["failed_rows"], summary["rows"]
        super().__init__(f"{failed} of {rows} result rows failed ({failed / max(rows, 1):.0%}), more than "
                         f"max_failed_share={max_share:g}; their reasons are in {summary['results']} "
                         f"(status failed); rerun the same command to retry only them")


def _code_version() -> str:
    from crate.tracking.provenance import code_version

    return code_version()


def selected_features(cfg: InterpConfig, n_features: dict[int, int]) -> dict[int, np.ndarray]:
    """Every feature of each layer, or a seeded sample of `cfg.sample` of them (sorted)."""
    chosen = {}
    for layer, n in n_features.items():
        if cfg.sample is None or cfg.sample >= n:
            chosen[layer] = np.arange(n)
        else:
            chosen[layer] = np.sort(np.random.default_rng([cfg.seed, layer]).choice(n, cfg.sample, replace=False))
    return chosen


class InterpretabilityJob:
    def __init__(self, cfg: InterpConfig):
        self.subject = Subject.load(cfg.checkpoint)
        model = self.subject.model
        self.cfg = cfg = _for_model(cfg, model.context)
        self.layers = list(cfg.layers) if cfg.layers is not None else list(range(model.n_layer))
        self.source = feature_source(cfg.features)
        try:
            n_features = {layer: self.source.n_features(model, layer) for layer in self.layers}
        except ConfigError:  # the source does not fit the model (a site it lacks): already names `features`
            raise
        except ValueError as error:
            raise ConfigError("layers", str(error)) from None
        self.n_features = n_features
        self.features = selected_features(cfg, n_features)
        self.groups = metric_groups(cfg.protocol, cfg.metrics, cfg.random_only)
        self.windows = {m: getattr(cfg, group.collection).windows for group, metrics in self.groups for m in metrics}
        for group, _ in self.groups:
            collection = getattr(cfg, group.collection)
            if collection.block_length > model.context:
                raise ConfigError(f"{group.collection}.block_length", f"{collection.block_length} exceeds the model's "
                                                                      f"context ({model.context})")
        self._check_devices()
        self._check_corpus()
        self._check_backend()
        # under a local CRATE_STORAGE_PATH (the stack's persistent folder) when it is set, else the working dir
        storage = os.environ.get(STORAGE_VAR, "")
        default = Path("" if "://" in storage else storage) / "interp" / self.subject.folder
        self.out = Path(cfg.output_dir or default).resolve()  # on the driver
        self._check_output()
        self.store = ResultStore(self.out, mirror=_results_mirror(storage, self.subject.folder, cfg.output_dir))
        self._write_json("model.json", {"model": self.subject.model_id, "model_sha256": self.subject.sha256,
                                        "checkpoint": self.subject.checkpoint})

    def _check_output(self) -> None:
        """An output folder holds one model's records and results: refuse another model's (by content)."""
        identity = self.out / "model.json"
        if identity.is_file():
            theirs = json.loads(identity.read_text())
            if theirs.get("model_sha256") != self.subject.sha256:
                raise ConfigError("output_dir", f"{self.out} holds {theirs.get('model')} (model_sha256 "
                                                f"{str(theirs.get('model_sha256'))[:12]}), not this checkpoint's "
                                                f"{self.subject.model_id} ({self.subject.sha256[:12]}); give another "
                                                f"--output or leave it unset (a folder per model)")
        elif any((self.out / name).exists() for name in ("records", RESULTS_FILE, DATABASE_FILE, LOG_FILE)):
            raise ConfigError("output_dir", f"{self.out} holds records or results of a model it does not name "
                                            f"(no model.json); give another --output")

    def _check_devices(self) -> None:
        """What runs in this process and asks for a GPU must see one (actors check theirs when they start)."""
        cfg = self.cfg
        if not cfg.workers.collect_actors and cfg.device.startswith("cuda") and not _cuda():
            raise ConfigError("device", f"{cfg.device}: this process sees no CUDA device (collection runs here with "
                                        f"workers.collect_actors=0; set device=cpu or give it collection actors)")
        if not cfg.workers.actors and cfg.workers.gpus_per_actor > 0 and not _cuda():
            raise ConfigError("workers.gpus_per_actor", "scoring runs in this process (workers.actors=0), which "
                                                        "sees no CUDA device")
        if cfg.backend.kind == "hf" and cfg.workers.actors and cfg.workers.gpus_per_actor == 0:
            log.warning("the hf backend's actors get no GPU (workers.gpus_per_actor=0): the models run on CPU")

    def _check_corpus(self) -> None:
        from crate.data import read_blocks

        length = getattr(self.cfg, self.groups[0][0].collection).block_length
        try:
            first = next(iter(read_blocks(self.cfg.corpus, length, 1)), None)
        except Exception as error:  # noqa: BLE001 - any reader error is a bad --corpus
            raise ConfigError("corpus", f"{self.cfg.corpus} cannot be read: {error}") from None
        if first is None:
            raise ConfigError("corpus", f"{self.cfg.corpus} holds fewer than {length} tokens")

    def _check_backend(self) -> None:
        """Local model files must exist before anything runs (the actors would fail later, less clearly)."""
        b = self.cfg.backend
        if b.kind != "hf":
            return
        for field, path, gguf in (("explainer_model", b.explainer_model, b.explainer_gguf),
                                  ("simulator_model", b.simulator, b.simulator_gguf if b.simulator_model else b.explainer_gguf)):
            if not Path(path).is_dir():
                raise ConfigError(f"backend.{field}", f"no local model directory at {path} (models are never downloaded)")
            if gguf and not (Path(path) / gguf).is_file():
                raise ConfigError(f"backend.{field}", f"no GGUF file {gguf} in {path}")

    # -- stage 1: records ------------------------------------------------------------------------------------
    def records(self, name: str) -> Path:
        """The records directory of collection `name` ("records" or "anthropic_records"), collected if needed."""
        cfg, spec = self.cfg, getattr(self.cfg, name)
        sample = {l: f.tolist() for l, f in self.features.items()} if cfg.sample else None
        precision = records_precision(self._collection_device())
        collection_id = spec.collection_id(model=self.subject.sha256, precision=precision, corpus=cfg.corpus,
                                           features=cfg.features, seed=cfg.seed, layers=self.layers, sample=sample)
        directory = self.out / "records" / collection_id
        if is_complete(directory):
            log.info("records %s: reusing %s", name, directory)
            return directory
        from crate.data import read_blocks

        started = time.perf_counter()
        blocks = list(read_blocks(cfg.corpus, spec.block_length, spec.blocks))
        if len(blocks) < spec.blocks:
            log.warning("%s holds only %d blocks of %d tokens (asked for %d)", cfg.corpus, len(blocks), spec.block_length,
                        spec.blocks)
        batches = list(batched(blocks, spec.batch_blocks))
        if spec.windows == "stream":  # windows run across batch edges: each batch brings its neighbours
            batches = with_neighbours(batches)
        if cfg.workers.collect_actors:
            from crate.interp.distributed import collect_sharded

            collector = collect_sharded(self.subject.checkpoint, self.subject.sha256, cfg.features, batches, spec,
                                        self.features, cfg.seed, cfg.workers)
        else:
            collector = collect(self.subject.model, tqdm(batches, unit="batch", desc=f"collect {name}"), spec,
                                self.source, self.features, cfg.seed, self._collection_device())
        provenance = {**self.subject.provenance, "features": cfg.features, "corpus": cfg.corpus,
                      "blocks": collector.n_blocks, "collection": dataclasses.asdict(spec),
                      "collection_id": collection_id, "precision": precision, "seed": cfg.seed, "tokenizer": "gpt2",
                      "code_version": _code_version(), "created_at": time.time()}
        write_records(collector, directory, provenance)
        log.info("records %s: %d blocks × %d tokens, %d layers, %d features in %.1fs -> %s", name, collector.n_blocks,
                 spec.block_length, len(self.layers), sum(len(f) for f in self.features.values()),
                 time.perf_counter() - started, directory)
        return directory

    def _collection_device(self) -> str:
        """Where records are collected: the actors' GPUs (collect_gpus > 0), else the driver's `device`."""
        if self.cfg.workers.collect_actors:
            return "cuda" if self.cfg.workers.collect_gpus > 0 else "cpu"
        return str(resolve_device(self.cfg.device))

    # -- stage 2: explain, simulate, score ---------------------------------------------------------------------
    def key(self, backend: dict[str, str], layer: int, neuron: int, metric: str) -> tuple:
        """The result key; `backend` is the pool's identity (scoring.identity: name, reading, prompt version)."""
        return result_key({"model": self.subject.model_id, "model_sha256": self.subject.sha256,
                           "features": self.cfg.features, "layer": layer,
                           "neuron": neuron, "protocol": self.cfg.protocol, "metric": metric, "backend": backend["backend"],
                           "prompt_version": backend["prompt_version"], "reading": backend["reading"],
                           "windows": self.windows[metric], "seed": self.cfg.seed})

    def tasks(self, backend: dict[str, str], collections: dict[str, Path], store):
        """(task, metrics) for every feature with a requested metric not yet in the results. A feature without
        enough records is stored as failed right here (it needs no backend); quantile bins a feature's records
        could not fill are logged per layer (and counted in its rows' record_shortfall)."""
        for group, metrics in self.groups:
            n_bins = getattr(self.cfg, group.collection).n_bins
            for layer in self.layers:
                todo = {}
                for n in self.features[layer]:
                    missing = tuple(m for m in metrics if self.key(backend, layer, int(n), m) not in self.store.done)
                    if missing:
                        todo[int(n)] = missing
                if not todo:
                    continue
                short = []
                for neuron, records in read_feature_records(collections[group.collection], layer, list(todo)).items():
                    try:
                        task = group.task(records, n_bins)
                    except InsufficientRecords as error:
                        empty = ScoringTask(layer, neuron, self.cfg.protocol, (), (), {m: () for m in todo[neuron]})
                        store(failed_rows(empty, todo[neuron], backend, self.cfg.seed, str(error)))
                        continue
                    if task.record_shortfall:
                        short.append(task.record_shortfall)
                    yield task, todo[neuron]
                if short:
                    log.warning("layer %d: %d features lack %d quantile records in all (bins too rare for "
                                "quantile_pool; see record_shortfall)", layer, len(short), sum(short))

    def count_todo(self, backend: dict[str, str]) -> int:
        return sum(any(self.key(backend, layer, int(n), m) not in self.store.done for m in metrics)
                   for _, metrics in self.groups for layer in self.layers for n in self.features[layer])

    def run(self) -> dict:
        """Collect (or reuse) records, start the backends, score every feature not yet finished, summarise; returns
        the summary (raises TooManyFailures after writing it when more than max_failed_share of its rows failed)."""
        from crate.interp.distributed import LocalScoringPool, ScoringPool, check_gpus

        cfg, pool = self.cfg, None
        try:
            if cfg.workers.actors and cfg.workers.gpus_per_actor > 0:  # before the records are made
                check_gpus(cfg.workers.gpus_per_actor, "workers.gpus_per_actor")
            collections = {group.collection: self.records(group.collection) for group, _ in self.groups}
            # after the records: collection actors and backend actors may not fit the cluster at the same time
            pool = (ScoringPool if cfg.workers.actors else LocalScoringPool)(cfg.backend, cfg.workers, cfg.seed)
            return self._score(pool, collections)
        finally:
            if pool is not None:
                pool.close()
            self.store.close()

    def _score(self, pool, collections: dict[str, Path]) -> dict:
        cfg = self.cfg
        records_id = {m: collections[group.collection].name for group, metrics in self.groups for m in metrics}
        job = TrackedJob(cfg.tracking, "interpret", f"interpret-{self.subject.model_id}", config=cfg,
                         params=self._params(), tags=self._tags(pool.identity), location=self.out,
                         scope=self._scope(pool.identity), code_version=_code_version())
        with job:
            common = {**self.subject.provenance, "features": cfg.features, "feature_kind": self.source.kind,
                      "random_only": cfg.random_only,
                      "corpus": cfg.corpus, "job_run_id": job.run_id, "code_version": _code_version()}

            def store(rows: list[dict]) -> None:
                now = int(time.time() * 1000)
                self.store.append({**common, **row, "records_id": records_id[row["metric"]],
                                   "windows": self.windows[row["metric"]], "created_at": now}
                                  for row in rows)
                if self.store.unfolded >= cfg.workers.compact_every:
                    self.store.compact()

            total = self.count_todo(pool.identity)
            log.info("scoring %d features with %s (%s × %d in flight)", total, pool.identity["backend"],
                     f"{cfg.workers.actors} actors" if cfg.workers.actors else "the driver", cfg.workers.concurrency)
            pool.score_tasks(self.tasks(pool.identity, collections, store), total, cfg.seed, store)
            self.store.compact()
            self.store.write_results()
            summary = self.summarize(pool.identity, job.tracker)
            if summary["failed_rows"] > cfg.max_failed_share * summary["rows"]:
                raise TooManyFailures(summary, cfg.max_failed_share)
        return summary

    # -- stage 3: summary ----------------------------------------------------------------------------------------
    def summarize(self, backend: dict[str, str], tracker) -> dict:
        cfg = self.cfg
        table = self.store.table()
        equal = {"model": self.subject.model_id, "model_sha256": self.subject.sha256, "features": cfg.features,
                 "protocol": cfg.protocol, "backend": backend["backend"], "seed": cfg.seed,
                 "prompt_version": backend["prompt_version"], "reading": backend["reading"],
                 "random_only": cfg.random_only}
        mask = pc.and_(pc.is_in(table["metric"], pa.array(cfg.metrics)),
                       pc.is_in(table["layer"], pa.array(self.layers, pa.int32())))
        for column, value in equal.items():
            mask = pc.and_(mask, pc.equal(table[column], value))
        chosen = [(layer << 32) + int(n) for layer, features in self.features.items() for n in features]
        unit = pc.add(pc.shift_left(pc.cast(table["layer"], pa.int64()), 32), pc.cast(table["neuron"], pa.int64()))
        mask = pc.and_(mask, pc.is_in(unit, pa.array(chosen, pa.int64())))  # this job's features only
        scoped = table.filter(mask)
        layers = layer_summary(scoped, self.n_features)
        models = model_summary(layers, self.subject.model.n_layer)
        summary = {"output_dir": str(self.out), "results": str(self.store.results_path), "model": self.subject.model_id,
                   "model_sha256": self.subject.sha256, "checkpoint": self.subject.checkpoint,
                   "quarantined": self.store.quarantined, "backend": backend["backend"], "protocol": cfg.protocol, "mlflow_run_id": tracker.run_id,
                   "rows": scoped.num_rows, "failed_rows": sum(r["failed"] for r in layers),
                   "layers": layers, "models": models}
        self._write_json("summary.json", summary)
        figure = plot_layers(layers, self.subject.model.n_layer, f"{self.subject.model_id} ({cfg.features})")
        tracker.log_figure(figure, "layers.png")
        save(figure, self.out / "layers.png")
        for row in layers:
            prefix = f"{row['protocol']}/{row['metric']}"
            tracker.log_metrics({f"{prefix}/{k}": row[k] for k in ("mean", "std", "ci95", "scored", "undefined", "failed")
                                 if row[k] == row[k]}, step=row["layer"])
        for row in models:
            prefix = f"{row['protocol']}/{row['metric']}"
            tracker.log_metrics({f"{prefix}/model_mean": row["mean"], f"{prefix}/model_mean_excl_last": row["mean_excl_last"]},
                                step=0)
        with tempfile.TemporaryDirectory() as directory:  # this job's rows only (the table may hold other jobs')
            tracker.log_artifact(write_parquet(scoped, Path(directory) / "results.parquet", RESULTS_SCHEMA), "results")
        tracker.log_artifact(self.out / "summary.json")
        return summary

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _scope(self, backend: dict[str, str]) -> str:
        return json.dumps([self.subject.model_id, self.subject.sha256, self.cfg.features, self.cfg.protocol, sorted(self.cfg.metrics),
                           backend["backend"], backend["prompt_version"], backend["reading"], self.cfg.random_only,
                           self.windows, self.cfg.seed, self.layers, self.cfg.sample])

    def _write_json(self, name: str, payload) -> None:
        write_atomic(self.out / name, json.dumps(payload, indent=1, default=str))

    def _params(self) -> dict:
        model = self.subject.model
        return {"model.id": self.subject.model_id, "model.sha256": self.subject.sha256, "model.arch": model.arch,
                "model.n_layer": model.n_layer, "features.kind": self.source.kind,
                "features.per_layer": max(self.n_features.values()),
                "prompt_version": PROMPT_VERSIONS[self.cfg.backend.prompt_format]}

    def _tags(self, backend: dict[str, str]) -> dict[str, str]:
        tags = {"crate.arch": self.subject.model.arch, "crate.model_id": self.subject.model_id,
                "crate.model_sha256": self.subject.sha256,
                "crate.checkpoint": self.subject.checkpoint, "crate.backend": backend["backend"],
                "crate.protocol": self.cfg.protocol}
        if self.subject.run_id:
            tags["crate.model_run_id"] = str(self.subject.run_id)  # the training run this job evaluates
        return tags


def _results_mirror(storage: str, folder: str, output_dir: str | None) -> str | None:
    """Where the results of a job in its default folder are mirrored: the same folder under a remote
    CRATE_STORAGE_PATH (the driver's disk may not outlive the job); None for a local one (it is the folder)."""
    return f"{storage.rstrip('/')}/interp/{folder}" if "://" in storage and not output_dir else None


def _for_model(cfg: InterpConfig, context: int) -> InterpConfig:
    """`cfg` with the collection settings the user left to the model (block_length) filled in from its context."""
    filled = {}
    for name in ("records", "anthropic_records"):
        try:
            filled[name] = getattr(cfg, name).for_context(context)
        except ConfigError as error:
            raise error.under(name) from None
    return dataclasses.replace(cfg, **filled)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_interpretability(cfg: InterpConfig) -> dict:
    """Validate everything cheap first (checkpoint, layers, features, corpus, output lock), then run the job."""
    from crate.tracking import resolve_locations

    return InterpretabilityJob(resolve_locations(cfg)).run()
