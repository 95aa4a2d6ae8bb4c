"""The protocol fields (crate.interp.protocols.PROTOCOL_RULES) exercised both ways, fast and without processes:
quantile bins of sparse features, the simulator's expected-value reading, windows cut from the stream, the
random-only pass, and the results schema carrying every field."""

import numpy as np
import pytest
import torch

from crate.interp.collect import RecordCollector
from crate.interp.config import CollectionConfig, anthropic_collection


def collect_layer(acts: torch.Tensor, spec: CollectionConfig, seed: int = 0) -> RecordCollector:
    n_blocks, length, n = acts.shape
    tokens = np.arange(n_blocks * length).reshape(n_blocks, length) % 50000
    collector = RecordCollector(spec, {0: np.arange(n)}, seed)
    for start in range(0, n_blocks, spec.batch_blocks):
        ids = np.arange(start, min(start + spec.batch_blocks, n_blocks))
        collector.update(ids, tokens[ids], {0: acts[ids]})
    return collector


def sparse_activations(densities, n_blocks: int, length: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    acts = np.zeros((n_blocks, length, len(densities)), dtype=np.float32)
    for f, density in enumerate(densities):
        fires = rng.random((n_blocks, length)) < density
        acts[..., f] = np.where(fires, rng.random((n_blocks, length)) + 0.1, 0.0)
    return torch.from_numpy(acts)


DENSITIES = (0.3, 0.1, 0.01, 0.0)


def test_every_anthropic_quantile_bin_gets_its_full_count_for_sparse_features():
    """Zeros tie; the random records drawn first must not eat the bottom bin (the paper draws 20 per bin)."""
    spec = CollectionConfig(**{**anthropic_collection().__dict__, "blocks": 40, "block_length": 128,
                               "windows": "centered", "batch_blocks": 8})
    records = collect_layer(sparse_activations(DENSITIES, 40, 128), spec).records(0)
    for f, density in enumerate(DENSITIES):
        quantile = (records["neuron"] == f) & (records["kind"] == "quantile")
        counts = np.bincount(records["bin"][quantile], minlength=spec.n_bins)
        assert list(counts) == [spec.per_quantile] * spec.n_bins, f"density {density}: per-bin counts {counts}"
        random_units = records["block"][(records["neuron"] == f) & (records["kind"] == "random")]
        assert len(random_units) == spec.random


# -- prompt formats: character for character what the released code renders (tests/fixtures/prompts/generate.py) --
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from crate.interp.prompts import explanation_prompt, merged_system_turn, parse_explanation, simulation_prompt  # noqa: E402
from crate.interp.records import Excerpt  # noqa: E402

PROMPTS = Path(__file__).parent / "fixtures" / "prompts"


def golden(name: str) -> dict:
    return json.loads((PROMPTS / f"{name}.json").read_text())


def excerpts(records: list[dict]) -> list[Excerpt]:
    return [Excerpt(f"top/{i}", tuple(r["tokens"]), np.asarray(r["activations"], dtype=np.float32))
            for i, r in enumerate(records)]


@pytest.mark.parametrize("protocol,prompt_format", [("crate-paper", "fork"), ("openai", "openai")])
def test_prompts_equal_the_released_codes_character_for_character(protocol, prompt_format):
    fixture = golden(protocol)
    inputs = fixture["inputs"]
    for name, records in (("sparse", inputs["explain_records"]), ("dense", inputs["dense_records"])):
        messages = explanation_prompt(excerpts(records), prompt_format)
        assert [{"role": m.role, "content": m.content} for m in messages] == fixture["explanation"][name]
        if prompt_format == "fork":
            assert merged_system_turn(messages) == fixture["explanation_merged"][name]
    explanation = parse_explanation(inputs["explanation"], prompt_format)
    assert explanation == inputs["explanation"].strip()  # the raw completion, not its first line
    for case in fixture["simulation"]:
        text, offsets = simulation_prompt(explanation, case["tokens"], prompt_format)
        assert text == case["prompt"]
        assert [text[o:o + 7] for o in offsets] == ["unknown"] * len(case["tokens"])
        assert text.count("<|endofprompt|>") == 1


def test_a_nan_activation_is_shown_as_zero():
    messages = explanation_prompt(excerpts([{"tokens": ["a", "b"], "activations": [float("nan"), 1.0]}]), "openai")
    assert messages[-1].content.split("Activations:")[1].startswith("\n<start>\na\t0\nb\t10\n<end>")


# -- windows: the paper's stream rule vs the block-bound one (hand-built streams) ---------------------------------
from crate.interp.collect import with_neighbours  # noqa: E402
from crate.interp.records import group_records  # noqa: E402


def collect_stream(acts: torch.Tensor, spec: CollectionConfig) -> RecordCollector:
    """Through `with_neighbours`, as the job feeds the collector."""
    n_blocks, length, n = acts.shape
    tokens = np.arange(n_blocks * length).reshape(n_blocks, length)
    batches = [(np.arange(s, min(s + spec.batch_blocks, n_blocks)), tokens[s:s + spec.batch_blocks])
               for s in range(0, n_blocks, spec.batch_blocks)]
    collector = RecordCollector(spec, {0: np.arange(n)}, 0)
    for block_ids, rows, before, after in with_neighbours(batches):
        neighbour = lambda row: None if row is None else acts[int(row[0]) // length]
        collector.update(block_ids, rows, {0: acts[block_ids]}, neighbours={0: (neighbour(before), neighbour(after))})
    return collector


EDGE_POSITIONS = (0, 2, 31, 32, 35, 63, 95)  # stream start, near it, block edges (blocks of 32), the stream's end


@pytest.mark.parametrize("windows", ["stream", "centered"])
def test_windows_at_block_edges_and_the_stream_start(windows):
    n_blocks, length, w = 3, 32, 8
    acts = torch.zeros(n_blocks, length, len(EDGE_POSITIONS))
    flat = acts.view(-1, len(EDGE_POSITIONS))
    for f, position in enumerate(EDGE_POSITIONS):
        flat[:, f] = torch.arange(n_blocks * length) / 1000  # every token distinct: windows show where they sit
        flat[position, f] = 10.0
    spec = CollectionConfig(blocks=n_blocks, block_length=length, window=w, windows=windows, top=1, random=1,
                            per_quantile=0, quantile_pool=0, batch_blocks=2)
    collector = collect_stream(acts, spec) if windows == "stream" else collect_layer(acts, spec)
    columns = collector.records(0)
    records = group_records(columns, 0, [str(i) for i in range(n_blocks * length)])
    for f, position in enumerate(EDGE_POSITIONS):
        if windows == "stream":  # [t - 4, t + 4) of the stream, cut at its start and end (the paper's rule)
            expected = list(range(max(0, position - w // 2), min(n_blocks * length, position + w - w // 2)))
        else:  # shifted to stay inside the token's block
            block_start = position // length * length
            start = min(max(position - w // 2, block_start), block_start + length - w)
            expected = list(range(start, start + w))
        top = records[f].top[0]
        assert [int(t) for t in top.tokens] == expected, (windows, position)
        assert np.allclose(top.activations, flat[expected, f].numpy())
        assert top.tokens[records[f].top_focus[0]] == str(position)


def test_stream_windows_refuse_batches_without_their_neighbours():
    spec = CollectionConfig(blocks=2, block_length=32, window=8, windows="stream", top=1, random=1, per_quantile=0,
                            quantile_pool=0, batch_blocks=2)
    with pytest.raises(ValueError, match="with_neighbours"):
        collect_layer(torch.zeros(2, 32, 1), spec)


# -- the simulator's reading on fixed log-probability tables ----------------------------------------------------
from crate.errors import ConfigError  # noqa: E402
from crate.interp.backends.http import _best  # noqa: E402
from crate.interp.config import BackendConfig, InterpConfig  # noqa: E402
from crate.interp.prompts import expected_values, reading_top_k, top_k_values  # noqa: E402

# one position's next-token log-probabilities, best first (as a server or torch.topk returns them)
TABLE = [("unknown", -0.1), ("0", -1.0), (" the", -2.0), ("7", -2.5), ("\n", -3.0), ("10", -3.5), ("3", -4.0)]


def reading(table, k):
    return float(expected_values(top_k_values(_best(dict(table), k))[None])[0])


def test_top_k_reading_counts_only_digits_among_the_k_best_and_reads_0_without_one():
    p0, p7, p10 = np.exp(-1.0), np.exp(-2.5), np.exp(-3.5)
    assert reading(TABLE, 1) == 0.0  # "unknown" alone: no digit in the top 1 -> 0 (the fork's rule)
    assert reading(TABLE, 2) == 0.0  # "0" only
    assert reading(TABLE, 5) == pytest.approx(7 * p7 / (p0 + p7))  # top 5: "0" and "7"; "10" is 6th
    assert reading(TABLE, 6) == pytest.approx((7 * p7 + 10 * p10) / (p0 + p7 + p10))
    assert reading([("unknown", -0.1), (" 5", -1.0)], 5) == 0.0  # " 5" is not the text "5"
    assert reading_top_k("top-5") == 5 and reading_top_k("top-15") == 15 and reading_top_k("full") is None


def test_each_protocol_resolves_its_rules_and_bad_fields_name_themselves():
    paper, openai = InterpConfig(checkpoint="c.pt"), InterpConfig(checkpoint="c.pt", protocol="openai")
    assert (paper.backend.reading, paper.records.windows, paper.backend.prompt_format, paper.random_only) == \
        ("top-5", "stream", "fork", "separate")
    assert (openai.backend.reading, openai.records.windows, openai.backend.prompt_format, openai.random_only) == \
        ("top-15", "fragments", "openai", "rescore")
    chosen = InterpConfig(checkpoint="c.pt", backend=BackendConfig(reading="full", prompt_format="crate-v1"),
                          random_only="rescore")
    assert (chosen.backend.reading, chosen.backend.prompt_format, chosen.random_only) == ("full", "crate-v1", "rescore")
    with pytest.raises(ConfigError, match="reading"):
        BackendConfig(reading="top-0")
    with pytest.raises(ConfigError, match="reading"):
        BackendConfig(kind="http", explainer_model="m", reading="full")
    with pytest.raises(ConfigError, match="prompt_format"):
        BackendConfig(prompt_format="gpt")


# -- random-only: a separate pass or a re-aggregation; the record shortfall; the schema carries every field -------
from crate.interp.backends.base import build_backend  # noqa: E402
from crate.interp.protocols import PROTOCOL_RULES, metric_groups  # noqa: E402
from crate.interp.records import FeatureRecords  # noqa: E402
from crate.interp.schema import RESULT_KEY, RESULTS_SCHEMA, SCHEMA_VERSION, excerpt_ref  # noqa: E402
from crate.interp.scoring import score_task  # noqa: E402


def feature(n_quantile: int = 20) -> FeatureRecords:
    rng = np.random.default_rng(0)
    make = lambda ref: Excerpt(ref, tuple(f"t{i}" for i in range(8)), rng.random(8).astype(np.float32))
    return FeatureRecords(0, 3, top=[make(f"top/{i}") for i in range(50)], random=[make(f"random/{i}") for i in range(50)],
                          quantiles=[[make(excerpt_ref("quantile", r, b)) for r in range(n_quantile if b else 1)]
                                     for b in range(11)], top_focus=[4] * 50)


def test_separate_random_only_is_a_pass_of_its_own_rescore_reuses_the_tar_simulation():
    separate = metric_groups("crate-paper", ["tar", "random"], "separate")
    assert [metrics for _, metrics in separate] == [("tar",), ("random",)]
    tar, random = (group.task(feature()) for group, _ in separate)
    assert [e.ref for e in random.explain] == [e.ref for e in tar.explain] == [f"top/{i}" for i in range(0, 10, 2)]
    assert [e.ref for e in random.score] == [f"random/{i}" for i in range(0, 10, 2)]  # simulated alone
    assert random.seed_offset == 1 and tar.seed_offset == 0 and set(tar.metrics) == {"tar"}
    (rescore, metrics), = metric_groups("crate-paper", ["tar", "random"], "rescore")
    both = rescore.task(feature())
    assert metrics == ("tar", "random") and [both.score[i].ref for i in both.metrics["random"]] == \
        [f"random/{i}" for i in range(0, 10, 2)]
    assert PROTOCOL_RULES["crate-paper"].random_only == "separate" and PROTOCOL_RULES["openai"].random_only == "rescore"


def test_an_unfillable_quantile_bin_is_counted_in_the_rows():
    (group, metrics), = metric_groups("crate-paper", ["anthropic"])
    assert group.task(feature(), n_bins=11).record_shortfall == 3  # bin 0 holds 1 record of the 4 it uses
    assert group.task(feature(), n_bins=12).record_shortfall == 3 + 4  # a bin with none
    rows = score_task(group.task(feature(), n_bins=11), metrics, build_backend(BackendConfig()), 0)
    assert rows[0]["record_shortfall"] == 3


def test_every_row_carries_the_protocol_fields_the_schema_names():
    (group, metrics), = metric_groups("openai", ["tar"])
    backend = build_backend(InterpConfig(checkpoint="c.pt", protocol="openai").backend)
    row = score_task(group.task(feature()), metrics, backend, 0)[0]
    assert (row["reading"], row["prompt_format"], row["prompt_version"]) == ("top-15", "openai", "neuron_explainer-0.0.1")
    assert {"reading", "windows"} <= set(RESULT_KEY) and SCHEMA_VERSION == 3
    assert {"prompt_format", "random_only", "record_shortfall", "reading", "windows"} <= set(RESULTS_SCHEMA.names)
    job_columns = {"model", "model_sha256", "features", "windows", "random_only", "records_id", "created_at",
                   "feature_kind", "checkpoint", "checkpoint_run_id", "checkpoint_step", "preset", "arch", "n_layer",
                   "corpus", "job_run_id", "code_version"}  # added by the job (crate.interp.job.InterpretabilityJob)
    assert set(RESULTS_SCHEMA.names) == set(row) | job_columns


def test_an_earlier_schemas_table_is_read_by_reports_and_refused_as_a_jobs_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crate.interp.store import ResultStore
    from crate.results.tables import read_results

    old = [name for name in RESULT_KEY if name not in ("reading", "windows")]
    row = {"model": "m", "model_sha256": "s", "features": "neurons", "layer": 0, "neuron": 1, "protocol": "crate-paper",
           "metric": "tar", "backend": "tokenset", "prompt_version": "crate-v1", "seed": 0}
    pq.write_table(pa.Table.from_pylist([{**{k: row[k] for k in old}, "score": 0.5, "status": "scored"}]),
                   tmp_path / "results.parquet")
    table = read_results([tmp_path])
    assert table["reading"].to_list() == [None] and table["score"].to_list() == [0.5]
    with pytest.raises(ConfigError, match="earlier schema"):
        ResultStore(tmp_path)


def test_collect_runs_each_batch_with_its_neighbours_and_cuts_windows_from_the_stream():
    from crate.interp.collect import batched, collect
    from crate.interp.features import ModelNeurons
    from crate.model import build_model

    torch.manual_seed(5)
    model = build_model("crate-tiny").eval()
    blocks = np.random.default_rng(5).integers(0, 50257, (5, 32))
    spec = CollectionConfig(blocks=5, block_length=32, window=16, windows="stream", top=6, random=4, per_quantile=0,
                            quantile_pool=0, batch_blocks=2)
    columns = collect(model, with_neighbours(list(batched(blocks, 2))), spec, ModelNeurons(), {1: np.arange(4)}).records(1)
    with torch.no_grad():  # every block is its own forward context; the stream is their concatenation
        acts = ModelNeurons().activations(model, torch.as_tensor(blocks), [1])[1][..., :4].reshape(-1, 4).numpy()
    stream, n = blocks.reshape(-1), len(blocks.reshape(-1))
    crossing = 0
    for i in range(len(columns["neuron"])):
        t = columns["block"][i] * 32 + columns["start"][i] + columns["focus"][i]
        lo, hi = max(0, t - 8), min(n, t + 8)
        inside = columns["tokens"][i] >= 0
        assert list(columns["tokens"][i][inside]) == list(stream[lo:hi])
        assert np.allclose(columns["activations"][i][inside], acts[lo:hi, columns["neuron"][i]], atol=1e-5)
        crossing += lo // 32 != (hi - 1) // 32
    assert crossing  # some windows run into the neighbouring block


def test_the_mlflow_params_carry_every_protocol_field():
    from crate.config import flatten

    params = flatten(InterpConfig(checkpoint="c.pt"))  # InterpretabilityJob._params logs these (less tracking.*)
    assert {params[k] for k in ("backend.reading", "records.windows", "anthropic_records.windows",
                                "backend.prompt_format", "random_only")} == {"top-5", "stream", "fork", "separate"}


@pytest.mark.parametrize("protocol", ["crate-paper", "openai"])
def test_readings_equal_the_released_codes_on_fixed_logprob_tables(protocol):
    readings = golden(protocol)["readings"]
    k = reading_top_k(PROTOCOL_RULES[protocol].reading)
    assert k == readings["k"]
    for table, expected in zip(readings["tables"], readings["expected_values"]):
        ordered = [(text, value) for text, value in table]  # best first, duplicates kept (as torch.topk gives them)
        got = float(expected_values(top_k_values(ordered[:k])[None])[0])
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
