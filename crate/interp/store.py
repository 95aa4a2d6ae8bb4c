"""The results table of an output directory, written so that a killed job loses nothing and repeats nothing.

Every finished feature's rows are appended at once to `results.wal.jsonl` (one JSON line per row, flushed and
fsynced), and every `compact_every` rows the log is folded into `results.parquet` (atomic rename) and emptied.
On open, a torn last line (a kill mid-write) is cut off; any other line that cannot be read back as a row (garbage
from a bad disk or a hand edit) is moved to `results.quarantine.jsonl` (with its file and line number, counted in
`quarantined` and named in a warning) so the job resumes; then the done keys are read from both files. A key is
done when its row is finished ("scored" or "undefined"): such a row is never appended again. A "failed" row is
not done: a later job appends the key's new row, and the latest row per key is the table's (compaction keeps it),
so the table holds each key exactly once, finished rows never change, and a kill between compaction's rename and
the log's truncation leaves only identical copies.
One job writes a directory at a time (an exclusive lock on `results.lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from crate.errors import ConfigError
from crate.interp.schema import RESULT_KEY, RESULTS_SCHEMA, result_key, write_parquet

log = logging.getLogger(__name__)
RESULTS_FILE, LOG_FILE, LOCK_FILE = "results.parquet", "results.wal.jsonl", "results.lock"
QUARANTINE_FILE = "results.quarantine.jsonl"


class ResultStoreLocked(RuntimeError):
    pass


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None  # NaN scores are stored as null in the log and restored on read
    return value


def _readable(line: bytes) -> bool:
    """Whether a log line is a JSON row that fits RESULTS_SCHEMA."""
    try:
        row = json.loads(line)
        result_key(row)
        pa.Table.from_pylist([{**row, "score": float("nan") if row.get("score") is None else row["score"]}],
                             schema=RESULTS_SCHEMA)
    except (ValueError, KeyError, TypeError, pa.ArrowException):
        return False
    return True


class ResultStore:
    def __init__(self, directory: str | os.PathLike, provenance: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.provenance = provenance
        self._lock = open(self.directory / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ResultStoreLocked(f"another job is writing results in {self.directory}") from None
        self._repair_log()
        latest = {result_key(row): row["status"] for row in self._rows()}
        self.done = {key for key, status in latest.items() if status != "failed"}  # failed keys are retried
        self._log = open(self.directory / LOG_FILE, "a", encoding="utf-8")
        self._unfolded = sum(1 for _ in self._log_rows())

    @property
    def results_path(self) -> Path:
        return self.directory / RESULTS_FILE

    @property
    def quarantined(self) -> int:
        """Unreadable log lines kept aside in QUARANTINE_FILE (by this and earlier opens)."""
        path = self.directory / QUARANTINE_FILE
        return sum(1 for _ in open(path, "rb")) if path.is_file() else 0

    def _repair_log(self) -> None:
        path = self.directory / LOG_FILE
        if not path.is_file():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("dropping a torn last line (%d bytes) of %s", len(data) - end, path)
            with open(path, "r+b") as f:
                f.truncate(end)
        kept, bad = [], []
        for number, line in enumerate(data[:end].splitlines(keepends=True), start=1):
            (kept if _readable(line) else bad).append((number, line))
        if not bad:
            return
        with open(self.directory / QUARANTINE_FILE, "a", encoding="utf-8") as quarantine:
            for number, line in bad:
                quarantine.write(json.dumps({"file": LOG_FILE, "line": number,
                                             "text": line.rstrip(b"\n").decode("utf-8", "backslashreplace")}) + "\n")
                log.warning("%s:%d is not a readable result row; moved to %s", path, number, QUARANTINE_FILE)
            quarantine.flush()
            os.fsync(quarantine.fileno())
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(b"".join(line for _, line in kept))
        os.replace(tmp, path)

    def _log_rows(self) -> Iterable[dict]:
        path = self.directory / LOG_FILE
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)

    def _rows(self) -> Iterable[dict]:
        if self.results_path.is_file():
            missing = sorted(set(RESULT_KEY) - set(pq.read_schema(self.results_path).names))
            if missing:
                raise ConfigError("output_dir", f"{self.results_path} is a results table of an earlier schema (no "
                                                f"{', '.join(missing)}); give another --output (jobs/compare.py still "
                                                f"reads it)")
            yield from pq.read_table(self.results_path, columns=[*RESULT_KEY, "status"]).to_pylist()
        yield from self._log_rows()

    def append(self, rows: Iterable[dict]) -> int:
        """Append the rows whose key is not done (new, or failed before); returns how many were written."""
        written = 0
        for row in rows:
            key = result_key(row)
            if key in self.done:
                continue
            self._log.write(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n")
            if row["status"] != "failed":
                self.done.add(key)
            written += 1
        if written:
            self._log.flush()
            os.fsync(self._log.fileno())
            self._unfolded += written
        return written

    def table(self) -> pa.Table:
        """All rows (parquet + log), the latest row per key."""
        parts = []
        if self.results_path.is_file():
            parts.append(pq.read_table(self.results_path))
        rows = list(self._log_rows())
        if rows:
            for row in rows:
                row["score"] = float("nan") if row.get("score") is None else row["score"]
            parts.append(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
        if not parts:
            return RESULTS_SCHEMA.empty_table()
        table = pa.concat_tables([p.cast(RESULTS_SCHEMA) for p in parts])
        keys = [result_key(r) for r in table.select(list(RESULT_KEY)).to_pylist()]
        latest = {key: i for i, key in enumerate(keys)}
        return table.take(sorted(latest.values())) if len(latest) < len(keys) else table

    def compact(self) -> Path:
        """Fold the log into results.parquet (atomic), then empty the log."""
        write_parquet(self.table(), self.results_path, RESULTS_SCHEMA, self.provenance)
        self._log.truncate(0)
        self._log.seek(0)
        os.fsync(self._log.fileno())
        self._unfolded = 0
        return self.results_path

    @property
    def unfolded(self) -> int:
        """Rows in the log since the last compaction."""
        return self._unfolded

    def close(self) -> None:
        self._log.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
