"""Build the static neuron viewer from interpretability output directories (and, optionally, steering runs).

Output folder (opens from a local path; no server, no fetch — Chromium refuses fetch() of file:// URLs, so
every data file is a script that hands its payload to `CRATE_VIEWER.register(key, data)`):

    index.html, viewer.js, viewer.css
    data/index.js                          models, their layers, metrics and layer means
    data/m<M>/layer-<LL>.js                one layer's features: scores, explanations, firing frequency, max,
                                           steering effects (loaded when the layer is opened)
    data/m<M>/layer-<LL>/chunk-<CCCC>.js   top and random excerpts of `chunk_size` features with per-token
                                           activations (loaded when one of them is opened)

so a CRATE-12L (36,864 neurons) costs the browser one layer list and one chunk at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable

import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from crate.config import Range
from crate.errors import ConfigError
from crate.files import write_atomic
from crate.results.tables import distinct_labels, feature_label, metric_order
from crate.tracking import TrackingConfig, resolve_locations
from crate.tracking.job import TrackedJob

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ViewerConfig:
    inputs: list[str] = field(default_factory=list)  # interpretability output directories (jobs/interpret.py)
    steering: list[str] = field(default_factory=list)  # steering.json files (jobs/steer.py)
    output_dir: str = "viewer"  # where the static site goes (open its index.html)
    top_excerpts: Annotated[int, Range(0)] = 10  # top-activating excerpts shown per feature
    random_excerpts: Annotated[int, Range(0)] = 5  # random excerpts shown per feature
    chunk_size: Annotated[int, Range(1)] = 128  # features per excerpt file
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the MLflow run

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs", "give at least one interpretability output directory: view.py DIR...")


@dataclass
class Collection:
    """One finished records collection: records/<id>/ with its layers and feature statistics."""

    path: Path
    provenance: dict[str, Any]
    layers: list[int]


@dataclass
class ModelEntry:
    """What the viewer shows as one model: a model's neurons, or its SAE features (all layers' SAEs)."""

    model: str
    feature_kind: str
    arch: str | None = None
    n_layer: int | None = None
    checkpoint: str | None = None
    results: list[pl.DataFrame] = field(default_factory=list)
    collections: dict[int, Collection] = field(default_factory=dict)  # layer -> where its records are

    @property
    def label(self) -> str:
        kind = feature_label(self.feature_kind)
        arch = f"{self.arch.upper()} " if self.arch else ""
        depth = f"{self.n_layer}L " if self.n_layer else ""
        return f"{arch}{depth}{self.model}{kind}"

    @property
    def layers(self) -> list[int]:
        scored = {layer for frame in self.results for layer in frame["layer"].unique().to_list()}
        return sorted(scored | set(self.collections))


def find_entries(inputs: Iterable[str | os.PathLike]) -> list[ModelEntry]:
    """Group the results and records of the input directories by (model, feature kind)."""
    from crate.interp.schema import COMPLETE_MARKER, read_provenance

    entries: dict[tuple[str, str], ModelEntry] = {}

    def entry(model: str, kind: str) -> ModelEntry:
        return entries.setdefault((model, kind), ModelEntry(model, kind))

    tables = [Path(d) / "results.parquet" for d in inputs if (Path(d) / "results.parquet").is_file()]
    # one labelling over all inputs: two models that share a label (other model_sha256) stay apart
    frames = [pl.read_parquet(t).with_columns(pl.lit(str(t)).alias("_table")) for t in tables]
    combined = distinct_labels(pl.concat(frames, how="diagonal_relaxed")) if frames else None
    labelled = {t: combined.filter(pl.col("_table") == str(t)).drop("_table") for t in tables}
    for directory in map(Path, inputs):
        if not directory.is_dir():
            raise ConfigError("inputs", f"{directory} is not an interpretability output directory")
        found = False
        results = directory / "results.parquet"
        if results.is_file():
            frame = labelled[results]
            for (model, kind), rows in frame.group_by(["model", "feature_kind"], maintain_order=True):
                e = entry(model, kind)
                e.results.append(rows)
                first = rows.row(0, named=True)
                e.arch, e.n_layer, e.checkpoint = first["arch"], first["n_layer"], first["checkpoint"]
                found = True
        for marker in sorted(directory.glob(f"records/*/{COMPLETE_MARKER}")):
            path = marker.parent
            layer_files = sorted(path.glob("layer_*.parquet"))
            if not layer_files:
                continue
            provenance = read_provenance(layer_files[0])
            kind = str(provenance.get("features", "neurons")).partition(":")[0]
            e = entry(str(provenance.get("model", directory.name)), kind)
            e.arch = e.arch or provenance.get("arch")
            e.n_layer = e.n_layer or provenance.get("n_layer")
            e.checkpoint = e.checkpoint or provenance.get("checkpoint")
            layers = [int(f.stem.split("_")[1]) for f in layer_files]
            collection = Collection(path, provenance, layers)
            for layer in layers:
                e.collections.setdefault(layer, collection)
            found = True
        if not found:
            raise ConfigError("inputs", f"{directory} holds neither results.parquet nor a finished records/ collection")
    return list(entries.values())


def build_viewer(config: ViewerConfig) -> Path:
    """Write the viewer into `config.output_dir` (data first, index.html last); returns index.html."""
    entries = find_entries(config.inputs)
    steering = read_steering(config.steering)
    out = Path(config.output_dir)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)  # a rebuild must not keep another model's layers
    index = {"models": []}
    for m, entry in enumerate(entries):
        metrics = metric_order({metric for frame in entry.results for metric in frame["metric"].unique().to_list()})
        layers = []
        for layer in tqdm(entry.layers, desc=f"viewer {entry.label}", unit="layer"):
            features = layer_features(entry, layer, metrics)
            effects = steering.get(entry.checkpoint, {}).get(layer, {}) if entry.feature_kind == "neurons" else {}
            for neuron, record in features.items():
                if neuron in effects:
                    record["steering"] = effects[neuron]
            key = f"m{m}/layer-{layer:02d}"
            write_script(data / f"{key}.js", key, {"metrics": metrics, "chunk_size": config.chunk_size,
                                                    "features": [features[n] for n in sorted(features)]})
            write_excerpts(entry, layer, sorted(features), config, data, key)
            layers.append({"layer": layer, "n_features": len(features), "means": layer_means(features, metrics)})
        index["models"].append({"label": entry.label, "model": entry.model, "feature_kind": entry.feature_kind,
                                "arch": entry.arch, "n_layer": entry.n_layer, "checkpoint": entry.checkpoint,
                                "metrics": metrics, "layers": layers})
    write_script(data / "index.js", "index", index)
    for asset in ("viewer.js", "viewer.css", "index.html"):  # index.html last: the viewer is complete once it exists
        shutil.copyfile(STATIC / asset, out / asset)
    return out / "index.html"


def layer_features(entry: ModelEntry, layer: int, metrics: list[str]) -> dict[int, dict[str, Any]]:
    """{feature: {id, density, max, scores: {metric: score or null}, status, explanations}} of one layer."""
    features: dict[int, dict[str, Any]] = defaultdict(lambda: {"scores": {}, "status": {}, "explanations": {}})
    collection = entry.collections.get(layer)
    if collection is not None and (collection.path / "features.parquet").is_file():
        stats = pl.read_parquet(collection.path / "features.parquet").filter(pl.col("layer") == layer)
        for row in stats.select("neuron", "density", "max").iter_rows(named=True):
            features[row["neuron"]].update(density=_finite(row["density"]), max=_finite(row["max"]))
    for frame in entry.results:
        rows = frame.filter(pl.col("layer") == layer).select("neuron", "metric", "score", "status", "explanation")
        for row in rows.iter_rows(named=True):
            record = features[row["neuron"]]
            record["scores"][row["metric"]] = _finite(row["score"])
            record["status"][row["metric"]] = row["status"]
            if row["explanation"]:
                record["explanations"][row["metric"]] = row["explanation"]
    for neuron, record in features.items():
        record["id"] = neuron
    return dict(features)


def layer_means(features: dict[int, dict[str, Any]], metrics: list[str]) -> dict[str, float | None]:
    means = {}
    for metric in metrics:
        scores = [f["scores"][metric] for f in features.values() if f["scores"].get(metric) is not None]
        means[metric] = sum(scores) / len(scores) if scores else None
    return means


def write_excerpts(entry: ModelEntry, layer: int, neurons: list[int], config: ViewerConfig, data: Path,
                   layer_key: str) -> None:
    """Chunk files of top and random excerpts: token ids mapped to a per-chunk string table, activations to
    4 significant digits."""
    collection = entry.collections.get(layer)
    if collection is None:
        return
    records = read_excerpt_records(collection.path / f"layer_{layer:02d}.parquet", config)
    decode = token_decoder()
    for start in range(0, (max(neurons) if neurons else -1) + 1, config.chunk_size):
        strings: dict[int, int] = {}
        chunk: dict[str, Any] = {}
        for neuron in range(start, start + config.chunk_size):
            if neuron not in records:
                continue
            chunk[str(neuron)] = {kind: [[[strings.setdefault(t, len(strings)) for t in tokens],
                                          [float(f"{a:.4g}") for a in acts]] for tokens, acts in excerpts]
                                  for kind, excerpts in records[neuron].items()}
        if chunk:
            key = f"{layer_key}/chunk-{start // config.chunk_size:04d}"
            write_script(data / f"{key}.js", key, {"strings": [decode(t) for t in strings], "features": chunk})


def read_excerpt_records(path: Path, config: ViewerConfig) -> dict[int, dict[str, list]]:
    """{feature: {"top": [(tokens, activations)...], "random": [...]}} in rank order, only the shown ranks."""
    table = pq.read_table(path, columns=["neuron", "kind", "rank", "tokens", "activations"])
    keep = pc.or_(pc.and_(pc.equal(table["kind"], "top"), pc.less(table["rank"], config.top_excerpts)),
                  pc.and_(pc.equal(table["kind"], "random"), pc.less(table["rank"], config.random_excerpts)))
    table = table.filter(keep).sort_by([("neuron", "ascending"), ("kind", "descending"), ("rank", "ascending")])
    out: dict[int, dict[str, list]] = defaultdict(lambda: {"top": [], "random": []})
    columns = table.to_pydict()
    for neuron, kind, tokens, acts in zip(columns["neuron"], columns["kind"], columns["tokens"], columns["activations"]):
        shown = [(token, act) for token, act in zip(tokens, acts) if token >= 0]  # -1: past a stream window's ends
        out[neuron][kind].append(([token for token, _ in shown], [act for _, act in shown]))
    return out


def token_decoder():
    from crate.tokenizer import gpt2_tokenizer

    encoding = gpt2_tokenizer()

    def decode(token: int) -> str:
        try:
            return encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")
        except KeyError:  # the padded ids above GPT-2's vocabulary
            return f"<{token}>"

    return decode


def read_steering(paths: Iterable[str | os.PathLike]) -> dict[str | None, dict[int, dict[int, list]]]:
    """{checkpoint: {layer: {neuron: [effect, ...]}}} from steering.json files (single-neuron effects)."""
    effects: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for path in paths:
        for effect in json.loads(Path(path).read_text(encoding="utf-8")):
            one_neuron = effect.get("site", "neurons") == "neurons" and effect["layer"] != "all"
            if one_neuron and len(effect["neurons"]) == 1:
                effects[effect.get("checkpoint")][effect["layer"]][effect["neurons"][0]].append(
                    {k: effect[k] for k in ("value", "prompt", "increased", "decreased", "kl_divergence",
                                            "generation", "steered_generation")})
    return effects


def write_script(path: Path, key: str, payload: Any) -> None:
    """A data file the viewer loads with a <script> tag (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    write_atomic(path, f"CRATE_VIEWER.register({json.dumps(key)},{body});\n")


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: undefined numbers become null; the rest keep 4 significant digits (smaller files)."""
    return float(f"{value:.4g}") if value is not None and math.isfinite(value) else None


def run_viewer(config: ViewerConfig) -> Path:
    """The view job: build the viewer and log the folder to MLflow as the `viewer` artifact; returns its index."""
    config = resolve_locations(config)
    with TrackedJob(config.tracking, "view", "neuron-viewer", config=config) as job:
        index = build_viewer(config)
        job.tracker.log_artifact(index.parent, "viewer")
    return index
