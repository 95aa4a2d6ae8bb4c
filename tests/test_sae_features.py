"""SAE features are a feature source of the interpretability pipeline: `--features sae:PATH` collects records
and scores SAE features exactly like neurons, and the results feed the comparison and the viewer."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from crate.config import load_config
from crate.errors import ConfigError
from crate.interp import InterpConfig, run_interpretability
from crate.interp.features import feature_source
from crate.model import build_model, save_model
from crate.results.compare import compare
from crate.results.tables import read_results
from crate.sae import SAEConfig, SAESource, SparseAutoencoder, save_sae

TEXT = ("The cat sat on the mat. A dog ran after the cat, and the cat ran up a tree. "
        "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A tiny CRATE checkpoint, an SAE on its layer 1 (random weights suffice for plumbing), a corpus."""
    root = tmp_path_factory.mktemp("sae-features")
    torch.manual_seed(0)
    model = build_model("crate-tiny")
    checkpoint = save_model(model, root / "crate.pt", mlflow_run_id="train-run", step=3)
    sae = SparseAutoencoder(SAEConfig(d_in=model.config.n_neurons, expansion=2))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # every feature fires somewhere, so records have something to show
    save_sae(sae, root / "sae.pt", SAESource(str(checkpoint), "crate", layer=1, model_run_id="train-run"))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": TEXT * (i % 5 + 1)}) + "\n" for i in range(40)))
    return root


def test_the_source_encodes_the_layer_it_was_trained_on(subject):
    model = build_model("crate-tiny")
    model.load_state_dict(torch.load(subject / "crate.pt", weights_only=True)["model"])
    source = feature_source(f"sae:{subject / 'sae.pt'}")
    assert source.kind == "sae" and source.n_features(model, 1) == 2 * model.config.n_neurons
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 50257, (2, 12)))
    with torch.no_grad(), model.capture_neurons([1]) as captured:
        model(tokens)
    features = source.activations(model, tokens, [1])[1]
    assert features.shape == (2, 12, 256) and torch.allclose(features, source.sae.encode(captured[1]))
    with pytest.raises(ValueError, match="--layers 1"):
        source.n_features(model, 0)
    with pytest.raises(ValueError, match="128 crate neurons"):
        source.n_features(build_model("gpt-tiny"), 1)
    with pytest.raises(ConfigError, match="no SAE checkpoint"):
        feature_source(f"sae:{subject / 'missing.pt'}")


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    return ray_cluster


@pytest.mark.integration
def test_sae_features_are_collected_scored_and_compared_like_neurons(cluster, subject, tmp_path):
    sae_spec = f"sae:{subject / 'sae.pt'}"
    base = {"checkpoint": str(subject / "crate.pt"), "corpus": str(subject / "corpus.jsonl"), "records.blocks": 8,
            "records.block_length": 64, "records.window": 16, "records.top": 10, "records.random": 10,
            "records.quantile_pool": 20, "records.per_quantile": 2, "records.batch_blocks": 4, "sample": 4,
            "layers": "[1]", "metrics": "[tar]", "tracking.enabled": "false"}
    for features, out in ((sae_spec, tmp_path / "sae"), ("neurons", tmp_path / "neurons")):
        overrides = [f"{k}={v}" for k, v in {**base, "features": features, "output_dir": out}.items()]
        run_interpretability(load_config(InterpConfig, None, overrides))
    rows = pq.read_table(tmp_path / "sae" / "results.parquet").to_pylist()
    assert len(rows) == 4 and {r["feature_kind"] for r in rows} == {"sae"} and {r["features"] for r in rows} == {sae_spec}
    assert all(0 <= r["neuron"] < 256 and r["layer"] == 1 for r in rows)
    assert sum(r["status"] == "scored" for r in rows) >= 1, [r["reason"] for r in rows]
    summary = compare(read_results([tmp_path / "sae", tmp_path / "neurons"])).summary
    assert set(zip(summary["feature_kind"], summary["rule"])) == {("sae", "paper"), ("sae", "all"),
                                                                  ("neurons", "paper"), ("neurons", "all")}
