"""The record collector core: exact selections on hand-built activations, windows at block edges, uniform random
samples, quantile bins, associative shard merges, statistics, the parquet/OpenAI formats, and proxy_score."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from crate.interp import proxy_score
from crate.interp.collect import RecordCollector, batched, collect
from crate.interp.config import CollectionConfig
from crate.interp.features import ModelNeurons
from crate.interp.records import export_openai, read_feature_records, write_records
from crate.model import build_model


def spec(**overrides) -> CollectionConfig:
    fields = dict(blocks=8, block_length=32, window=8, windows="centered", top=4, random=4, per_quantile=2,
                  quantile_pool=16, batch_blocks=2)
    return CollectionConfig(**{**fields, **overrides})


def run(acts: torch.Tensor, spec: CollectionConfig, shards=None, tokens=None, seed=0) -> RecordCollector:
    """Collect `acts` (blocks, T, N) in the given shards of block ids, merging left to right."""
    n_blocks, _, n = acts.shape
    tokens = np.arange(acts.shape[0] * acts.shape[1]).reshape(acts.shape[:2]) % 50000 if tokens is None else tokens
    merged = None
    for shard in shards or [list(range(n_blocks))]:
        collector = RecordCollector(spec, {0: np.arange(n)}, seed)
        for start in range(0, len(shard), spec.batch_blocks):
            ids = np.array(shard[start:start + spec.batch_blocks])
            collector.update(ids, tokens[ids], {0: acts[ids]})
        merged = collector if merged is None else merged.merge(collector)
    return merged


def rows_of(records: dict, kind: str, neuron: int) -> dict:
    mask = (records["kind"] == kind) & (records["neuron"] == neuron)
    order = np.argsort(records["rank"][mask], kind="stable")
    return {k: v[mask][order] for k, v in records.items()}


def canonical(records: dict) -> list:
    return sorted((int(n), str(k), int(r), int(b), int(bl), int(s), float(a), tuple(w.round(6)))
                  for n, k, r, b, bl, s, a, w in zip(records["neuron"], records["kind"], records["rank"], records["bin"],
                                                     records["block"], records["start"], records["activation"],
                                                     records["activations"]))


def test_top_records_are_exact_with_ties_broken_by_stream_position():
    torch.manual_seed(0)
    acts = torch.randint(0, 4, (6, 32, 3)).float()  # few distinct values: many ties
    acts[..., 2] = 0.0  # a dead feature: every unit ties
    s = spec(blocks=6, top=5)
    records = run(acts, s).records(0)
    flat = acts.reshape(-1, 3)
    for n in range(3):
        expected = sorted(range(flat.shape[0]), key=lambda p: (-flat[p, n].item(), p))[:5]
        top = rows_of(records, "top", n)
        assert list(top["block"] * 32 + top["start"] + top["focus"]) == expected
        assert list(top["rank"]) == list(range(5))
        assert np.allclose(top["activation"], flat[expected, n].numpy())


def test_windows_shift_to_stay_inside_their_block_and_carry_tokens_and_activations():
    acts = torch.zeros(4, 32, 2)
    acts[1, 0, 0], acts[2, 31, 0], acts[3, 16, 0] = 9.0, 8.0, 7.0  # block start, block end, middle
    acts[:, :, 1] = torch.arange(4 * 32, dtype=torch.float32).reshape(4, 32)
    tokens = np.random.default_rng(0).integers(0, 50000, (4, 32))
    records = run(acts, spec(blocks=4, top=3), tokens=tokens).records(0)
    top = rows_of(records, "top", 0)
    assert list(zip(top["block"], top["start"], top["focus"])) == [(1, 0, 0), (2, 24, 7), (3, 12, 4)]
    for i in range(len(records["block"])):
        block, start = records["block"][i], records["start"][i]
        assert len(records["tokens"][i]) == 8
        assert (records["tokens"][i] == tokens[block, start:start + 8]).all()
        assert np.array_equal(records["activations"][i], acts[block, start:start + 8, records["neuron"][i]].numpy())


def test_fragments_are_aligned_windows_ranked_by_their_max():
    torch.manual_seed(1)
    acts = torch.rand(4, 32, 2)
    records = run(acts, spec(blocks=4, windows="fragments", top=3)).records(0)
    fragment_max = acts.reshape(4, 4, 8, 2).amax(2).reshape(16, 2)
    for n in range(2):
        top = rows_of(records, "top", n)
        expected = torch.argsort(fragment_max[:, n], descending=True)[:3].numpy()
        assert list(top["block"] * 4 + top["start"] // 8) == list(expected)
        assert (top["start"] % 8 == 0).all()
        assert np.allclose(top["activations"].max(axis=1), top["activation"])
        assert list(top["focus"]) == list(top["activations"].argmax(axis=1))


def test_random_samples_are_uniform_without_replacement_and_ignore_activations():
    n_blocks, T, n = 16, 32, 400
    acts = torch.zeros(n_blocks, T, n)
    acts[:4] = 5.0  # activation must not attract random samples
    records = run(acts, spec(blocks=n_blocks, random=8, per_quantile=0, quantile_pool=0, top=1)).records(0)
    random = {k: v[records["kind"] == "random"] for k, v in records.items()}
    units = random["block"] * T + random["start"] + random["focus"]
    per_feature = [units[random["neuron"] == f] for f in range(n)]
    assert all(len(u) == 8 and len(set(u)) == 8 for u in per_feature)  # without replacement
    position_counts = np.bincount(units % T, minlength=T)  # no edge bias inside blocks
    block_counts = np.bincount(units // T, minlength=n_blocks)  # no bias towards active or early blocks
    assert stats.chisquare(position_counts).pvalue > 1e-3
    assert stats.chisquare(block_counts).pvalue > 1e-3
    assert list(random["rank"][random["neuron"] == 0]) == list(range(8))


def test_merging_shards_in_any_order_equals_one_pass_with_any_batch_size():
    torch.manual_seed(2)
    acts = torch.relu(torch.randn(12, 32, 5)).round(decimals=1)
    one_pass = canonical(run(acts, spec(blocks=12, batch_blocks=5)).records(0))
    shards = [[0, 3, 6, 9], [1, 4, 7, 10, 11], [2, 5, 8]]
    left = run(acts, spec(blocks=12, batch_blocks=2), shards).records(0)  # (a ∪ b) ∪ c
    a, b, c = (run(acts, spec(blocks=12, batch_blocks=3), [s]) for s in shards)
    right = a.merge(b.merge(c)).records(0)  # a ∪ (b ∪ c)
    assert canonical(left) == one_pass
    assert canonical(right) == one_pass
    with pytest.raises(ValueError, match="both saw blocks"):
        run(acts, spec(blocks=12), [[0, 1]]).merge(run(acts, spec(blocks=12), [[1, 2]]))


def test_quantile_bins_hold_samples_of_the_right_activation_ranks():
    T, n_blocks = 32, 8
    values = torch.randperm(n_blocks * T).float().reshape(n_blocks, T, 1)  # distinct values 0..255
    s = spec(blocks=n_blocks, random=4, quantile_pool=252, per_quantile=3, quantile_edges=[0.0, 0.5, 0.9, 1.0])
    records = run(values, s).records(0)  # the pool holds every unit: bins are exact ranks
    quantile = {k: v[records["kind"] == "quantile"] for k, v in records.items()}
    for b, (lo, hi) in enumerate([(0, 0.5), (0.5, 0.9), (0.9, 1.0)]):
        in_bin = quantile["activation"][quantile["bin"] == b]
        assert len(in_bin) == 3
        assert ((in_bin + 0.5) / 256 >= lo).all() and ((in_bin + 0.5) / 256 < hi).all()
    random_units = set(zip(*(v[records["kind"] == "random"] for v in (records["block"], records["start"]))))
    assert not random_units & set(zip(quantile["block"], quantile["start"]))  # bins exclude the random records


def test_statistics_match_numpy():
    torch.manual_seed(3)
    acts = torch.relu(torch.randn(6, 32, 4))
    collector = run(acts, spec(blocks=6))
    s = collector.layers[0].statistics()
    flat = acts.reshape(-1, 4).double().numpy()
    assert np.allclose(s["mean"], flat.mean(0)) and np.allclose(s["variance"], flat.var(0))
    assert np.allclose(s["density"], (flat > 0).mean(0)) and np.allclose(s["max"], flat.max(0))
    assert s["quantile_boundaries"].shape == (4, 6) and (np.diff(s["quantile_boundaries"], axis=1) >= 0).all()


def test_records_round_trip_through_parquet_and_export_to_openai_json(tmp_path):
    torch.manual_seed(4)
    acts = torch.relu(torch.randn(8, 32, 3))
    collector = run(acts, spec(), tokens=np.full((8, 32), 464))  # GPT-2 token "The"
    write_records(collector, tmp_path / "records", {"checkpoint": "x.pt"})
    features = read_feature_records(tmp_path / "records", 0)
    assert sorted(features) == [0, 1, 2]
    f = features[1]
    assert len(f.top) == 4 and len(f.random) == 4
    assert [e.ref for e in f.quantiles[0]] == ["quantile/0/0", "quantile/0/1"]  # a pool of 16 fills the wide bins
    assert f.top[0].tokens[0] == "The" and f.top[0].ref == "top/0" and f.random[2].ref == "random/2"
    assert f.top[0].activations.max() == pytest.approx(float(acts[..., 1].max()))
    paths = list(export_openai(tmp_path / "records", tmp_path / "openai"))
    record = json.loads((tmp_path / "openai" / "0" / "1.json").read_text())
    assert len(paths) == 3 and record["dataclass_name"] == "NeuronRecord"
    assert record["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 0, "neuron_index": 1}
    top = record["most_positive_activation_records"][0]
    assert top["dataclass_name"] == "ActivationRecord" and len(top["tokens"]) == len(top["activations"]) == 8
    assert len(record["quantile_boundaries"]) == 6 and record["mean"] == pytest.approx(float(acts[..., 1].mean()), rel=1e-5)


def test_collecting_a_subset_of_features_gives_the_same_records_as_all_features():
    torch.manual_seed(5)
    model = build_model("crate-tiny")
    blocks = np.random.default_rng(5).integers(0, 50257, (6, 64))
    s = spec(blocks=6, block_length=64, window=16, batch_blocks=4)
    everything = collect(model, batched(blocks, 4), s, ModelNeurons(), {1: np.arange(128)}, seed=3).records(1)
    subset = collect(model, batched(blocks, 4), s, ModelNeurons(), {1: np.array([7, 99])}, seed=3).records(1)
    keep = np.isin(everything["neuron"], [7, 99])
    assert canonical({k: v[keep] for k, v in everything.items()}) == canonical(subset)


def test_proxy_score_reports_every_layer_deterministically():
    torch.manual_seed(6)
    model = build_model("crate-tiny")
    blocks = np.random.default_rng(6).integers(0, 1000, (16, 64))
    first = proxy_score(model, blocks, neurons_per_layer=16, seed=1)
    assert set(first) == {"proxy_tar/layer_0", "proxy_tar/layer_1", "proxy_tar/mean", "proxy_tar/undefined"}
    assert -100 <= first["proxy_tar/mean"] <= 100
    assert proxy_score(model, torch.as_tensor(blocks), neurons_per_layer=16, seed=1) == first
