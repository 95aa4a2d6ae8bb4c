"""Training checkpoints: everything needed to continue a run exactly, plus a plain model file.

A checkpoint directory holds
- the engine state (`engine.pt` for the torch engine; DeepSpeed's sharded `engine/` under ZeRO);
- `data_state_rank{r}.json` and `rng_rank{r}.pt` for every rank (the stream position, block-exact);
- `trainer_state.json`: step, tokens seen, world size, engine, ZeRO stage, MLflow run id, loss history;
- `model.pt`: config + fp32 weights, readable with `crate.model.load_model` without DeepSpeed.

Resuming with the same engine, ZeRO stage and world size restores everything. Otherwise (a different number
of workers under DeepSpeed, say) the run continues from `model.pt` and the trainer state, with fresh optimizer
moments, and the data stream is re-partitioned deterministically (`crate.data.resume_states`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crate.data import resume_states
from crate.model.checkpoint import read_checkpoint, save_weights
from crate.model.config import ModelConfig
from crate.train.config import TrainConfig

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.pt"


def write_checkpoint(directory: Path, engine, rank: int, world_size: int, trainer_state: dict[str, Any],
                     data_state: dict[str, Any], model_config: ModelConfig) -> None:
    """Every rank calls this (DeepSpeed saving and ZeRO-3 gathering are collectives)."""
    engine.save(directory, rank)
    (directory / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))
    torch.save(_rng_state(), directory / f"rng_rank{rank}.pt")
    full_state = engine.full_state_dict()
    if rank == 0:
        state = {**trainer_state, "world_size": world_size}
        save_weights(model_config, full_state, directory / MODEL_FILE, step=state["step"],
                     tokens_seen=state["tokens_seen"], mlflow_run_id=state.get("mlflow_run_id"),
                     run_name=state.get("run_name"))
        (directory / TRAINER_STATE).write_text(json.dumps(state))


@dataclass
class Resume:
    """What a checkpoint gives a restarting worker."""

    directory: Path
    trainer_state: dict[str, Any]
    data_state: dict[str, Any]
    full_engine_state: bool  # False: weights only (optimizer moments start afresh)

    @property
    def step(self) -> int:
        return self.trainer_state["step"]


def plan_resume(directory: Path | None, train: TrainConfig, rank: int, world_size: int) -> Resume | None:
    if directory is None:
        return None
    trainer_state = json.loads((directory / TRAINER_STATE).read_text())
    saved_world = trainer_state["world_size"]
    saved_states = [json.loads((directory / f"data_state_rank{r}.json").read_text()) for r in range(saved_world)]
    data_state = resume_states(saved_states, world_size)[rank]
    same_layout = (trainer_state["engine"] == train.engine
                   and (train.engine == "torch" or (trainer_state["zero_stage"] == train.zero_stage
                                                    and saved_world == world_size)))
    if not same_layout and rank == 0:
        log.warning("checkpoint was written by %s (ZeRO %s) on %d workers, this run is %s (ZeRO %s) on %d: "
                    "continuing from its weights with fresh optimizer moments",
                    trainer_state["engine"], trainer_state["zero_stage"], saved_world, train.engine,
                    train.zero_stage, world_size)
    return Resume(directory, trainer_state, data_state, full_engine_state=same_layout)


def load_weights_into(model: torch.nn.Module, resume: Resume) -> None:
    model.load_state_dict(read_checkpoint(resume.directory / MODEL_FILE)["model"])


def restore_engine(engine, resume: Resume, rank: int) -> None:
    engine.load(resume.directory)
    rng_file = resume.directory / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
