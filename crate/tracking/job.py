"""One lifecycle for every job's tracked run: open (or reopen on resume), track, end FINISHED/FAILED/KILLED.

    with TrackedJob(config.tracking, "steer", run_name, config=config, location=out) as job:
        job.tracker.log_metrics({...}, step=0)
        ...   # an exception ends the run FAILED, Ctrl-C or SIGTERM KILLED, a clean exit FINISHED

- params: `job_params(config)`, the job's config flattened without its `tracking` section, plus the job's own;
- tags: `crate.job` (the job's kind) and `mlflow.source.git.commit` (the code version), plus the job's own;
- the run's identity: with a `location` (the job's output folder, a local path or a storage URI), the run id is
  kept in `mlflow_runs.json` there, keyed by the job's `scope` (one output folder may hold the runs of several
  scopes: the interpretability job keeps one per backend and protocol); a rerun with the same location and scope
  reopens that run. Jobs that must resume a folder written before this file existed pass the id they find in
  their old record as `legacy_run_id`;
- `resume=False`: a job that starts its work afresh opens a new run (and records it in place of the old one);
- `job.end("FAILED")` ends the run with another status on a clean exit (a job that decides it failed).
"""

from __future__ import annotations

import json
import logging
import posixpath
import signal
import threading
from typing import Any, Mapping

from crate.files import write_atomic
from crate.tracking.config import TrackingConfig
from crate.tracking.tracker import Tracker

log = logging.getLogger(__name__)

RUN_IDS_FILE = "mlflow_runs.json"  # {scope: MLflow run id}, in the job's output location
JOB_TAG = "crate.job"
COMMIT_TAG = "mlflow.source.git.commit"


class JobTerminated(KeyboardInterrupt):
    """SIGTERM reached a tracked job (a scheduler or `kill` stopped it): it ends as an interrupted job, KILLED."""


def job_params(config: Any, **extra: Any) -> dict[str, Any]:
    """The params of a job's run: its config flattened (`train.max_steps`), without the tracking settings."""
    from crate.config import flatten

    return {**{k: v for k, v in flatten(config).items() if not k.startswith("tracking.")}, **extra}


def _filesystem(location: str):
    import pyarrow.fs

    from crate.tracking.locations import absolute_location

    return pyarrow.fs.FileSystem.from_uri(absolute_location(str(location)))


def read_run_ids(location: str) -> dict[str, str]:
    """The {scope: run id} that jobs recorded in `location` ({} when none did)."""
    import pyarrow.fs

    filesystem, root = _filesystem(str(location))
    path = posixpath.join(root, RUN_IDS_FILE)
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return {}
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def record_run_id(location: str, scope: str, run_id: str) -> None:
    """Add `scope: run_id` to the location's run ids, atomically."""
    from crate.tracking.locations import absolute_location

    ids = {**read_run_ids(location), scope: run_id}
    write_atomic(posixpath.join(absolute_location(str(location)), RUN_IDS_FILE), json.dumps(ids, indent=1))


def _code_version() -> str:
    from crate.tracking.provenance import code_version

    return code_version()


class TrackedJob:
    """A job's MLflow run from open to end; `tracker` is the run (inactive when tracking is off or failed)."""

    def __init__(self, tracking: TrackingConfig, kind: str, run_name: str, *, config: Any = None,
                 params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
                 location: str | None = None, scope: str | None = None, resume: bool = True,
                 legacy_run_id: str | None = None, resume_run_id: str | None = None, parent_run_id: str | None = None, skip_logged_steps: bool = False,
                 code_version: str | None = None):
        self.tracking, self.kind = tracking, kind
        self.run_name = tracking.run_name or run_name
        self.params = {**(job_params(config) if config is not None else {}), **(params or {})}
        self.tags = dict(tags or {})
        self.location, self.scope = (str(location) if location is not None else None), scope or kind
        self.resume, self.legacy_run_id, self.resume_run_id = resume, legacy_run_id, resume_run_id
        self.parent_run_id, self.skip_logged_steps = parent_run_id, skip_logged_steps
        self.code_version = code_version
        self.tracker = Tracker(tracking)  # inactive until the job is entered
        self.status: str | None = None  # the status a clean exit ends with (default FINISHED)
        self._previous_sigterm = None

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def recorded_run_id(self) -> str | None:
        """The run this job's location names for its scope (or the legacy record's), which a rerun reopens;
        None for a job that starts afresh (`resume=False`)."""
        if not self.resume:
            return None
        if self.resume_run_id:
            return self.resume_run_id
        recorded = read_run_ids(self.location).get(self.scope) if self.location is not None else None
        return recorded or self.legacy_run_id

    def open(self) -> Tracker:
        tags = {JOB_TAG: self.kind, COMMIT_TAG: self.code_version or _code_version(), **self.tags}
        self.tracker = Tracker.start(self.tracking, self.run_name, params=self.params, tags=tags,
                                     parent_run_id=self.parent_run_id, resume_run_id=self.recorded_run_id(),
                                     skip_logged_steps=self.skip_logged_steps)
        if self.tracker.run_id and self.location is not None:
            record_run_id(self.location, self.scope, self.tracker.run_id)
        return self.tracker

    def end(self, status: str = "FINISHED") -> None:
        """End with `status` on a clean exit (FAILED: the job decided it failed)."""
        self.status = status

    def close(self, error: BaseException | None = None) -> None:
        """End the run: FINISHED (or the status `end` set), FAILED on an error, KILLED on an interrupt."""
        if error is None:
            status = self.status or "FINISHED"
        else:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.tracker.end(status)

    def __enter__(self) -> "TrackedJob":
        self._catch_sigterm()
        try:
            self.open()
        except BaseException:
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        try:
            self.close(error)
        finally:
            self._restore_sigterm()

    def _catch_sigterm(self) -> None:
        """SIGTERM raises JobTerminated in the main thread (Python's default would end the process with the run
        left RUNNING); in other threads (a Ray Train worker's loop) signals are not ours to take."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # someone (Ray, a server) handles it already

        def terminated(signum, frame):
            raise JobTerminated(f"signal {signum}")

        self._previous_sigterm = signal.signal(signal.SIGTERM, terminated)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
