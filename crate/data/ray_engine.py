"""The Ray Data engine: the files of one rank's schedule read and tokenized by parallel Ray Data read tasks.

Each read task runs the same core function as the in-process engine (`crate.data.documents.documents`) over
a run of consecutive files and emits Arrow tables of tokenized documents (one row per record, tokens as
list<uint16>, with the record's position). `preserve_order` delivers them in schedule order and the rank
packs them into blocks itself, so both engines yield identical blocks; packing is a memcpy, the
tokenization is what runs in parallel. Object-store backpressure bounds memory: at most `read_tasks`
tasks run per rank and Ray Data pauses them while the consumer's buffer is full.

Why not one driver-side dataset handed out with `get_dataset_shard` / `streaming_split`: Ray Data 2.60
assigns the blocks of a split to whichever rank asks first, so which rank sees which block depends on
timing, and a split cannot start mid-epoch; neither determinism nor block-exact resume would hold. Each
rank therefore builds its own pipeline over its own files, starting at its saved position.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterator

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from crate.data.config import DataConfig
from crate.data.documents import Document, ReadOptions, Start, documents
from crate.data.sources import Corpus, Unit

if TYPE_CHECKING:
    import pyarrow as pa

    from crate.data.stream import Item

TABLE_TOKENS = 1 << 20  # a read task emits a table every ~1M tokens (2 MB), bounding its memory


def read_items_with_ray(items: list["Item"], corpus: Corpus, options: ReadOptions,
                        cfg: DataConfig) -> Iterator[tuple["Item", Document]]:
    import ray

    work = [(i, corpus.units[item.unit], item.start) for i, item in enumerate(items)]
    datasource = DocumentsDatasource(task_groups(work, cfg), options)
    dataset = ray.data.read_datasource(datasource, concurrency=cfg.read_tasks, num_cpus=cfg.read_cpus)
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # one bar per rank per epoch is noise; training logs progress
    last = (-1, -1)
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow",
                                      prefetch_batches=cfg.prefetch_batches):
        for index, doc in table_documents(table):
            if (index, doc.doc) <= last:  # cheap guard: determinism must never fail silently
                raise RuntimeError(f"Ray Data delivered record {(index, doc.doc)} after {last}: order lost")
            last = (index, doc.doc)
            yield items[index], doc


def task_groups(work: list[tuple[int, Unit, Start]], cfg: DataConfig) -> list[list[tuple[int, Unit, Start]]]:
    """Consecutive files grouped into read tasks: at most `task_bytes` each, and at least ~4 tasks per
    concurrent slot so a small corpus still reads in parallel."""
    total = sum(unit.size for _, unit, _ in work)
    target = max(1, min(cfg.task_bytes, total // (4 * cfg.read_tasks)))
    groups: list[list] = [[]]
    size = 0
    for entry in work:
        if groups[-1] and size >= target:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry[1].size
    return groups


class DocumentsDatasource(Datasource):
    def __init__(self, groups: list[list[tuple[int, Unit, Start]]], options: ReadOptions):
        super().__init__()
        self.groups, self.options = groups, options

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit.size for group in self.groups for _, unit, _ in group)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        """One task per group of files, whatever `parallelism` Ray Data asks for: the groups are the schedule."""
        return [ReadTask(functools.partial(read_group, group, self.options),
                         BlockMetadata(num_rows=None, size_bytes=sum(u.size for _, u, _ in group),
                                       input_files=[u.url for _, u, _ in group], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for group in self.groups]


def read_group(group: list[tuple[int, Unit, Start]], options: ReadOptions) -> Iterator["pa.Table"]:
    rows: list[tuple[int, Document]] = []
    n_tokens = 0
    for index, unit, start in group:
        for doc in documents(unit, start, options):
            rows.append((index, doc))
            n_tokens += 0 if doc.tokens is None else len(doc.tokens)
            if n_tokens >= TABLE_TOKENS:
                yield documents_table(rows)
                rows, n_tokens = [], 0
    if rows:
        yield documents_table(rows)


def documents_table(rows: list[tuple[int, Document]]) -> "pa.Table":
    import pyarrow as pa

    lengths = [0 if d.tokens is None else len(d.tokens) for _, d in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = [d.tokens for _, d in rows if d.tokens is not None]
    tokens = pa.LargeListArray.from_arrays(
        pa.array(offsets), pa.array(np.concatenate(values) if values else np.empty(0, np.uint16)),
        mask=pa.array([d.tokens is None for _, d in rows]))
    return pa.table({
        "item": pa.array([i for i, _ in rows], pa.int64()),
        "doc": pa.array([d.doc for _, d in rows], pa.int64()),
        "offset": pa.array([d.offset for _, d in rows], pa.int64()),
        "set_name": pa.array([d.set_name for _, d in rows], pa.string()),
        "issue": pa.array([d.issue for _, d in rows], pa.string()),
        "lost_bytes": pa.array([d.lost_bytes for _, d in rows], pa.int64()),
        "lost_measured": pa.array([d.lost_measured for _, d in rows], pa.bool_()),
        "lost_records": pa.array([d.lost_records for _, d in rows], pa.int64()),
        "tokens": tokens,
    })


def table_documents(table: "pa.Table") -> Iterator[tuple[int, Document]]:
    tokens = table.column("tokens").combine_chunks()
    offsets, values = tokens.offsets.to_numpy(), tokens.values.to_numpy()  # offsets index the unsliced values
    missing = tokens.is_null().to_numpy(zero_copy_only=False)
    names = ("item", *Document._fields[1:])  # every field of a Document but its tokens, in order
    columns = [table.column(name).to_pylist() for name in names]
    for row, (index, *fields) in enumerate(zip(*columns)):
        ids = None if missing[row] else values[offsets[row]:offsets[row + 1]]
        yield index, Document(ids, *fields)
