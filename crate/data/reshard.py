"""Re-shard a raw corpus into Parquet files of ~`file_bytes` of text, once, so training gets many small units.

A Pile train shard is one ~15 GB zstd frame: one file per rank at most, no seeking, and a resume must
decompress it from its start. Parquet parts of ~256 MB give many files to deal to many ranks, column reads,
and resume by row group. Records keep the Pile schema (`text`, `meta.pile_set_name`); bad records are
dropped and counted exactly as training would, and `include_sets`/`exclude_sets` apply.

Each input file becomes parts `NNNNN-MMMMM.parquet` (input index, part index), so the sorted output is the
corpus's natural order. Inputs are converted in parallel (Ray tasks) and resumably: a part is written under
a temporary name and renamed, and `NNNNN.json` marks an input file done, last.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from crate.data.config import MiB, ReadingConfig
from crate.data.documents import ReadOptions, Start, records
from crate.data.shards import map_files, progress_bar
from crate.data.sources import Unit, resolve_input
from crate.files import write_atomic

log = logging.getLogger(__name__)
ROW_GROUP_BYTES = 16 * MiB  # text per Parquet row group: the granularity of column reads and of resume


def reshard(corpus: str, out: str | os.PathLike, cfg: ReadingConfig, file_bytes: int = 256 * MiB,
            use_ray: bool = True, progress: bool = True) -> dict[str, int]:
    """Convert `corpus` into Parquet parts under `out`; returns the merged record counts."""
    source = resolve_input(corpus, cfg, raw=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = ReadOptions.of(cfg)
    todo = [(out, i, unit, options, file_bytes) for i, unit in enumerate(source.units)
            if not (out / f"{i:05d}.json").is_file()]
    log.info("%s: %d files, %d to convert into %s", corpus, len(source.units), len(todo), out)
    for _ in progress_bar(map_files(reshard_file, todo, use_ray), len(todo), progress, unit="file"):
        pass
    totals: Counter[str] = Counter()
    for marker in sorted(out.glob("[0-9]*.json")):
        totals.update(json.loads(marker.read_text())["counts"])
    return dict(totals)


def reshard_file(out: Path, index: int, unit: Unit, options: ReadOptions, file_bytes: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("meta", pa.struct([("pile_set_name", pa.string())]))])
    counts: Counter[str] = Counter()
    parts, writer, rows, group_bytes, part_bytes = [], None, [], 0, 0

    def flush_group() -> None:
        nonlocal rows, group_bytes, writer
        if writer is None:
            writer = pq.ParquetWriter(out / f"{index:05d}-{len(parts):05d}.parquet.tmp", schema)
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        rows, group_bytes = [], 0

    def close_part() -> None:
        nonlocal writer, part_bytes
        name = f"{index:05d}-{len(parts):05d}.parquet"
        writer.close()
        os.replace(out / f"{name}.tmp", out / name)
        parts.append(name)
        writer, part_bytes = None, 0

    for text, set_name, _, _, issue, lost_bytes, _, lost_records in records(unit, Start(), options):
        if text is None or not options.keeps(set_name):
            counts[f"skipped/{issue}" if text is None else "filtered"] += 1
            if lost_bytes:
                counts["lost_bytes/corrupt_file"] += lost_bytes
                counts["lost_records_estimated/corrupt_file"] += lost_records
            continue
        counts["documents"] += 1
        if issue:
            counts[f"repaired/{issue}"] += 1
        rows.append({"text": text, "meta": {"pile_set_name": set_name}})
        group_bytes += len(text)
        part_bytes += len(text)
        if group_bytes >= ROW_GROUP_BYTES:
            flush_group()
        if part_bytes >= file_bytes:
            if rows:
                flush_group()
            close_part()
    if rows:
        flush_group()
    if writer is not None:
        close_part()
    marker = {"input": unit.name, "parts": parts, "counts": dict(counts)}
    write_atomic(out / f"{index:05d}.json", json.dumps(marker))
    return marker
