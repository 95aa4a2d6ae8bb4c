"""Corpus statistics: documents, GPT-2 tokens and UTF-8 bytes per pile_set_name, and skipped records by reason.

Reads exactly what training reads (same sources, same per-file core, same bad-input handling).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from crate.data.config import ReadingConfig
from crate.data.documents import ReadOptions, Start, records, tokenize
from crate.data.shards import TokenShards
from crate.data.sources import SourceError, resolve


@dataclass
class CorpusStats:
    table: pl.DataFrame  # pile_set_name, documents, tokens, bytes, token_share (bytes null when pretokenized)
    skipped: Counter = field(default_factory=Counter)  # records skipped, by reason
    repaired: Counter = field(default_factory=Counter)  # records repaired and kept, by reason
    filtered: int = 0
    lost_bytes: int = 0  # decompressed bytes of damaged files past their last readable record
    unmeasured_files: int = 0  # damaged files whose size is not declared: lost_bytes is a lower bound for them
    lost_records: int = 0  # records estimated lost in lost_bytes (each file's mean record size before the damage)
    errors: list[str] = field(default_factory=list)  # paths that could not be read at all
    files: int = 0

    @property
    def readable(self) -> bool:
        return self.files > 0

    def report(self) -> str:
        lines = []
        with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, fmt_str_lengths=40, thousands_separator=",",
                       tbl_hide_column_data_types=True, float_precision=4):
            lines.append(str(self.table))
        totals = self.table.select(pl.col("documents", "tokens").sum()).row(0)
        lines.append(f"{self.files} files, {totals[0]:,} documents, {totals[1]:,} tokens")
        for title, counts in (("skipped", self.skipped), ("repaired", self.repaired)):
            listed = ", ".join(f"{reason} {n:,}" for reason, n in sorted(counts.items())) or "none"
            lines.append(f"{title} records: {listed}")
        if self.skipped["corrupt_file"]:
            bound = (f" (at least: {self.unmeasured_files} of them declare no size)" if self.unmeasured_files else "")
            lines.append(f"damaged files: {self.skipped['corrupt_file']:,}, {self.lost_bytes:,} decompressed bytes "
                         f"(about {self.lost_records:,} records) lost past their last readable record{bound}")
        if self.filtered:
            lines.append(f"filtered by include/exclude_sets: {self.filtered:,}")
        lines += [f"unreadable: {error}" for error in self.errors]
        return "\n".join(lines)


def corpus_stats(paths: list[str], cfg: ReadingConfig | None = None, progress: bool = True) -> CorpusStats:
    from tqdm import tqdm

    cfg = cfg or ReadingConfig()
    options = ReadOptions.of(cfg)
    sums: dict[str, Counter] = defaultdict(Counter)
    result = CorpusStats(pl.DataFrame())
    pretokenized_only = True
    for path in paths:
        try:
            corpus = resolve(path, cfg)
        except SourceError as error:
            result.errors.append(str(error))
            continue
        if corpus.pretokenized:
            add_shard_stats(TokenShards(corpus.shards), sums)
            result.files += 1
            continue
        pretokenized_only = False
        for unit in tqdm(corpus.units, desc=path, unit="file", disable=not progress):
            try:
                for text, set_name, _, _, issue, lost_bytes, measured, lost_records in records(unit, Start(), options):
                    if text is None:
                        result.skipped[issue] += 1
                        result.lost_bytes += lost_bytes
                        result.unmeasured_files += not measured
                        result.lost_records += lost_records
                    elif not options.keeps(set_name):
                        result.filtered += 1
                    else:
                        tokens, repaired = tokenize(text)
                        sums[set_name].update(documents=1, tokens=len(tokens), bytes=len(text.encode("utf-8", "replace")))
                        if issue or repaired:
                            result.repaired[issue or repaired] += 1
                result.files += 1
            except SourceError as error:
                result.errors.append(str(error))
    result.table = stats_table(sums, with_bytes=not pretokenized_only)
    return result


def add_shard_stats(shards: TokenShards, sums: dict[str, Counter]) -> None:
    for shard, docs in zip(shards.shards, shards.doc_arrays):
        n_sets = len(shard["sets"])
        lengths = np.diff(np.append(docs[:, 0], shard["n_tokens"]))
        tokens = np.bincount(docs[:, 1], weights=lengths, minlength=n_sets)
        counts = np.bincount(docs[:, 1], minlength=n_sets)
        for set_id, name in enumerate(shard["sets"]):
            sums[name].update(documents=int(counts[set_id]), tokens=int(tokens[set_id]))


def stats_table(sums: dict[str, Counter], with_bytes: bool) -> pl.DataFrame:
    table = pl.DataFrame({
        "pile_set_name": list(sums),
        "documents": [c["documents"] for c in sums.values()],
        "tokens": [c["tokens"] for c in sums.values()],
        "bytes": [c["bytes"] if with_bytes else None for c in sums.values()],
    }, schema={"pile_set_name": pl.String, "documents": pl.Int64, "tokens": pl.Int64, "bytes": pl.Int64})
    total = max(int(table["tokens"].sum() or 0), 1)
    return (table.with_columns((pl.col("tokens") / total).alias("token_share"))
            .sort(["tokens", "pile_set_name"], descending=[True, False]))

