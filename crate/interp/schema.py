"""The tables `crate.interp` writes: the interface the neuron viewer, `jobs/compare.py` and SAE features build on.

Every table is parquet with its schema defined here, once. Files are written atomically (temp file + rename);
a directory of records is complete only when its `_COMPLETE` marker exists.

Layout of one job's output directory (`InterpConfig.output_dir`):

    records/<collection_id>/layer_LL.parquet    activation records of layer LL        (RECORDS_SCHEMA)
    records/<collection_id>/features.parquet    per-feature activation statistics     (FEATURES_SCHEMA)
    records/<collection_id>/_COMPLETE           written last: the collection finished
    model.json                                  the model this directory belongs to (label, model_sha256)
    results.parquet                             one row per scored feature × metric   (RESULTS_SCHEMA), at the end
    results.sqlite                              the same rows while the job runs, one per key (crate.interp.store)

**Activation records** — one row per (feature, record). A record is a `window`-token excerpt of one block of
the evaluation stream with the feature's activation at every token.

| column | type | meaning |
|---|---|---|
| layer | int32 | transformer layer (0-based) |
| neuron | int32 | feature index within the layer: a model neuron, or an SAE feature (see `features` in the metadata) |
| kind | string | "top" (highest activation), "random" (uniform sample), "quantile" (sample from an activation-quantile bin) |
| rank | int32 | order within kind: top by activation (desc, earlier position first on ties); random and quantile by sampling key |
| bin | int16 | quantile bin (index into `quantile_edges`), -1 for top/random |
| activation | float32 | the selected unit's activation: the focus token's (centered windows) or the fragment's max (fragments) |
| block | int64 | index of the block in the evaluation stream (the stream's first block is 0) |
| start | int32 | first token of the window within its block (stream windows: may be negative, in the block before) |
| focus | int32 | offset of the selected token within the window (argmax token for fragments) |
| tokens | list<int32> | GPT-2 token ids of the window (-1: beyond the stream's start or end, a truncated stream window) |
| activations | list<float32> | the feature's activation at each token of the window |

Parquet key-value metadata `crate.interp` holds the provenance (JSON): checkpoint path, its MLflow run id and
step, model id, model_sha256, features spec, corpus, the collection settings, collection id, tokenizer, code version.

**Model identity**: `model` is a model's name in tables and plots (`<run name>@<step>` for platform checkpoints,
`<file stem>-<sha12>` for others); `model_sha256` is what it is: SHA-256 over its config and weights
(`crate.interp.subject.model_sha256`). Both are in every result key and the collection id, and an output directory's
`model.json` names the one model whose records and results it holds (a job for another model refuses it).

**Feature statistics** — one row per feature of a collection: `count` units seen, `mean`, `variance`,
`density` (fraction of units > 0), `max`, and `quantile_boundaries` (the activation at each quantile edge,
estimated from the sampling pool).

**Results** — one row per (feature, metric) scored. The idempotency key is `RESULT_KEY`: a job skips keys already
present and never writes one twice. `score` is the Pearson correlation in [-1, 1] (reports multiply by 100);
NaN when it is undefined. `status` says why:

| status | score | meaning |
|---|---|---|
| "scored" | finite | a correlation was computed |
| "undefined" | NaN | true or simulated activations are constant over the scored tokens (counted, never averaged) |
| "failed" | NaN | the backend failed (after retries) or produced unusable output; `reason` says which |

Columns, in order: the key (model, model_sha256, features, layer, neuron, protocol, metric, backend, prompt_version,
reading, windows, seed), then
score, status, reason, explanation, explain_excerpts, excerpts (record refs, see `excerpt_ref`), simulated
(per-excerpt simulated activations, 0..10 scale), n_defaulted (simulated values that fell back to 0: no value token
among the returned logprobs, or an unparseable sampled line), attempts (LLM calls incl. retries), duration_s,
the protocol fields (crate.interp.protocols.PROTOCOL_RULES; `reading` and `windows` are in the key): prompt_format
(fork | openai | crate-v1; prompt_version names its text), random_only (separate | rescore: how the random metric
was simulated), record_shortfall (records the protocol asks for that the feature's collection lacked: quantile bins
too rare for the sampling pool; 0 when complete), then provenance: feature_kind, simulator_kind, explainer_model, simulator_model, checkpoint, checkpoint_run_id,
checkpoint_step, preset, arch, n_layer, corpus, records_id, job_run_id, code_version, created_at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from crate.files import replacing

SCHEMA_VERSION = 3  # 2: results keyed by model_sha256 too; 3: by reading and windows, with the protocol fields
METADATA_KEY = b"crate.interp"
COMPLETE_MARKER = "_COMPLETE"

PROTOCOLS = ("crate-paper", "openai")
METRICS = ("tar", "random", "top", "anthropic")  # tar = top-and-random (OpenAI's `valid` split)
RECORD_KINDS = ("top", "random", "quantile")
STATUSES = ("scored", "undefined", "failed")
SIMULATOR_KINDS = (
    "logprob-ev",  # all-at-once: expected value over "0".."10" from next-token probabilities (Bills et al.)
    "sampled",  # logprob-free: the model writes the values (chat-only endpoints); labelled in every row
    "token-match",  # offline token-set baseline
)

RECORDS_SCHEMA = pa.schema([
    ("layer", pa.int32()),
    ("neuron", pa.int32()),
    ("kind", pa.string()),
    ("rank", pa.int32()),
    ("bin", pa.int16()),
    ("activation", pa.float32()),
    ("block", pa.int64()),
    ("start", pa.int32()),
    ("focus", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("activations", pa.list_(pa.float32())),
])

FEATURES_SCHEMA = pa.schema([
    ("layer", pa.int32()),
    ("neuron", pa.int32()),
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("variance", pa.float64()),
    ("density", pa.float64()),
    ("max", pa.float32()),
    ("quantile_boundaries", pa.list_(pa.float32())),
])

RESULT_KEY = ("model", "model_sha256", "features", "layer", "neuron", "protocol", "metric", "backend", "prompt_version",
              "reading", "windows", "seed")

RESULTS_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("features", pa.string()),
    ("layer", pa.int32()),
    ("neuron", pa.int32()),
    ("protocol", pa.string()),
    ("metric", pa.string()),
    ("backend", pa.string()),
    ("prompt_version", pa.string()),
    ("reading", pa.string()),
    ("windows", pa.string()),
    ("seed", pa.int64()),
    ("score", pa.float64()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("explanation", pa.string()),
    ("explain_excerpts", pa.list_(pa.string())),
    ("excerpts", pa.list_(pa.string())),
    ("simulated", pa.list_(pa.list_(pa.float32()))),
    ("n_defaulted", pa.int32()),
    ("attempts", pa.int32()),
    ("duration_s", pa.float32()),
    ("prompt_format", pa.string()),
    ("random_only", pa.string()),
    ("record_shortfall", pa.int32()),
    ("feature_kind", pa.string()),
    ("simulator_kind", pa.string()),
    ("explainer_model", pa.string()),
    ("simulator_model", pa.string()),
    ("checkpoint", pa.string()),
    ("checkpoint_run_id", pa.string()),
    ("checkpoint_step", pa.int64()),
    ("preset", pa.string()),
    ("arch", pa.string()),
    ("n_layer", pa.int32()),
    ("corpus", pa.string()),
    ("records_id", pa.string()),
    ("job_run_id", pa.string()),
    ("code_version", pa.string()),
    ("created_at", pa.timestamp("ms", tz="UTC")),
])


def excerpt_ref(kind: str, rank: int, bin: int = -1, tokens: slice | None = None) -> str:
    """A record's name inside results: "top/3", "random/0", "quantile/2/1" (bin 2, rank 1), and an out-of-context
    snippet of a record as "top/25[3:6]" (tokens 3..5 of that window)."""
    ref = f"{kind}/{bin}/{rank}" if kind == "quantile" else f"{kind}/{rank}"
    return ref if tokens is None else f"{ref}[{tokens.start}:{tokens.stop}]"


def result_key(row: Mapping[str, Any]) -> tuple:
    return tuple(row[name] for name in RESULT_KEY)


def provenance_metadata(provenance: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **provenance}, sort_keys=True).encode()}


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance JSON stored with a records/features/results parquet file ({} when absent)."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}


def write_parquet(table: pa.Table, path: str | os.PathLike, schema: pa.Schema,
                  provenance: Mapping[str, Any] | None = None) -> Path:
    """Write `table` (cast to `schema`, which it must match column for column) atomically to `path`."""
    path = Path(path)
    if table.schema.names != schema.names:
        raise ValueError(f"{path.name}: columns {table.schema.names} do not match the schema {schema.names}")
    table = table.cast(schema)
    if provenance is not None:
        table = table.replace_schema_metadata(provenance_metadata(provenance))
    with replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path
