"""Where a job's outputs go, decided once, on the driver, against the directory the user launched from.

Ray Train and Tune start their workers inside Ray's own folders (`/tmp/ray/session_*/artifacts/<run>/...`), so any
location left relative, or left to a default that reads the working directory, means something else there. Every
job therefore resolves its locations before it hands its config to a worker or an actor:

- the tracking store: `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<launch dir>/mlruns/mlflow.db`;
  a relative SQLite or file store becomes absolute;
- the artifact root of the experiments the job creates: `tracking.artifact_root`, else `artifacts/` beside a
  local SQLite store (never MLflow's own default, `./mlruns` under whatever the working directory is), else the
  tracking server's default;
- paths in the config (`train.storage_path`, `data.train`/`data.val`, `output_dir`): absolute; URIs pass through.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any, TypeVar

LOCAL_STORE = "mlruns"  # the embedded default store, inside the launch directory
STORE_FILE = "mlflow.db"
ARTIFACTS = "artifacts"  # beside a local SQLite store
UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

T = TypeVar("T")


def absolute_location(location: str, base: str | os.PathLike | None = None) -> str:
    """A URI (`s3://`, `stdlib://`, ...) passes through; a path becomes absolute against `base` (default: cwd)."""
    if "://" in location:
        return location
    path = Path(location).expanduser()
    return os.path.normpath(path if path.is_absolute() else Path(os.path.abspath(base or os.getcwd())) / path)


def resolve_tracking_uri(uri: str | None = None, base: str | os.PathLike | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in `<base>/mlruns` (created on demand).
    Local stores come back absolute: `sqlite:////abs/path/mlflow.db`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = Path(absolute_location(LOCAL_STORE, base))
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / STORE_FILE}"
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{absolute_location(path, base)}"
    if uri.startswith("file:"):
        path = uri.removeprefix("file://") if uri.startswith("file://") else uri.removeprefix("file:")
        return Path(absolute_location(path, base)).as_uri()
    if uri.startswith(("/", ".", "~")):
        return absolute_location(uri, base)
    return uri


def local_store(uri: str) -> Path | None:
    """The database file of a local SQLite store, else None (a server, a database server)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:////") else None


def resolve_artifact_root(uri: str, artifact_root: str | None = None,
                          base: str | os.PathLike | None = None) -> str | None:
    """Where experiments created in the store `uri` keep their artifacts: the configured root (made absolute),
    else `artifacts/` beside a local SQLite store, else None (the tracking server decides)."""
    if artifact_root:
        return artifact_root if "://" in artifact_root else Path(absolute_location(artifact_root, base)).as_uri()
    store = local_store(uri)
    return (store.parent / ARTIFACTS).as_uri() if store is not None else None


def resolve_locations(config: T, base: str | os.PathLike | None = None) -> T:
    """A copy of a job's config with every location resolved against `base` (default: the working directory):
    its `tracking` section (store and artifact root), `train.storage_path`, `data.train`/`data.val`, and any
    `output_dir` that is set. Run it on the driver, before a worker or an actor sees the config."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "tracking" and dataclasses.is_dataclass(value) and getattr(value, "enabled", False):
            tracking_uri = resolve_tracking_uri(value.uri, base)
            changes[f.name] = dataclasses.replace(
                value, uri=tracking_uri, artifact_root=resolve_artifact_root(tracking_uri, value.artifact_root, base))
        elif f.name == "train" and dataclasses.is_dataclass(value) and hasattr(value, "storage_path"):
            changes[f.name] = dataclasses.replace(value, storage_path=absolute_location(value.storage_path, base))
        elif f.name == "data" and dataclasses.is_dataclass(value) and hasattr(value, "train"):
            changes[f.name] = dataclasses.replace(value, train=absolute_location(value.train, base),
                                                  val=absolute_location(value.val, base))
        elif f.name == "output_dir" and isinstance(value, str) and value:
            changes[f.name] = absolute_location(value, base)
    return dataclasses.replace(config, **changes) if changes else config


def open_command(uri: str, artifact_root: str | None = None) -> str:
    """The command that shows the store `uri` in MLflow's UI (a server's URL needs no command: it is the UI)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    command = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    if artifact_root:
        root = artifact_root.removeprefix("file://") if artifact_root.startswith("file:///") else artifact_root
        command += f" --default-artifact-root {shlex.quote(root)}"
    return command


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or on the `mlflow ui` that `open_command` starts."""
    server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL
    return f"{server}/#/experiments/{experiment_id}/runs/{run_id}"


def describe_run(run_id: str, experiment_id: str | None, uri: str, artifact_root: str | None = None) -> str:
    """`MLflow run <id> in <store>: <url>` and, for a local store, the command that opens it."""
    url = f": {run_url(uri, experiment_id, run_id)}" if experiment_id else ""
    line = f"MLflow run {run_id} in {uri}{url}"
    return line if uri.startswith(("http://", "https://")) else f"{line}\n  open it with: {open_command(uri, artifact_root)}"
