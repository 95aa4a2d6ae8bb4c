from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from crate.tracking.config import TrackingConfig

log = logging.getLogger(__name__)

LOCAL_STORE = "mlruns"  # the embedded default store, inside the working directory
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
# MLflow accepts alphanumerics, _ - . space : / in metric and param names; anything else fails the whole batch.
_NOT_ALLOWED_IN_NAMES = re.compile(r"[^\w\-. :/]")


def metric_name(name: str) -> str:
    """`data/share/Gutenberg (PG-19)` -> `data/share/Gutenberg _PG-19_`: a name MLflow accepts."""
    return _NOT_ALLOWED_IN_NAMES.sub("_", name)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns (created on demand)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path.cwd() / LOCAL_STORE
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


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

    def __init__(self, config: TrackingConfig, client: Any = None, run_id: str | None = None):
        self.config = config
        self.client = client
        self.run_id = run_id
        self._failures = 0
        self._switched_off = False  # too many failures; run_id stays known so a resumed job reopens the run
        self._monitor = None

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._switched_off

    @classmethod
    def start(cls, config: TrackingConfig, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
              resume_run_id: str | None = None) -> "Tracker":
        """Open (or reopen, with `resume_run_id`) a run; on any failure return an inactive tracker and say so."""
        if not config.enabled:
            return cls(config)
        uri = resolve_tracking_uri(config.uri)
        _bound_http_retries(config.request_timeout_s)
        if not _server_reachable(uri, config.request_timeout_s):
            log.warning("MLflow tracking server %s is unreachable: the job goes on without tracking", uri)
            return cls(config)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            experiment_id = cls._experiment_id(client, config.experiment, uri)
            run_id = cls._open_run(client, experiment_id, run_name, dict(tags or {}), parent_run_id, resume_run_id)
        except Exception as error:  # noqa: BLE001 - tracking must never take the job down
            log.warning("MLflow run could not be opened at %s (%s): the job goes on without tracking", uri, error)
            return cls(config)
        tracker = cls(config, client, run_id)
        if params and not resume_run_id:
            tracker.log_params(params)
        if config.system_metrics:
            tracker._start_system_metrics(uri, resumed=bool(resume_run_id))
        log.info("MLflow run %s (%s) at %s", run_name, run_id, uri)
        return tracker

    @staticmethod
    def _experiment_id(client, name: str, uri: str) -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = None
        if uri.startswith("sqlite:///") and uri.endswith(f"{LOCAL_STORE}/mlflow.db"):
            artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created concurrently by another process (sweep trials)
            return client.get_experiment_by_name(name).experiment_id

    @staticmethod
    def _open_run(client, experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None,
                  resume_run_id: str | None) -> str:
        if resume_run_id:
            client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

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
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if v is not None]
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
