"""What a sweep must remember to be resumed: its id, its MLflow parent run and the config it started with,
kept in `crate-sweep.json` next to the Tune experiment (local path or any storage URI pyarrow reads)."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

from crate.config import flatten
from crate.errors import ConfigError

STATE_FILE = "crate-sweep.json"
# A resumed sweep may run on a cluster of another size; everything else defines the experiment.
MAY_CHANGE_ON_RESUME = ("cluster_cpus", "cluster_gpus")


@dataclass
class SweepState:
    sweep_id: str
    parent_run_id: str | None
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
        return SweepState(**json.loads(stream.read()))


def write_state(experiment: str, state: SweepState) -> None:
    """Written whole or not at all: a temporary file, then a rename."""
    filesystem, root = _filesystem(experiment)
    filesystem.create_dir(root, recursive=True)
    staging = posixpath.join(root, f".{STATE_FILE}.tmp")
    with filesystem.open_output_stream(staging) as stream:
        stream.write(json.dumps(asdict(state), indent=2).encode())
    filesystem.move(staging, posixpath.join(root, STATE_FILE))


def check_same_config(saved: dict[str, Any], current: dict[str, Any], name: str) -> None:
    """A resumed sweep must be the experiment it continues: ConfigError listing the fields that differ."""
    before, after = flatten(saved), flatten(json.loads(json.dumps(current)))
    changed = sorted(key for key in before.keys() | after.keys()
                     if before.get(key) != after.get(key) and key not in MAY_CHANGE_ON_RESUME)
    if changed:
        shown = "; ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed[:5])
        raise ConfigError("resume", f"sweep {name!r} started with another config ({shown}"
                                    f"{'; ...' if len(changed) > 5 else ''}); resume it with the same config")
