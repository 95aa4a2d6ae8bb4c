"""What a sweep must remember to be resumed: its id and the config it started with, kept in `crate-sweep.json`
next to the Tune experiment (local path or any storage URI pyarrow reads), and its MLflow parent run, kept beside
it the way every job keeps its run (`mlflow_runs.json`, crate.tracking.job; sweeps started before that file kept
it in `crate-sweep.json`)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from crate.config import flatten
from crate.errors import ConfigError
from crate.files import write_atomic
from crate.tracking.job import read_run_ids
from crate.tracking.locations import absolute_location

STATE_FILE = "crate-sweep.json"
# A resumed sweep may run on a cluster of another size; everything else defines the experiment.
MAY_CHANGE_ON_RESUME = ("cluster_cpus", "cluster_gpus")


RUN_SCOPE = "sweep"  # the parent run's key in the experiment's mlflow_runs.json


@dataclass
class SweepState:
    sweep_id: str
    parent_run_id: str | None  # read from mlflow_runs.json (or an older crate-sweep.json), not written here
    config: dict[str, Any]  # the SweepConfig as started


def _filesystem(experiment: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(experiment)


def read_state(experiment: str) -> SweepState | None:
    import pyarrow.fs

    filesystem, root = _filesystem(experiment)
    path = posixpath.join(root, STATE_FILE)
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        saved = json.loads(stream.read())
    parent_run_id = read_run_ids(experiment).get(RUN_SCOPE) or saved.pop("parent_run_id", None)
    return SweepState(**{**saved, "parent_run_id": parent_run_id})


def write_state(experiment: str, state: SweepState) -> None:
    """Written whole or not at all (the parent run's id is the tracking layer's to keep)."""
    saved = {"sweep_id": state.sweep_id, "config": state.config}
    write_atomic(posixpath.join(absolute_location(experiment), STATE_FILE), json.dumps(saved, indent=2))


def check_same_config(saved: dict[str, Any], current: dict[str, Any], name: str) -> None:
    """A resumed sweep must be the experiment it continues: ConfigError listing the fields that differ."""
    before, after = flatten(saved), flatten(json.loads(json.dumps(current)))
    changed = sorted(key for key in before.keys() | after.keys()
                     if before.get(key) != after.get(key) and key not in MAY_CHANGE_ON_RESUME)
    if changed:
        shown = "; ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed[:5])
        raise ConfigError("resume", f"sweep {name!r} started with another config ({shown}"
                                    f"{'; ...' if len(changed) > 5 else ''}); resume it with the same config")
