"""Training checkpoints: everything needed to continue a run exactly, plus a plain model file.

A checkpoint directory holds
- the engine state (`engine.pt` for the torch engine; DeepSpeed's sharded `engine/` under ZeRO);
- `data_state_rank{r}.json` and `rng_rank{r}.pt` for every rank (the stream position, block-exact);
- `trainer_state.json`: step, tokens seen, the last loss, world size, engine, ZeRO stage, MLflow run id, loss
  history and the run's config;
- `mlflow_runs.json`: the MLflow run a resume from it reopens (`{"train": run id}`, crate.tracking.job);
- `model.pt`: config + fp32 weights, readable with `crate.model.load_model` without DeepSpeed;
- `manifest_rank{r}.json` for every rank, written after all of that rank's files: each file's size and sha256.

A checkpoint is complete when every rank's manifest is there and every file it lists has that size and hash; a
torn one (a disk filled up, a node died mid-write) or a damaged one (bit rot, a truncated copy) is never resumed
from: `newest_complete` takes the newest that verifies and says which it skipped and why. Checkpoints written
before manifests existed do not verify either. A checkpoint is written only with a finite model and loss.

Resuming with the same engine, ZeRO stage and world size restores everything. Otherwise (a different number
of workers under DeepSpeed, say) the run continues from `model.pt` and the trainer state, with fresh optimizer
moments, and the data stream is re-partitioned deterministically (`crate.data.resume_states`). Only the fields
in `crate.train.config.RESUMABLE_CHANGES` may differ from the checkpoint's config.

Our own files load as data (`torch.load(weights_only=True)`): a file holding pickled objects is refused. DeepSpeed
loads its `engine/` files by unpickling them (see docs/training.md: who can write the storage can run code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from crate.config import flatten, to_dict
from crate.data import resume_states
from crate.errors import CheckpointError, ConfigError
from crate.files import write_atomic
from crate.model.checkpoint import first_line, load_data, save_weights
from crate.model.config import ModelConfig
from crate.tracking.job import read_run_ids, record_run_id
from crate.train.config import PretrainConfig, resumable
from crate.train.errors import TrainingDiverged
from crate.train.evaluate import all_reduce

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.pt"
MANIFEST = "manifest_rank{rank}.json"
MANIFEST_FORMAT = "crate-lm-checkpoint-manifest"
RUN_SCOPE = "train"  # the training run's key in a checkpoint's mlflow_runs.json


def write_checkpoint(directory: Path, engine, rank: int, world_size: int, trainer_state: dict[str, Any],
                     data_state: dict[str, Any], model_config: ModelConfig) -> None:
    """Every rank calls this (DeepSpeed saving and ZeRO-3 gathering are collectives). A non-finite model or loss
    raises `TrainingDiverged` on every rank before anything is written."""
    full_state = engine.full_state_dict()
    bad = []
    if rank == 0:
        loss = trainer_state.get("loss")
        if loss is not None and not math.isfinite(loss):
            bad.append(f"loss {loss}")
        bad += [name for name, value in full_state.items() if value.is_floating_point()
                and not torch.isfinite(value).all()]
    if all_reduce(torch.tensor(float(len(bad)), device=engine.device)).item() > 0:
        raise TrainingDiverged(trainer_state["step"], "the model has non-finite parameters"
                               + (f" ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})" if bad else ""))
    engine.save(directory, rank)
    (directory / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        state = {**trainer_state, "world_size": world_size}
        save_weights(model_config, full_state, directory / MODEL_FILE, step=state["step"],
                     tokens_seen=state["tokens_seen"], mlflow_run_id=state.get("mlflow_run_id"),
                     run_name=state.get("run_name"))
        (directory / TRAINER_STATE).write_text(json.dumps(state))
        if state.get("mlflow_run_id"):  # the run a resume from this checkpoint reopens (crate.tracking.job)
            record_run_id(str(directory), RUN_SCOPE, state["mlflow_run_id"])
    _write_manifest(directory, rank, world_size, trainer_state["step"])


def checkpoint_run_id(directory: Path, trainer_state: dict[str, Any]) -> str | None:
    """The MLflow run a resume from `directory` reopens: its `mlflow_runs.json`, else (a checkpoint written before
    that file) the trainer state's `mlflow_run_id`."""
    return read_run_ids(str(directory)).get(RUN_SCOPE) or trainer_state.get("mlflow_run_id")


def _write_manifest(directory: Path, rank: int, world_size: int, step: int) -> None:
    """The rank's files (under Ray each rank writes into a directory of its own; Ray merges them) with their
    sizes and hashes; written last, and atomically, so its presence marks the rank's part complete."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if not name.startswith("manifest_rank"):
            files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "rank": rank, "world_size": world_size, "step": step,
                "files": files}
    write_atomic(directory / MANIFEST.format(rank=rank), json.dumps(manifest, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path.name} is unreadable or truncated ({error})") from None


def verify(directory: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint whose files all match their manifests; else CheckpointError
    naming the first file that does not."""
    first = directory / MANIFEST.format(rank=0)
    if not first.exists():
        raise CheckpointError(f"{first.name} is missing: the checkpoint is incomplete (torn while being written) "
                              f"or older than checkpoint manifests")
    world_size = _read_json(first).get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{first.name} names no world size")
    manifests = [_read_json(directory / MANIFEST.format(rank=r)) for r in range(world_size)]
    for r, manifest in enumerate(manifests):
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{MANIFEST.format(rank=r)} is not a checkpoint manifest")
    listed = [(name, entry) for manifest in manifests for name, entry in manifest["files"].items()]
    for name, entry in listed:  # sizes first: a missing or cut file is found without reading the others
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{name} has {path.stat().st_size:,} bytes, its manifest says {entry['bytes']:,} "
                                  f"(truncated or torn)")
    for name, entry in listed:
        if _sha256(directory / name) != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in the manifest (the file is damaged)")
    if TRAINER_STATE not in manifests[0]["files"]:
        raise CheckpointError(f"{TRAINER_STATE} is not in {first.name}")
    return _read_json(directory / TRAINER_STATE)


def newest_complete(candidates: Iterable[Path]) -> Path | None:
    """The first of `candidates` (newest first) that verifies; the others are skipped with a warning saying why.
    None when there are no candidates; CheckpointError when there are some and none verifies."""
    skipped = []
    for directory in candidates:
        try:
            verify(directory)
            return directory
        except CheckpointError as error:
            log.warning("skipping checkpoint %s: %s", directory, error.message)
            skipped.append(f"{directory.name}: {error.message}")
    if skipped:
        raise CheckpointError("no complete, verified checkpoint to resume from (" + "; ".join(skipped) + "); to "
                              "start over, move these away or give the run a new train.run_name")
    return None


def is_marked_complete(directory: Path) -> bool:
    """Cheap: rank 0's manifest is there (rotation uses it; resuming verifies every file)."""
    return (directory / MANIFEST.format(rank=0)).exists()


@dataclass
class Resume:
    """What a checkpoint gives a restarting worker."""

    directory: Path
    trainer_state: dict[str, Any]
    data_state: dict[str, Any]
    full_engine_state: bool  # False: weights only (optimizer moments start afresh)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # allowed config changes: old, new

    @property
    def step(self) -> int:
        return self.trainer_state["step"]


def plan_resume(directory: Path | None, cfg: PretrainConfig, rank: int, world_size: int) -> Resume | None:
    """`directory` is a verified checkpoint (`newest_complete`)."""
    if directory is None:
        return None
    train = cfg.train
    trainer_state = _read_json(directory / TRAINER_STATE)
    changes = config_changes(trainer_state, cfg, directory)
    saved_world = trainer_state["world_size"]
    saved_states = [_read_json(directory / f"data_state_rank{r}.json") for r in range(saved_world)]
    data_state = resume_states(saved_states, world_size)[rank]
    same_layout = (trainer_state["engine"] == train.engine
                   and (train.engine == "torch" or (trainer_state["zero_stage"] == train.zero_stage
                                                    and saved_world == world_size)))
    if not same_layout and rank == 0:
        log.warning("checkpoint was written by %s (ZeRO %s) on %d workers, this run is %s (ZeRO %s) on %d: "
                    "continuing from its weights with fresh optimizer moments",
                    trainer_state["engine"], trainer_state["zero_stage"], saved_world, train.engine,
                    train.zero_stage, world_size)
    return Resume(directory, trainer_state, data_state, full_engine_state=same_layout, changes=changes)


def config_changes(trainer_state: dict[str, Any], cfg: PretrainConfig, directory: Path) -> dict[str, tuple[Any, Any]]:
    """The fields that differ from the checkpoint's config: those in RESUMABLE_CHANGES are returned, any other
    is a ConfigError listing them all."""
    saved = flatten(trainer_state["config"])
    new = flatten(json.loads(json.dumps(to_dict(cfg))))  # as the checkpoint holds it (tuples become lists)
    changed = {name: (saved[name], new[name]) for name in sorted(saved.keys() & new.keys()) if saved[name] != new[name]}
    refused = [name for name in changed if not resumable(name)]
    if refused:
        listed = ", ".join(f"{name} {changed[name][0]!r} -> {changed[name][1]!r}" for name in refused)
        raise ConfigError(", ".join(refused),
                          f"differs from the config of run {trainer_state.get('run_name')!r} that this job would "
                          f"resume from {directory.name} ({listed}); a resumed run may change only its step budget, "
                          f"intervals and workers: to train with these values, start a new run (a new "
                          f"train.run_name)")
    return changed


def load_weights_into(model: torch.nn.Module, resume: Resume) -> None:
    model.load_state_dict(load_data(resume.directory / MODEL_FILE)["model"])


def restore_engine(engine, resume: Resume, rank: int) -> None:
    try:
        engine.load(resume.directory)
    except Exception as error:  # noqa: BLE001 - whatever the engine raised, say which checkpoint and files
        files = "engine.pt" if engine.kind == "torch" else "engine/"
        raise CheckpointError(f"{resume.directory / files}: the {engine.kind} engine state could not be loaded "
                              f"({type(error).__name__}: {first_line(error)})") from error
    rng_file = resume.directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(load_data(rng_file))


def _rng_state() -> dict[str, Any]:
    """Plain data and tensors only, so the file loads with weights_only=True."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {"python": [version, list(python_state), gauss], "torch": torch.get_rng_state(),
             "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def last_validation_loss(model_file: str | None) -> float | None:
    """The last validation loss in the trainer state the pretraining job saves beside `model_file` (None for a
    model file without one, e.g. a remote or released checkpoint)."""
    state_file = Path(model_file).parent / TRAINER_STATE if model_file else None
    if state_file is None or not state_file.is_file():
        return None
    evaluations = json.loads(state_file.read_text()).get("history", {}).get("val") or []
    return float(evaluations[-1][1]) if evaluations else None
