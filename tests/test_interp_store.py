"""The interpretability results store (crate.interp.store): SQLite keyed by the result key, each append one durable
transaction, failed rows replaced by a later job, a mirror a job on another machine resumes from, output folders
of the store before it (results.parquet + results.wal.jsonl) taken in, and results.parquet written once at the end."""

import json
import math
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crate.interp.schema import RESULTS_SCHEMA, result_key, write_parquet
from crate.interp.store import DATABASE_FILE, LOG_FILE, RESULTS_FILE, ResultStore


def row(neuron: int, status: str = "scored", score: float = 0.5, layer: int = 0) -> dict:
    values = {name: None for name in RESULTS_SCHEMA.names}
    values.update(model="m", model_sha256="s", features="neurons", layer=layer, neuron=neuron, protocol="p",
                  metric="tar", backend="b", prompt_version="v1", seed=0, score=score, status=status,
                  explanation="fires on cats", created_at=1000 + neuron)
    return values


def test_rows_are_durable_at_once_and_a_reopened_store_knows_what_is_done(tmp_path):
    store = ResultStore(tmp_path)
    assert store.append([row(1), row(2, "failed", math.nan), row(1, score=0.9)]) == 2  # key 1 once, first wins
    store.close()  # no compaction: the commit alone made them durable
    reopened = ResultStore(tmp_path)
    assert {k[4] for k in reopened.done} == {1}  # the failed key is not done: it is retried
    assert reopened.append([row(1, score=0.1), row(2, score=0.7), row(3)]) == 2
    table = reopened.table()
    assert table["neuron"].to_pylist() == [1, 2, 3] and table["score"].to_pylist() == [0.5, 0.7, 0.5]
    assert table["created_at"].type == RESULTS_SCHEMA.field("created_at").type
    assert not (tmp_path / RESULTS_FILE).exists()  # parquet only when the job ends
    path = reopened.write_results()
    assert pq.read_table(path).equals(table)
    reopened.close()


def test_compaction_mirrors_a_snapshot_that_a_store_elsewhere_resumes_from(tmp_path):
    mirror = f"file://{tmp_path / 'bucket' / 'interp' / 'job'}"
    store = ResultStore(tmp_path / "driver-a", mirror=mirror)
    store.append([row(n) for n in range(5)])
    store.compact()
    store.append([row(5)])  # after the last compaction: on driver A's disk only
    store.write_results()
    store.close()
    assert (tmp_path / "bucket" / "interp" / "job" / DATABASE_FILE).is_file()
    assert pq.read_table(tmp_path / "bucket" / "interp" / "job" / RESULTS_FILE).num_rows == 6
    elsewhere = ResultStore(tmp_path / "driver-b", mirror=mirror)  # another machine, an empty local disk
    assert sorted(k[4] for k in elsewhere.done) == [0, 1, 2, 3, 4]
    elsewhere.close()


def test_an_output_folder_of_the_old_store_is_taken_in_with_its_log_quarantine_and_all(tmp_path):
    write_parquet(pa.Table.from_pylist([row(1), row(2, "failed", math.nan)], schema=RESULTS_SCHEMA),
                  tmp_path / RESULTS_FILE, RESULTS_SCHEMA)
    (tmp_path / LOG_FILE).write_bytes(json.dumps(row(2, score=0.8)).encode() + b"\n" + b'{"garbage\xff\n'
                                      + json.dumps(row(3)).encode() + b"\n" + b'{"torn')
    store = ResultStore(tmp_path)
    table = store.table()
    assert table["neuron"].to_pylist() == [1, 2, 3] and table["score"].to_pylist() == [0.5, 0.8, 0.5]
    assert store.quarantined == 1 and (tmp_path / LOG_FILE).stat().st_size == 0
    store.close()
    again = ResultStore(tmp_path)  # taken once: reopening adds nothing
    assert again.table().num_rows == 3 and again.quarantined == 1
    again.close()


def test_compaction_counts_rows_since_the_last_one(tmp_path):
    store = ResultStore(tmp_path)
    store.append([row(n) for n in range(3)])
    assert store.unfolded == 3
    assert store.compact() == tmp_path / DATABASE_FILE and store.unfolded == 0
    assert not (tmp_path / f"{DATABASE_FILE}-wal").exists() or (tmp_path / f"{DATABASE_FILE}-wal").stat().st_size == 0
    store.close()


@pytest.mark.parametrize("status", ["scored", "undefined"])
def test_a_finished_row_is_never_replaced_even_by_a_second_writer_of_the_file(tmp_path, status):
    store = ResultStore(tmp_path)
    store.append([row(1, status)])
    store.done.clear()  # as if another process had not seen it: the database itself keeps the first row
    store.append([row(1, score=0.123)])
    assert store.table()["score"].to_pylist() == [0.5]
    store.close()


def test_a_database_written_under_an_older_results_schema_is_brought_to_the_current_one(tmp_path):
    store = ResultStore(tmp_path)
    store.close()
    older = RESULTS_SCHEMA.remove(RESULTS_SCHEMA.get_field_index("simulator_kind"))  # a column added since
    old_row = {k: v for k, v in row(4).items() if k != "simulator_kind"}
    batch = pa.RecordBatch.from_pylist([old_row], schema=older)
    with sqlite3.connect(tmp_path / DATABASE_FILE) as db:
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (older.serialize().to_pybytes(),))
        db.execute("INSERT INTO results VALUES (?, ?, ?)", (json.dumps(result_key(old_row)), "scored",
                                                            batch.serialize().to_pybytes()))
    db.close()
    reopened = ResultStore(tmp_path)
    table = reopened.table()
    assert table.schema == RESULTS_SCHEMA and table["neuron"].to_pylist() == [4]
    assert table["simulator_kind"].to_pylist() == [None] and table["explanation"].to_pylist() == ["fires on cats"]
    assert reopened.append([row(4)]) == 0  # still done
    reopened.close()
