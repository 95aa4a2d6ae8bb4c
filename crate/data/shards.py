"""Pretokenized corpora: the packed stream written once as uint16 token shards (nanoGPT's `.bin` layout).

A directory holds, per shard, `shard-NNNNN.bin` (the GPT-2 ids of its documents, each followed by
<|endoftext|>, as raw little-endian uint16: `np.memmap(path, np.uint16)` reads it) and `shard-NNNNN.docs.npy`
(int64 rows `[first token of the document within the shard, set id]`); `index.json` (written last) lists
the shards, their sizes and set names. The corpus's token stream is the shards concatenated in order, the
same stream the raw-text reader yields in the corpus's natural (sorted-file) order, so
`read_blocks(raw) == read_blocks(pretokenized)` block for block.

Writing is resumable: each shard is written to a temporary name, renamed, then marked done by a small
`shard-NNNNN.json`; a rerun skips finished shards. Shards are written in parallel by Ray Data tasks
(one task per shard) when Ray is available, else one after the other in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from crate.cluster import connect_ray
from crate.data.config import MiB, ReadingConfig
from crate.data.documents import ReadOptions, Start, documents
from crate.data.packing import StreamStats
from crate.data.sources import INDEX_FILE, SourceError, Unit, resolve_input
from crate.files import replacing, write_atomic
from crate.tokenizer import EOT_TOKEN

log = logging.getLogger(__name__)
FORMAT = "crate-tokens"
VERSION = 1


class TokenShards:
    """A pretokenized directory, memory-mapped: O(1) access to any token range of its stream."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        try:
            self.index = json.loads((self.directory / INDEX_FILE).read_text())
        except (OSError, ValueError) as error:
            raise SourceError(f"{self.directory}: unreadable {INDEX_FILE} ({error}); rerun jobs/pretokenize.py")
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise SourceError(f"{self.directory}/{INDEX_FILE} is not a {FORMAT} v{VERSION} index")
        self.shards = self.index["shards"]
        for shard in self.shards:
            path = self.directory / shard["tokens"]
            size = path.stat().st_size if path.is_file() else -1
            if size != 2 * shard["n_tokens"]:
                raise SourceError(f"{path}: expected {2 * shard['n_tokens']} bytes, found {size} "
                                  "(missing or truncated); rerun jobs/pretokenize.py")
        self.starts = np.cumsum([0] + [s["n_tokens"] for s in self.shards])  # global offset of every shard

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    @cached_property
    def token_arrays(self) -> list[np.ndarray]:
        return [np.memmap(self.directory / s["tokens"], dtype=np.uint16, mode="r") if s["n_tokens"] else
                np.empty(0, np.uint16) for s in self.shards]

    @cached_property
    def doc_arrays(self) -> list[np.ndarray]:
        return [np.load(self.directory / s["docs"], mmap_mode="r") for s in self.shards]

    def pieces(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(shard, first, end) ranges within shards that make up global tokens [start, start+length)."""
        end = start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            stop = min(end, int(self.starts[shard + 1]))
            if stop > start:
                yield shard, start - int(self.starts[shard]), stop - int(self.starts[shard])
            start, shard = stop, shard + 1

    def tokens(self, start: int, length: int) -> np.ndarray:
        parts = [self.token_arrays[s][a:b] for s, a, b in self.pieces(start, length)]
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def set_tokens(self, start: int, length: int) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for shard, a, b in self.pieces(start, length):
            docs, names = self.doc_arrays[shard], self.shards[shard]["sets"]
            first = max(int(np.searchsorted(docs[:, 0], a, side="right")) - 1, 0)
            last = int(np.searchsorted(docs[:, 0], b, side="left"))
            bounds = np.append(docs[first:last, 0], b)
            bounds[0] = a
            for set_id, n in zip(docs[first:last, 1], np.diff(bounds)):
                counts[names[set_id]] += int(n)
        return dict(counts)

    def fingerprint(self) -> dict[str, str | int]:
        listing = json.dumps([(s["tokens"], s["n_tokens"]) for s in self.shards])
        return {"files": len(self.shards), "names": hashlib.sha1(listing.encode()).hexdigest()[:12]}


# ---- writing ---------------------------------------------------------------------------------------------


def pretokenize(corpus: str, out: str | os.PathLike, cfg: ReadingConfig, shard_bytes: int = 64 * MiB,
                use_ray: bool = True, progress: bool = True) -> dict:
    """Tokenize `corpus` into shards under `out` (resumable); returns the index. Filters of `cfg` apply."""
    source = resolve_input(corpus, cfg, raw=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_units(source.units, shard_bytes)
    options = ReadOptions.of(cfg)
    todo = [i for i, units in enumerate(groups) if not shard_done(out, i, units)]
    log.info("%s: %d files -> %d shards (%d already written) in %s", corpus, len(source.units), len(groups),
             len(groups) - len(todo), out)
    write = [(out, i, groups[i], options) for i in todo]
    for _ in progress_bar(map_files(write_shard, write, use_ray), len(todo), progress):
        pass
    shards = [json.loads((out / f"{shard_name(i)}.json").read_text()) for i in range(len(groups))]
    stats = Counter()
    for shard in shards:
        stats.update(shard.pop("stats"))
        shard.pop("files")
    index = {"format": FORMAT, "version": VERSION, "tokenizer": "gpt2", "dtype": "uint16", "eot": EOT_TOKEN,
             "source": corpus, "text_field": cfg.text_field, "include_sets": cfg.include_sets,
             "exclude_sets": cfg.exclude_sets, "n_tokens": sum(s["n_tokens"] for s in shards),
             "stats": dict(stats), "shards": shards}
    write_atomic(out / INDEX_FILE, json.dumps(index, indent=1))
    return index


def group_units(units: tuple[Unit, ...], shard_bytes: int) -> list[list[Unit]]:
    """Consecutive files grouped until a group holds `shard_bytes` (a big file is a shard of its own)."""
    groups: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if groups[-1] and size >= shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += unit.size
    return groups


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_done(out: Path, i: int, units: list[Unit]) -> bool:
    marker = out / f"{shard_name(i)}.json"
    try:
        return json.loads(marker.read_text())["files"] == [u.name for u in units]
    except (OSError, ValueError, KeyError):
        return False


def write_shard(out: Path, i: int, units: list[Unit], options: ReadOptions) -> dict:
    """Tokenize one group of files into shard `i`; the marker file is written last."""
    name = shard_name(i)
    stats, set_ids, docs, n_tokens = StreamStats(), {}, [], 0
    with replacing(out / f"{name}.bin") as tmp, open(tmp, "wb") as tokens_file:
        for unit in units:
            for doc in documents(unit, Start(), options):
                stats.count(doc)
                if doc.tokens is None:
                    continue
                docs.append((n_tokens, set_ids.setdefault(doc.set_name, len(set_ids))))
                doc.tokens.astype("<u2", copy=False).tofile(tokens_file)
                n_tokens += len(doc.tokens)
    with replacing(out / f"{name}.docs.npy") as tmp, open(tmp, "wb") as docs_file:
        np.save(docs_file, np.array(docs, dtype=np.int64).reshape(-1, 2))
    marker = {"tokens": f"{name}.bin", "docs": f"{name}.docs.npy", "n_tokens": n_tokens, "n_documents": len(docs),
              "sets": list(set_ids), "files": [u.name for u in units],
              "stats": {k: v for k, v in stats.as_dict().items() if k not in ("blocks", "dropped_tail_tokens")}}
    write_atomic(out / f"{name}.json", json.dumps(marker))
    return marker


def map_files(fn: Callable[..., dict], jobs: list[tuple], use_ray: bool) -> Iterator[dict]:
    """`fn(*job)` for every job: one Ray Data task each (1 CPU) when `use_ray`, else one after the other."""
    if not jobs:
        return
    if not use_ray:
        for job in jobs:
            yield fn(*job)
        return
    import ray

    connect_ray(include_dashboard=False, log_to_driver=False)
    dataset = ray.data.from_items([{"job": i} for i in range(len(jobs))], override_num_blocks=len(jobs))
    yield from dataset.map(lambda row: {"done": fn(*jobs[row["job"]]) is not None}, num_cpus=1).iter_rows()


def progress_bar(items: Iterator, total: int, enabled: bool, unit: str = "shard") -> Iterator:
    from tqdm import tqdm

    return tqdm(items, total=total, unit=unit, disable=not enabled)
