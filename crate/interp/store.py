"""The results table of an output directory, written so that a killed job loses nothing and repeats nothing.

Rows live in `results.sqlite` on the driver's local disk (the output directory): one row per result key (the
table's primary key), the row itself as one Arrow record batch of RESULTS_SCHEMA beside its status (the schema
is stored once; a database written under an older schema is brought to the current one when opened). SQLite runs in WAL mode with full synchronisation,
so every finished feature's rows are one committed transaction, durable when `append` returns, and a kill at any
moment leaves the last committed state; appending costs the rows written, whatever the table's size. Every
`compact_every` rows `compact` folds SQLite's write-ahead log into the database file and, when the store has a
`mirror` (the job's storage location, a folder or a storage URI), copies a consistent snapshot there, which a
job resumed on another machine starts from. `write_results` writes `results.parquet` once, when the job ends.

A key is done when its row is finished ("scored" or "undefined"): such a row is never written again. A "failed"
row is not done: a later job writes the key's new row over it, so the table holds each key exactly once and
finished rows never change.

Output directories written before this store kept rows in `results.wal.jsonl` (and `results.parquet`): on open,
those rows are taken into the database (a torn last line, a kill mid-write, is cut off; any other line that cannot
be read back as a row is moved to `results.quarantine.jsonl` with its file and line number, counted in
`quarantined` and named in a warning) and the log is emptied. One job writes a directory at a time (an exclusive
lock on `results.lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from crate.errors import ConfigError
from crate.files import replacing, write_atomic
from crate.interp.schema import RESULT_KEY, RESULTS_SCHEMA, result_key, write_parquet

log = logging.getLogger(__name__)
DATABASE_FILE, RESULTS_FILE, LOCK_FILE = "results.sqlite", "results.parquet", "results.lock"
LOG_FILE, QUARANTINE_FILE = "results.wal.jsonl", "results.quarantine.jsonl"  # the store before SQLite, read only
TABLES = ("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, status TEXT NOT NULL, row BLOB NOT NULL)",
          "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
# a finished row is never replaced; a failed one is, by the key's next row
UPSERT = ("INSERT INTO results (key, status, row) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
          "status = excluded.status, row = excluded.row WHERE results.status = 'failed'")


class ResultStoreLocked(RuntimeError):
    pass


def _key_text(row: dict) -> str:
    return json.dumps(result_key(row))


def _as_table(rows: list[dict]) -> pa.Table:
    rows = [{**row, "score": float("nan") if row.get("score") is None else row["score"]} for row in rows]
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)  # a score is NaN, never null


def _values(rows: list[dict]) -> list[tuple[str, str, bytes]]:
    """(key, status, the row as a one-row Arrow record batch) per row."""
    if not rows:
        return []
    batch = _as_table(rows).combine_chunks().to_batches()[0]
    return [(_key_text(row), row["status"], batch.slice(i, 1).serialize().to_pybytes()) for i, row in enumerate(rows)]


def _check_key_columns(columns: list[str], path: Path) -> None:
    """Rows of an earlier schema without every key column cannot be told apart: refuse the folder."""
    missing = sorted(set(RESULT_KEY) - set(columns))
    if missing:
        raise ConfigError("output_dir", f"{path} is a results table of an earlier schema (no {', '.join(missing)}); "
                                        f"give another --output (jobs/compare.py still reads it)")


def _conform(table: pa.Table) -> pa.Table:
    """`table` in RESULTS_SCHEMA: its columns in the schema's order, a column it lacks null."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in RESULTS_SCHEMA]
    return pa.Table.from_arrays(columns, schema=RESULTS_SCHEMA)


def _readable(line: bytes) -> bool:
    """Whether a log line is a JSON row that fits RESULTS_SCHEMA."""
    try:
        row = json.loads(line)
        result_key(row)
        _as_table([row])
    except (ValueError, KeyError, TypeError, pa.ArrowException):
        return False
    return True


class ResultStore:
    def __init__(self, directory: str | os.PathLike, provenance: dict | None = None, mirror: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.provenance, self.mirror = provenance, mirror
        self._lock = open(self.directory / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ResultStoreLocked(f"another job is writing results in {self.directory}") from None
        if not self.database_path.is_file() and mirror is not None:
            self._fetch_mirror()
        self._db = sqlite3.connect(self.database_path, isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when append returns
        for statement in TABLES:
            self._db.execute(statement)
        self._bring_to_schema()
        self._take_legacy_rows()
        self.done = {tuple(json.loads(key)) for (key,) in
                     self._db.execute("SELECT key FROM results WHERE status != 'failed'")}  # failed keys are retried
        self._unfolded = 0
        self._table: pa.Table | None = None  # the last table read, until the next write

    @property
    def database_path(self) -> Path:
        return self.directory / DATABASE_FILE

    @property
    def results_path(self) -> Path:
        return self.directory / RESULTS_FILE

    @property
    def quarantined(self) -> int:
        """Unreadable log lines kept aside in QUARANTINE_FILE (by this and earlier opens)."""
        path = self.directory / QUARANTINE_FILE
        return sum(1 for _ in open(path, "rb")) if path.is_file() else 0

    def append(self, rows: Iterable[dict]) -> int:
        """Write the rows whose key is not done (new, or failed before), in one transaction; returns how many."""
        fresh = {}
        for row in rows:
            key = result_key(row)
            if key not in self.done:
                fresh[key] = row  # within one call the latest row of a key is the one that counts
                if row["status"] != "failed":
                    self.done.add(key)
        if fresh:
            self._write(list(fresh.values()))
            self._unfolded += len(fresh)
        return len(fresh)

    def _write(self, rows: list[dict]) -> None:
        """One transaction; rows of one key are applied in order (a failed row, then the row that replaces it)."""
        with self._transaction():
            self._db.executemany(UPSERT, _values(rows))
        self._table = None

    def _transaction(self):
        return _Transaction(self._db)

    def table(self) -> pa.Table:
        """Every row, one per key, in the order the keys were first written."""
        if self._table is None:
            self._table = self._read(RESULTS_SCHEMA)
        return self._table

    def _read(self, schema: pa.Schema) -> pa.Table:
        batches = [pa.ipc.read_record_batch(pa.py_buffer(row), schema)
                   for (row,) in self._db.execute("SELECT row FROM results ORDER BY rowid")]
        return pa.Table.from_batches(batches, schema).combine_chunks()

    def _bring_to_schema(self) -> None:
        """Store RESULTS_SCHEMA once; rows written under another schema are rewritten in this one (one
        transaction, when a new version of the platform first opens the directory)."""
        found = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        current = RESULTS_SCHEMA.serialize().to_pybytes()
        if found is not None and found[0] == current:
            return
        rows = []
        if found is not None:
            old = pa.ipc.read_schema(pa.py_buffer(found[0]))
            _check_key_columns(old.names, self.database_path)
            rows = _conform(self._read(old)).to_pylist()
            log.info("results: %d rows of %s brought to the current results schema", len(rows), self.database_path)
        with self._transaction():
            self._db.execute("DELETE FROM results")
            self._db.executemany(UPSERT, _values(rows))
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('schema', ?)", (current,))

    def compact(self) -> Path:
        """Fold SQLite's log into the database file and copy a snapshot to the mirror, if any."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if self.mirror is not None:
            self._push_mirror()
        self._unfolded = 0
        return self.database_path

    def write_results(self) -> Path:
        """`results.parquet`, the table every reader takes (the viewer, compare, steering), written atomically."""
        path = write_parquet(self.table(), self.results_path, RESULTS_SCHEMA, self.provenance)
        if self.mirror is not None:
            with open(path, "rb") as source:
                write_atomic(posixpath.join(self.mirror, RESULTS_FILE), source.read())
        return path

    @property
    def unfolded(self) -> int:
        """Rows written since the last compaction."""
        return self._unfolded

    def close(self) -> None:
        self._db.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    # -- the mirror ------------------------------------------------------------------------------------------------
    def _push_mirror(self) -> None:
        with tempfile.TemporaryDirectory(dir=self.directory) as scratch:
            snapshot = Path(scratch) / DATABASE_FILE
            with sqlite3.connect(snapshot) as copy:
                self._db.backup(copy)  # consistent, whatever is being written
            copy.close()
            write_atomic(posixpath.join(self.mirror, DATABASE_FILE), snapshot.read_bytes())

    def _fetch_mirror(self) -> None:
        import pyarrow.fs

        filesystem, root = pyarrow.fs.FileSystem.from_uri(self.mirror)
        source = posixpath.join(root, DATABASE_FILE)
        if filesystem.get_file_info(source).type == pyarrow.fs.FileType.NotFound:
            return
        with filesystem.open_input_stream(source) as stream, replacing(self.database_path) as tmp:
            tmp.write_bytes(stream.read())
        log.info("results: resuming from the mirror's snapshot %s", self.mirror)

    # -- output directories from before this store ------------------------------------------------------------------
    def _take_legacy_rows(self) -> None:
        """Rows of the old store (results.parquet, then results.wal.jsonl) the database does not hold yet."""
        known = self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        if not known and self.results_path.is_file():
            _check_key_columns(pq.read_schema(self.results_path).names, self.results_path)
            self._write(_conform(pq.read_table(self.results_path)).to_pylist())
        rows = self._repaired_log()
        if rows:
            self._write(rows)
            log.info("results: took %d rows of %s into %s", len(rows), LOG_FILE, DATABASE_FILE)
        if (self.directory / LOG_FILE).is_file():
            with open(self.directory / LOG_FILE, "r+b") as f:
                f.truncate(0)
                os.fsync(f.fileno())

    def _repaired_log(self) -> list[dict]:
        path = self.directory / LOG_FILE
        if not path.is_file():
            return []
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("dropping a torn last line (%d bytes) of %s", len(data) - end, path)
        kept, bad = [], []
        for number, line in enumerate(data[:end].splitlines(keepends=True), start=1):
            (kept if _readable(line) else bad).append((number, line))
        if bad:
            with open(self.directory / QUARANTINE_FILE, "a", encoding="utf-8") as quarantine:
                for number, line in bad:
                    quarantine.write(json.dumps({"file": LOG_FILE, "line": number,
                                                 "text": line.rstrip(b"\n").decode("utf-8", "backslashreplace")}) + "\n")
                    log.warning("%s:%d is not a readable result row; moved to %s", path, number, QUARANTINE_FILE)
                quarantine.flush()
                os.fsync(quarantine.fileno())
        return [json.loads(line) for _, line in kept]


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on an error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, error, traceback):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
