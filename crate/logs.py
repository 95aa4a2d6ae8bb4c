"""What a job prints: its own progress lines, one line per checkpoint and evaluation, and its final summary.

The libraries under it are chatty where people read: Ray Train dumps a ~1,400-character `TrainingReport(...)` at
every checkpoint, Ray logs an error-level `PreemptionWatcher ... max_restarts` line on every run, DeepSpeed says
`Setting accelerator to CPU` and announces its op build, MLflow announces its database tables. `configure` keeps
those out of the default output, in this process (a filter on the logging handlers and quieter library loggers)
and in every Ray worker whose lines Ray forwards to the driver (Ray's own skip pattern, read when Ray is
imported). `CRATE_VERBOSE=1` shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys

VERBOSE_ENV = "CRATE_VERBOSE"
RAY_SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"  # lines of Ray workers matching it are not printed by the driver
# Lines that say nothing a user acts on, from the libraries below the jobs (matched anywhere in a line).
NOISE = (
    r"Reporting training result \d+: TrainingReport",  # Ray Train, at every report
    r"PreemptionWatcher.*max_restarts",  # Ray Train, an error-level line on every run (harmless)
    r"Setting accelerator to CPU",  # DeepSpeed on CPU hosts
    r"Setting ds_accelerator to",
    r"DeepSpeed \S+ built successfully",  # DeepSpeed's op build, printed twice
    r"Using \S+ as PyTorch extensions root",  # DeepSpeed's op build, announced by torch once per process
    r"Loading extension module \w+",
    r"Time to load \w+ op: ",
    r"Requesting resources: \{",  # Ray Train's controller, before every worker group
    r"Setting up process group for: ",  # Ray Train's workers
    r"Starting execution of Dataset ",  # Ray Data, per pipeline (every rank, every evaluation)
    r"Execution plan of Dataset ",
    r"Progress bars disabled\. To enable",
    r"Dataset \S+ execution finished in ",
    r"Checkpoint successfully created at: Checkpoint\(",  # Ray Train; the job prints its own checkpoint line
    r"Skip logging GPU metrics",  # MLflow's system-metrics monitor
    r"(Started|Stopping) monitoring system metrics|Successfully terminated system metrics monitoring",
    r"Creating initial MLflow database tables",  # MLflow, on a new SQLite store
    r"Updating database tables",
    r"Context impl SQLiteImpl",  # alembic, under MLflow
    r"Will assume non-transactional DDL",
)
# Library loggers whose INFO lines are bookkeeping; their warnings still show.
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration", "DeepSpeed",
                 "deepspeed", "torch.utils.cpp_extension")
NOISE_RE = re.compile("|".join(NOISE))


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not NOISE_RE.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to drop
            return True


def configure(level: int = logging.INFO, verbose: bool | None = None) -> None:
    """Set up a job's logging (call it first thing in the job's entry point, before Ray is imported)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose if verbose is not None else verbose_requested():
        return
    os.environ.setdefault(RAY_SKIP_ENV, NOISE_RE.pattern)
    deduplicators = sys.modules.get("ray._private.ray_logging")
    if deduplicators is not None:  # Ray came first: it read its pattern already
        for name in ("stdout_deduplicator", "stderr_deduplicator"):
            getattr(deduplicators, name).skip_re = re.compile(os.environ[RAY_SKIP_ENV])
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, NoiseFilter) for f in handler.filters):
            handler.addFilter(NoiseFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
