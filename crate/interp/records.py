"""Activation records on disk (RECORDS_SCHEMA / FEATURES_SCHEMA parquet) and in memory (per-feature excerpts for
the explain/score stages), plus the exporter to OpenAI's `NeuronRecord` / `ActivationRecord` JSON."""

from __future__ import annotations

import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crate.interp.schema import COMPLETE_MARKER, FEATURES_SCHEMA, RECORDS_SCHEMA, excerpt_ref, write_parquet


@dataclass(frozen=True)
class Excerpt:
    """One window shown to an explainer or simulator: token strings and the feature's true activations."""

    ref: str  # crate.interp.schema.excerpt_ref
    tokens: tuple[str, ...]
    activations: np.ndarray  # float32, one per token


@dataclass
class FeatureRecords:
    """A feature's records, each list in rank order (quantiles: one list per bin)."""

    layer: int
    neuron: int
    top: list[Excerpt] = field(default_factory=list)
    random: list[Excerpt] = field(default_factory=list)
    quantiles: list[list[Excerpt]] = field(default_factory=list)
    top_focus: list[int] = field(default_factory=list)  # where each top record's unit sits in its (read) window


def _list_array(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(R, W) numpy -> list<type> arrow array without Python objects."""
    rows, width = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(type_.to_pandas_dtype())))


def records_table(columns: Mapping[str, np.ndarray]) -> pa.Table:
    arrays = []
    for f in RECORDS_SCHEMA:
        value = columns[f.name]
        arrays.append(_list_array(value, f.type.value_type) if pa.types.is_list(f.type) else pa.array(value, f.type))
    return pa.Table.from_arrays(arrays, schema=RECORDS_SCHEMA)


def features_table(layer: int, stats: Mapping[str, np.ndarray]) -> pa.Table:
    n = len(stats["feature"])
    columns = {"layer": np.full(n, layer), "neuron": stats["feature"], **{k: stats[k] for k in
               ("count", "mean", "variance", "density", "max")},
               "quantile_boundaries": _list_array(stats["quantile_boundaries"], pa.float32())}
    return pa.Table.from_arrays([c if isinstance(c, pa.Array) else pa.array(c, f.type)
                                 for c, f in zip(columns.values(), FEATURES_SCHEMA)], schema=FEATURES_SCHEMA)


def layer_path(directory: str | os.PathLike, layer: int) -> Path:
    return Path(directory) / f"layer_{layer:02d}.parquet"


def write_records(collector, directory: str | os.PathLike, provenance: Mapping[str, Any], timer=None) -> Path:
    """Write every layer of a finished RecordCollector, the feature statistics, then the completion marker.
    Layers are written by a thread pool while the next layer is finalised; `timer` (collect.StageTimer) splits
    the time into "finalize" (selections -> columns) and "write" (waiting for the files)."""
    from crate.interp.collect import NO_TIMER

    timer = timer or NO_TIMER
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)
    stats = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        writes = []
        for layer, layer_collector in collector.layers.items():
            with timer("finalize"):
                table = records_table(collector.records(layer))
                stats.append(features_table(layer, layer_collector.statistics()))
            writes.append(pool.submit(write_parquet, table, layer_path(directory, layer), RECORDS_SCHEMA, provenance))
        with timer("write"):
            for write in writes:
                write.result()
            write_parquet(pa.concat_tables(stats), directory / "features.parquet", FEATURES_SCHEMA, provenance)
            (directory / COMPLETE_MARKER).write_text(json.dumps({"layers": sorted(collector.layers),
                                                                 "blocks": collector.n_blocks}))
    return directory


def is_complete(directory: str | os.PathLike) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


@functools.lru_cache(maxsize=1)
def gpt2_token_strings() -> tuple[str, ...]:
    """Display text of every GPT-2 token (invalid UTF-8 fragments shown with U+FFFD)."""
    from crate.tokenizer import gpt2_tokenizer

    encoding = gpt2_tokenizer()
    return tuple(encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in range(encoding.n_vocab))


def read_feature_records(directory: str | os.PathLike, layer: int, neurons: Sequence[int] | None = None,
                         token_strings: Sequence[str] | None = None) -> dict[int, FeatureRecords]:
    """{neuron: FeatureRecords} of one layer (optionally only `neurons`), tokens decoded to strings."""
    table = pq.read_table(layer_path(directory, layer))
    if neurons is not None:
        table = table.filter(pc.is_in(table["neuron"], pa.array(list(neurons), pa.int32())))
    columns = {name: table[name].to_numpy() for name in ("neuron", "kind", "rank", "bin", "focus")}
    for name in ("tokens", "activations"):
        flat = pc.list_flatten(table[name]).to_numpy()
        columns[name] = flat.reshape(table.num_rows, -1) if table.num_rows else flat.reshape(0, 0)
    return group_records(columns, layer, token_strings or gpt2_token_strings())


def group_records(columns: Mapping[str, np.ndarray], layer: int, token_strings: Sequence[str]) -> dict[int, FeatureRecords]:
    """RECORDS_SCHEMA columns of one layer (tokens/activations as (R, window) arrays) -> {neuron: FeatureRecords}."""
    out: dict[int, FeatureRecords] = {}
    for i in np.lexsort((columns["rank"], columns["bin"], columns["neuron"])):
        neuron, kind, rank, bin = (int(columns["neuron"][i]), str(columns["kind"][i]), int(columns["rank"][i]),
                                   int(columns["bin"][i]))
        record = out.setdefault(neuron, FeatureRecords(layer, neuron))
        inside = columns["tokens"][i] >= 0  # a stream window truncated at the stream's start or end (token -1)
        excerpt = Excerpt(excerpt_ref(kind, rank, bin), tuple(token_strings[t] for t in columns["tokens"][i][inside]),
                          np.asarray(columns["activations"][i][inside], dtype=np.float32))
        if kind == "quantile":
            while len(record.quantiles) <= bin:
                record.quantiles.append([])
            record.quantiles[bin].append(excerpt)
        elif kind == "top":
            record.top.append(excerpt)
            focus = int(columns["focus"][i])
            record.top_focus.append(focus - int(np.count_nonzero(~inside[:focus])))
        else:
            record.random.append(excerpt)
    return out


def layers_in(directory: str | os.PathLike) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in Path(directory).glob("layer_*.parquet"))


def _activation_record(excerpt: Excerpt) -> dict:
    return {"dataclass_name": "ActivationRecord", "tokens": list(excerpt.tokens),
            "activations": [float(a) for a in excerpt.activations]}


def openai_neuron_record(records: FeatureRecords, stats: Mapping[str, Any] | None = None) -> dict:
    """OpenAI neuron-explainer's `NeuronRecord` JSON (`dataclass_name` fields) for one feature."""
    stats = stats or {}
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": records.layer, "neuron_index": records.neuron},
        "random_sample": [_activation_record(e) for e in records.random],
        "random_sample_by_quantile": [[_activation_record(e) for e in bin] for bin in records.quantiles] or None,
        "quantile_boundaries": stats.get("quantile_boundaries"),
        "mean": stats.get("mean"),
        "variance": stats.get("variance"),
        "skewness": None,
        "kurtosis": None,
        "most_positive_activation_records": [_activation_record(e) for e in records.top],
    }


def export_openai(directory: str | os.PathLike, out: str | os.PathLike, layers: Sequence[int] | None = None) -> Iterator[Path]:
    """Write `<out>/<layer>/<neuron>.json` (OpenAI's collated-activations layout) for a records directory."""
    stats_table = pq.read_table(Path(directory) / "features.parquet").to_pylist()
    stats = {(s["layer"], s["neuron"]): s for s in stats_table}
    for layer in layers if layers is not None else layers_in(directory):
        for neuron, records in read_feature_records(directory, layer).items():
            path = Path(out) / str(layer) / f"{neuron}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(openai_neuron_record(records, stats.get((layer, neuron)))))
            yield path

