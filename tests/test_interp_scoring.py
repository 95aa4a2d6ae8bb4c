"""Protocol splits, normalisation and prompts, the pooled Pearson score and its NaN policy, the token-set baseline on
synthetic neurons, summaries (last-layer rule, sampled CIs), the resumable results store, and the config/flags."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from crate.errors import ConfigError
from crate.interp.backends.tokenset import build as build_tokenset
from crate.interp.collect import RecordCollector
from crate.interp.config import BackendConfig, CollectionConfig, InterpConfig
from crate.interp.prompts import (EXPLANATION_PREFIX, PROMPT_VERSION, MalformedOutput, chat_turns, expected_values,
                                  explanation_prompt, normalize, parse_explanation, parse_sampled_values, render_text,
                                  simulation_prompt)
from crate.interp.protocols import InsufficientRecords, metric_groups
from crate.interp.records import Excerpt, FeatureRecords, group_records
from crate.interp.report import layer_summary, model_summary
from crate.interp.schema import RESULTS_SCHEMA, excerpt_ref
from crate.interp.scoring import pearson, score_task
from crate.interp.store import ResultStore, ResultStoreLocked

FIXTURES = Path(__file__).parent / "fixtures" / "interp"


def excerpt(ref: str, n: int = 8, focus_value: float = 1.0) -> Excerpt:
    return Excerpt(ref, tuple(f"t{i}" for i in range(n)), np.full(n, focus_value, dtype=np.float32))


def full_records() -> FeatureRecords:
    return FeatureRecords(3, 7, top=[excerpt(f"top/{i}") for i in range(50)],
                          random=[excerpt(f"random/{i}") for i in range(50)],
                          quantiles=[[excerpt(excerpt_ref("quantile", r, b)) for r in range(20)] for b in range(11)],
                          top_focus=[4] * 50)


def refs(excerpts) -> list[str]:
    return [e.ref for e in excerpts]


def test_crate_paper_tar_and_random_splits():
    (group, metrics), = metric_groups("crate-paper", ["tar", "random"], "rescore")
    task = group.task(full_records())
    assert refs(task.explain) == ["top/0", "top/2", "top/4", "top/6", "top/8"]
    assert refs(task.score) == ["random/0", "random/2", "random/4", "random/6", "random/8",
                                "top/1", "top/3", "top/5", "top/7", "top/9"]
    assert task.metrics == {"tar": tuple(range(10)), "random": tuple(range(5))} and metrics == ("tar", "random")


def test_crate_paper_anthropic_split_with_out_of_context_snippets():
    (group, _), = metric_groups("crate-paper", ["anthropic"])
    assert group.collection == "anthropic_records"
    task = group.task(full_records())
    bins = lambda ranks: [f"quantile/{b}/{r}" for b in range(11) for r in ranks]
    assert refs(task.explain) == [f"top/{i}" for i in range(15)] + bins((0, 1)) + [f"random/{i}" for i in range(5)]
    snippets = [f"top/{i}[3:6]" for i in range(25, 35)]
    assert refs(task.score) == [f"top/{i}" for i in range(15, 25)] + bins((2, 3)) + [f"random/{i}" for i in range(5, 10)] + snippets
    assert len(task.score[-1].tokens) == 3 and task.metrics["anthropic"] == tuple(range(47))


def test_openai_splits_are_interleaved_by_rank():
    (group, metrics), = metric_groups("openai", ["tar", "top", "random"])
    task = group.task(full_records())
    assert refs(task.explain) == ["top/0", "top/4", "top/8", "top/12", "top/16"]
    assert refs(task.score) == ["top/2", "top/6", "top/10", "top/14", "top/18",
                                "random/1", "random/4", "random/7", "random/10", "random/13"]
    assert task.metrics == {"tar": tuple(range(10)), "top": tuple(range(5)), "random": tuple(range(5, 10))}


def test_protocols_refuse_too_few_records_and_collections_that_cannot_provide_them():
    (group, _), = metric_groups("openai", ["tar"])
    short = full_records()
    short.top = short.top[:19]
    with pytest.raises(InsufficientRecords, match="20 top"):
        group.task(short)
    with pytest.raises(ConfigError, match="top >= 20"):
        InterpConfig(checkpoint="x.pt", protocol="openai", records=CollectionConfig(top=10))
    with pytest.raises(ConfigError, match="per_quantile >= 4"):
        InterpConfig(checkpoint="x.pt", metrics=["anthropic"],
                     anthropic_records=CollectionConfig(blocks=800, window=8, per_quantile=2))


def test_normalisation_is_floor_of_ten_relu_over_the_max_of_all_shown_records():
    out = normalize([np.array([-1.0, 0.0, 5.0, 10.0]), np.array([2.5, 9.99])])
    assert [o.tolist() for o in out] == [[0, 0, 5, 10], [2, 9]]
    assert [o.tolist() for o in normalize([np.array([-2.0, 0.0])])] == [[0, 0]]


def test_explanation_prompt_repeats_sparse_records_without_zeros():
    sparse = [Excerpt("top/0", ("a", "b", "c", "d", "e", "f"), np.array([0, 0, 9, 0, 0, 0], dtype=np.float32))]
    dense = [Excerpt("top/0", ("a", "b"), np.array([3, 9], dtype=np.float32))]
    assert "all zeros filtered out:\n<start>\nc\t10\n<end>" in render_text(explanation_prompt(sparse))
    assert "filtered out" not in explanation_prompt(dense)[-1].content


def test_prompts_match_the_golden_file_of_this_prompt_version():
    excerpts = [Excerpt("top/0", (" The", " cat", "\t", " sat", "\n"), np.array([0, 4.0, 0, 8.0, 0], dtype=np.float32))]
    text, offsets = simulation_prompt("cats", excerpts[0].tokens)
    rendered = render_text(explanation_prompt(excerpts)) + "\n=====\n" + text
    golden = FIXTURES / f"prompts_{PROMPT_VERSION}.txt"
    assert rendered == golden.read_text(), f"prompts changed: bump PROMPT_VERSION and write a new {golden.name}"
    assert [text[o:o + 7] for o in offsets] == ["unknown"] * 5 and text[offsets[2] - 3:offsets[2]] == "\\t\t"


def test_chat_templates_get_the_explanation_prefix_as_a_prefilled_answer():
    turns, prefill = chat_turns(explanation_prompt([excerpt("top/0")]))
    assert prefill == EXPLANATION_PREFIX and [t["role"] for t in turns[:3]] == ["system", "user", "assistant"]
    assert turns[1]["content"].endswith("behavior:") and turns[-1]["content"].endswith("Explanation of neuron 4 behavior:")
    assert turns[2]["content"] == f"{EXPLANATION_PREFIX} years written as four-digit numbers."


def test_model_output_parsing():
    assert parse_explanation(" words about cats.\nNeuron 5") == "words about cats"
    assert parse_explanation("the main thing this neuron does is find dates.") == "dates"
    with pytest.raises(MalformedOutput):
        parse_explanation("  .\n")
    assert parse_sampled_values("a\t3\nb\t12\n", ["a", "b"]).tolist() == [3.0, 10.0]
    assert parse_sampled_values("a\t3\n", ["a", "b"]) is None and parse_sampled_values("x\t3\ny\t1", ["a", "b"]) is None
    assert expected_values(np.array([[0, 1.0, 0, 1.0] + [0] * 7, [0.0] * 11])).tolist() == [2.0, 0.0]


def test_score_is_pearson_over_all_tokens_pooled_and_nan_when_constant():
    true = [np.array([0.0, 1.0]), np.array([5.0, 6.0])]
    simulated = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]  # each excerpt alone correlates perfectly
    pooled = pearson(np.concatenate(true), np.concatenate(simulated))
    assert pooled == pytest.approx(np.corrcoef(np.concatenate(true), np.concatenate(simulated))[0, 1]) and pooled < 0.5
    assert math.isnan(pearson(np.zeros(4), np.arange(4.0))) and math.isnan(pearson(np.arange(4.0), np.ones(4)))


def synthetic_layer(n_neurons: int = 6, seed: int = 0) -> dict[int, FeatureRecords]:
    """Neuron n fires (with strength 1..3 by position parity) exactly on token id 100 + n."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(100, 120, (40, 64))
    acts = torch.zeros(40, 64, n_neurons)
    for n in range(n_neurons):
        acts[..., n] = torch.from_numpy((tokens == 100 + n) * 3.0)
    spec = CollectionConfig(blocks=40, block_length=64, window=16, windows="centered", top=10, random=10,
                            per_quantile=0, quantile_pool=0)
    collector = RecordCollector(spec, {0: np.arange(n_neurons)}, seed)
    for start in range(0, 40, 8):
        ids = np.arange(start, start + 8)
        collector.update(ids, tokens[ids], {0: acts[ids]})
    return group_records(collector.records(0), 0, [f"<{i}>" for i in range(200)])


def test_token_set_baseline_scores_100_on_token_neurons_and_0_with_shuffled_explanations():
    (group, _), = metric_groups("crate-paper", ["tar"])
    backend = build_tokenset(BackendConfig())
    tasks = [group.task(r) for r in synthetic_layer().values()]
    rows = [score_task(t, ("tar",), backend, 0)[0] for t in tasks]
    assert all(r["status"] == "scored" and r["score"] > 0.99 for r in rows)
    assert json.loads(rows[0]["explanation"].removeprefix("tokens ")) == [["<100>", 10.0]]
    for task, other in zip(tasks, tasks[1:] + tasks[:1]):
        explanation = backend.explainer.explain(other.explain, 0)
        simulated = backend.simulator.simulate(explanation, task.score).values
        score = pearson(np.concatenate([e.activations for e in task.score]), np.concatenate(simulated))
        assert math.isnan(score) or abs(score) < 0.3


def test_a_dead_neuron_is_undefined_and_malformed_explanations_fail():
    backend = build_tokenset(BackendConfig())
    (group, _), = metric_groups("crate-paper", ["tar", "random"], "rescore")
    dead = FeatureRecords(0, 1, top=[excerpt(f"top/{i}", focus_value=0.0) for i in range(10)],
                          random=[excerpt(f"random/{i}", focus_value=0.0) for i in range(10)], top_focus=[4] * 10)
    rows = score_task(group.task(dead), ("tar", "random"), backend, 0)
    assert [(r["metric"], r["status"], r["reason"]) for r in rows] == [
        ("tar", "undefined", "true activations are constant"), ("random", "undefined", "true activations are constant")]
    backend.explainer.explain = lambda excerpts, seed: "a cat detector"  # not a token set: the simulator refuses it
    row = score_task(group.task(full_records()), ("tar",), backend, 0)[0]
    assert row["status"] == "failed" and "not a token-set explanation" in row["reason"] and math.isnan(row["score"])


def result_rows(scores: dict[int, list], metric="tar", **extra) -> list[dict]:
    rows = []
    for layer, values in scores.items():
        for i, score in enumerate(values):
            status = "failed" if score == "x" else ("undefined" if score is None else "scored")
            rows.append({"model": "m", "features": "neurons", "layer": layer, "neuron": i, "protocol": "crate-paper",
                         "metric": metric, "backend": "tokenset", "prompt_version": PROMPT_VERSION, "seed": 0,
                         "score": score if isinstance(score, float) else float("nan"), "status": status, **extra})
    return rows


def test_summaries_count_nans_and_drop_the_last_layer_of_6_and_12_layer_models():
    table = pa.Table.from_pylist(result_rows({l: [0.1 * (l + 1), 0.3 * (l + 1), None, "x"] for l in range(6)}))
    layers = layer_summary(table)
    assert [(r["layer"], r["scored"], r["undefined"], r["failed"]) for r in layers][:2] == [(0, 2, 1, 1), (1, 2, 1, 1)]
    assert layers[0]["mean"] == pytest.approx(20.0) and layers[0]["std"] == pytest.approx(10.0)  # population std
    six, = model_summary(layers, n_layer=6)
    assert six["mean"] == pytest.approx(20 * 3.5) and six["mean_excl_last"] == pytest.approx(20 * 3.0)
    three, = model_summary([r for r in layers if r["layer"] < 3], n_layer=3)
    assert three["mean"] == three["mean_excl_last"] == pytest.approx(40.0)


def test_sampled_layers_get_a_finite_population_corrected_confidence_interval():
    table = pa.Table.from_pylist(result_rows({0: [0.1, 0.2, 0.3, 0.4]}))
    sampled, = layer_summary(table, {0: 100})
    complete, = layer_summary(table, {0: 4})
    t = 3.182446305284263  # t(0.975, 3)
    sample_std = math.sqrt(sum((x - 25.0) ** 2 for x in (10, 20, 30, 40)) / 3)
    assert sampled["ci95"] == pytest.approx(t * sample_std / 2 * math.sqrt(96 / 99))
    assert complete["ci95"] == 0.0


def full_row(**key) -> dict:
    row = {name: None for name in RESULTS_SCHEMA.names}
    row.update(result_rows({0: [0.5]})[0])
    row.update(key, created_at=0)
    return row


def test_result_store_appends_once_per_key_survives_torn_lines_and_locks(tmp_path):
    store = ResultStore(tmp_path)
    assert store.append([full_row(neuron=1), full_row(neuron=2), full_row(neuron=1)]) == 2
    store.compact()
    assert store.append([full_row(neuron=2, score=0.9), full_row(neuron=3)]) == 1
    with pytest.raises(ResultStoreLocked):
        ResultStore(tmp_path)
    store.close()
    with open(tmp_path / "results.wal.jsonl", "a") as f:
        f.write('{"model": "m", "trunc')  # a kill in the middle of a line
    reopened = ResultStore(tmp_path)
    table = reopened.table()
    assert sorted(table["neuron"].to_pylist()) == [1, 2, 3]
    assert table.filter(pa.compute.equal(table["neuron"], 2))["score"].to_pylist() == [0.5]  # first write wins
    reopened.compact()
    assert reopened.table().num_rows == 3 and (tmp_path / "results.wal.jsonl").stat().st_size == 0
    reopened.close()


def test_flags_become_overrides_and_bad_configs_name_the_field(tmp_path):
    from crate.cli import parse_config
    from crate.interp.config import FLAGS

    config, _ = parse_config(InterpConfig, "", ["--checkpoint", "c.pt", "--metric=tar,random", "seed=3",
                                                "--layers", "0,2", "--backend", "tokenset", "--sample", "5"], flags=FLAGS)
    assert (config.checkpoint, config.metrics, config.layers, config.backend.kind, config.seed, config.sample) == (
        "c.pt", ["tar", "random"], [0, 2], "tokenset", 3, 5)
    with pytest.raises(ConfigError, match="checkpoint"):
        InterpConfig()
    with pytest.raises(ConfigError, match="openai protocol scores"):
        InterpConfig(checkpoint="c.pt", protocol="openai", metrics=["anthropic"])
    with pytest.raises(ConfigError, match="divisible"):
        CollectionConfig(block_length=100, window=64, windows="fragments")
    with pytest.raises(ConfigError, match="explainer_model"):
        BackendConfig(kind="http")
    assert InterpConfig(checkpoint="c.pt", protocol="openai").records.windows == "fragments"
    assert InterpConfig(checkpoint="c.pt").records.windows == "stream"
