from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from crate.tracking.config import TrackingConfig
from crate.tracking.locations import describe_run, resolve_artifact_root, resolve_tracking_uri

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
# MLflow accepts alphanumerics, _ - . space : / in metric and param names; anything else fails the whole batch.
_NOT_ALLOWED_IN_NAMES = re.compile(r"[^\w\-. :/]")
# MLflow's UI tells model training from GenAI work by this experiment tag, and opens the latter on traces.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
RUN_NAME_TAG = "crate.run_name"  # one training run (its checkpoints): a new MLflow run for it supersedes a RUNNING one
SUPERSEDED_BY_TAG = "crate.superseded_by"  # on a run a restart left RUNNING and then marked KILLED
RESUMED_FROM_TAG = "crate.resumed_from_run_id"  # on a run recreated because the store had lost the one resumed
# MLflow's UI charts metric sections (the name up to its last `/`) in alphabetical order: the losses go first,
# the data counters after the model's own numbers.
CHART_NAMES = (("train/loss", "loss/train"), ("val/loss", "loss/val"), ("val/ppl", "loss/val_ppl"))
CHART_PREFIXES = (("data/share/", "mixture/"), ("data/stream/", "stream/"))


def metric_name(name: str) -> str:
    """`data/share/Gutenberg (PG-19)` -> `mixture/Gutenberg _PG-19_`: the name MLflow shows (losses first in its
    charts), with the characters MLflow rejects replaced."""
    name = dict(CHART_NAMES).get(name, name)
    for prefix, chart in CHART_PREFIXES:
        if name.startswith(prefix):
            name = chart + name.removeprefix(prefix)
    return _NOT_ALLOWED_IN_NAMES.sub("_", name)


def _bound_http_retries(timeout_s: float) -> None:
    # MLflow retries a failing request 7 times with backoff and waits 120 s per try by default: minutes of a
    # stalled training loop. Bound both unless the user chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))


def _server_reachable(uri: str, timeout_s: float) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False


class Tracker:
    """One MLflow run. Every call is a no-op once tracking is disabled or has failed too often."""

    def __init__(self, config: TrackingConfig, client: Any = None, run_id: str | None = None, uri: str | None = None,
                 experiment_id: str | None = None, logged_steps: Mapping[str, int] | None = None):
        self.config = config
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.experiment_id = experiment_id
        self._logged_steps = dict(logged_steps or {})  # metric -> last step already in the run (a resumed run)
        self._failures = 0
        self._switched_off = False  # too many failures; run_id stays known so a resumed job reopens the run
        self._monitor = None

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._switched_off

    @classmethod
    def start(cls, config: TrackingConfig, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
              resume_run_id: str | None = None, skip_logged_steps: bool = False) -> "Tracker":
        """Open (or reopen, with `resume_run_id`) a run; on any failure return an inactive tracker and say so.

        With `skip_logged_steps` (a training history that a resume replays from its last checkpoint) a resumed run
        keeps one value per step: points at or before a metric's last logged step are not logged again. A run the store no longer has is recreated, tagged with the old id. With a `crate.run_name`
        tag, a run of that name a restart left RUNNING is marked KILLED and tagged with the run that replaces it."""
        if not config.enabled:
            return cls(config)
        uri = resolve_tracking_uri(config.uri)
        _bound_http_retries(config.request_timeout_s)
        if not _server_reachable(uri, config.request_timeout_s):
            log.warning("MLflow tracking server %s is unreachable: the job goes on without tracking", uri)
            return cls(config)
        tags = dict(tags or {})
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            experiment_id = cls._experiment_id(client, config, uri)
            resumed = cls._reopen(client, resume_run_id, tags) if resume_run_id else None
            run_id = resumed or cls._create_run(client, experiment_id, run_name, tags, parent_run_id)
            logged = cls._logged_steps_of(client, run_id) if resumed and skip_logged_steps else {}
            cls._supersede_orphans(client, experiment_id, tags.get(RUN_NAME_TAG), run_id)
        except Exception as error:  # noqa: BLE001 - tracking must never take the job down
            log.warning("MLflow run could not be opened at %s (%s): the job goes on without tracking", uri, error)
            return cls(config)
        tracker = cls(config, client, run_id, uri, experiment_id, logged)
        if params and not resumed:
            tracker.log_params(params)
        if config.system_metrics:
            tracker._start_system_metrics(uri, resumed=bool(resumed))
        log.info("MLflow run %s (%s) at %s", run_name, run_id, uri)
        return tracker

    @staticmethod
    def _experiment_id(client, config: TrackingConfig, uri: str) -> str:
        experiment = client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            if EXPERIMENT_KIND[0] not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
            return experiment.experiment_id
        try:
            return client.create_experiment(config.experiment, tags=dict([EXPERIMENT_KIND]),
                                            artifact_location=resolve_artifact_root(uri, config.artifact_root))
        except Exception:  # created concurrently by another process (sweep trials)
            return client.get_experiment_by_name(config.experiment).experiment_id

    @staticmethod
    def _reopen(client, run_id: str, tags: dict[str, str]) -> str | None:
        """The run to resume, RUNNING again; None (and a link tag for the new run) when the store lost it."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s is not in the store any more: a new run continues it (tag %s)",
                        run_id, RESUMED_FROM_TAG)
            tags[RESUMED_FROM_TAG] = run_id
            return None
        client.update_run(run_id, status="RUNNING")
        return run_id

    @staticmethod
    def _create_run(client, experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None) -> str:
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    @staticmethod
    def _logged_steps_of(client, run_id: str) -> dict[str, int]:
        run = client.get_run(run_id)
        return {key: max(m.step for m in client.get_metric_history(run_id, key))
                for key in run.data.metrics if not key.startswith("system/")}

    @staticmethod
    def _supersede_orphans(client, experiment_id: str, name: str | None, run_id: str) -> None:
        """Runs of the same training run that a restart left RUNNING: KILLED, pointing at the one that goes on."""
        if not name:
            return
        for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            if run.info.run_id != run_id and run.data.tags.get(RUN_NAME_TAG) == name:
                client.set_tag(run.info.run_id, SUPERSEDED_BY_TAG, run_id)
                client.set_terminated(run.info.run_id, "KILLED")
                log.info("MLflow run %s of %s was left RUNNING by a restart: KILLED, superseded by %s",
                         run.info.run_id, name, run_id)

    def describe(self) -> str:
        """Where the run is and how to open it (empty when there is no run)."""
        if self.run_id is None or self.uri is None:
            return ""
        return describe_run(self.run_id, self.experiment_id, self.uri,
                            resolve_artifact_root(self.uri, self.config.artifact_root))

    def _start_system_metrics(self, uri: str, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=uri)
            self._monitor.start()
        except Exception as error:  # noqa: BLE001
            log.warning("system metrics are off: %s", error)

    # ----------------------------------------------------------------------------------------------
    def _call(self, what: str, action) -> None:
        """Run one MLflow call; failures are counted and reported, never raised."""
        if not self.active:
            return
        try:
            action()
            self._failures = 0
        except Exception as error:  # noqa: BLE001
            self._failures += 1
            log.warning("MLflow %s failed (%s)", what, error)
            if self._failures >= self.config.max_consecutive_failures:
                log.warning("MLflow failed %d times in a row: tracking is off for the rest of this job",
                            self._failures)
                self._switched_off = True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        names = {metric_name(k): v for k, v in metrics.items() if v is not None}
        batch = [Metric(k, float(v), now, step) for k, v in names.items() if step > self._logged_steps.get(k, -1)]
        if not batch:
            return
        self._call("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(metric_name(k), str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            chunk = items[start:start + 100]
            self._call("log_params", lambda: self.client.log_batch(self.run_id, params=chunk))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set_tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        def upload():
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

        self._call(f"log_artifact {path}", upload)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"log_text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._call(f"log_figure {artifact_file}", lambda: self.client.log_figure(self.run_id, figure, artifact_file))

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as error:  # noqa: BLE001
                log.warning("system metrics did not stop cleanly: %s", error)
            self._monitor = None
        self._call("end", lambda: self.client.set_terminated(self.run_id, status))
        if self.run_id is not None and self.uri is not None:
            log.info(self.describe())
