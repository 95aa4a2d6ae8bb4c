"""Any model's features through the same pipeline (issue 17 §6-7): a local Hugging Face causal LM as the subject
(a tiny random GPT-2 saved with save_pretrained, no hub), its MLP neurons scored under both protocols and compared
in Table 2 beside our CRATE and GPT; any hook point of our models as a feature source, directly or through an SAE
trained, evaluated and scored there. Single-process (scoring in the driver, `workers.actors=0`), tiny models."""

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from crate.config import load_config
from crate.errors import ConfigError
from crate.interop import hf_tokenizer, to_gpt2
from crate.interp import InterpConfig, run_interpretability
from crate.interp.features import feature_source
from crate.interp.subject import Subject, model_sha256, subject_model
from crate.model import build_model, save_model
from crate.results.compare import compare, render_markdown
from crate.results.tables import read_results
from crate.sae import SAEConfig, SparseAutoencoder, evaluate_sae, load_sae
from crate.sae.activations import LayerActivations
from crate.sae.job import TrainSAEConfig

_spec = importlib.util.spec_from_file_location("train_sae_job", Path(__file__).parents[1] / "jobs" / "train_sae.py")
train_sae_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_sae_job)

TEXT = ("The cat sat on the mat. A dog ran after the cat, and the cat ran up a tree. "
        "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n")
RESID = "blocks.{l}.hook_resid_post"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our tiny CRATE and GPT checkpoints, a tiny random GPT-2 directory with GPT-2's tokenizer, two corpora."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    save_model(build_model("crate-tiny"), root / "crate.pt", mlflow_run_id="run-c", run_name="crate-tiny", step=1)
    save_model(build_model("gpt-tiny"), root / "gpt.pt", mlflow_run_id="run-g", run_name="gpt-tiny", step=1)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(root / "gpt2-random")
    hf_tokenizer().save_pretrained(root / "gpt2-random")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": TEXT * (i % 5 + 1)}) + "\n" for i in range(40)))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": TEXT[::-1] * (i + 1)}) + "\n" for i in range(8)))
    return root


def job(models, out, **extra) -> InterpConfig:
    base = {"checkpoint": models / "crate.pt", "corpus": models / "corpus.jsonl", "output_dir": out,
            "records.blocks": 12, "records.window": 16, "records.top": 20, "records.random": 15,
            "records.quantile_pool": 20, "records.per_quantile": 2, "records.batch_blocks": 4, "sample": 4,
            "metrics": "[tar]", "workers.actors": 0, "tracking.enabled": "false", **extra}
    return load_config(InterpConfig, None, [f"{k}={v}" for k, v in base.items()])


def tokens(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(0))


def test_a_hugging_face_gpt2_is_read_at_its_mlp_neurons_as_our_gpt_is_at_its_own(models, tmp_path):
    native = build_model("gpt-tiny", activation="relu")
    to_gpt2(native).save_pretrained(tmp_path / "exported")  # the same weights as a stock GPT-2
    subject = Subject.load(str(tmp_path / "exported"))
    source = feature_source("neurons")
    assert (subject.model.arch, subject.model.n_layer, subject.model.context) == ("gpt2", 2, 64)
    assert source.n_features(subject.model, 1) == 128
    theirs, ours = source.activations(subject.model, tokens(), [0, 1]), source.activations(native, tokens(), [0, 1])
    for layer in (0, 1):
        torch.testing.assert_close(theirs[layer], ours[layer], rtol=1e-5, atol=1e-5)
    # the identity covers the Hugging Face weights: one changed weight, another model_sha256
    assert subject.sha256 == model_sha256(subject.model.inner)
    with torch.no_grad():
        subject.model.inner.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    assert model_sha256(subject.model.inner) != subject.sha256


def test_any_hook_point_of_our_models_is_a_feature_source_read_without_the_rest_of_the_model(models):
    model = build_model("crate-tiny")
    _, cache = model.run_with_cache(tokens())
    for site, width in (("blocks.{l}.ista.hook_dtx", 128), (RESID, 32), ("blocks.{l}.attn.hook_z", 32)):
        source = feature_source(f"hook:{site}")
        assert source.kind == f"hook:{site}" and source.n_features(model, 1) == width
        features = source.activations(model, tokens(), [0, 1])
        for layer in (0, 1):
            expected = cache[site.replace("{l}", str(layer))]
            torch.testing.assert_close(features[layer], expected.reshape(*expected.shape[:2], -1))
    head_calls = []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    later_block = []
    model.transformer.h[1].register_forward_hook(lambda *args: later_block.append(1))
    feature_source("hook:blocks.{l}.ista.hook_dtx").activations(model, tokens(), [0])
    assert head_calls == [] and later_block == []  # the forward stops once every site has fired
    with pytest.raises(ConfigError, match="no hook point 'blocks.1.nothing'"):
        subject_model(model).read(tokens(), ["blocks.0.hook_resid_post", "blocks.1.nothing"])
    assert not any(point._forward_hooks for point in model.hook_dict.values())  # the first site's hook is gone too


def test_bad_sources_are_refused_with_one_line_naming_the_problem_before_any_work(models, tmp_path):
    at_load = {"hook:blocks.1.hook_resid_post": "must hold {l} exactly once", "hook:x.{l}.{l}": "exactly once",
               "neuron": "unknown feature source 'neuron'", "neurons:3": "takes no argument",
               f"sae:{tmp_path / 'missing.pt'}": "no SAE checkpoint at"}
    for spec, says in at_load.items():
        with pytest.raises(ConfigError, match=says) as error:
            job(models, tmp_path / "out", features=spec)
        assert error.value.field == "features" and "\n" not in str(error.value)
    at_start = {"checkpoint": {"checkpoint": tmp_path / "no-such-model"},
                "features": {"features": "hook:blocks.{l}.ista.hook_nothing"}}
    for field, bad in at_start.items():
        with pytest.raises(ConfigError) as error:
            run_interpretability(job(models, tmp_path / field, **bad))
        assert error.value.field == field and "\n" not in str(error.value), error.value
        assert not (tmp_path / field).exists()
    with pytest.raises(ConfigError, match="no module 'transformer.h.0.mlp.nothing'.*transformer.h.0.mlp.act"):
        run_interpretability(job(models, tmp_path / "hf", checkpoint=models / "gpt2-random",
                                 features="hook:transformer.h.{l}.mlp.nothing"))
    with pytest.raises(ConfigError, match="site"):
        TrainSAEConfig(checkpoint="m.pt", layer=0, site="blocks.0.hook_resid_post")


def test_gpt2_neurons_are_scored_under_both_protocols_and_compared_beside_crate_and_gpt(models, tmp_path):
    runs = {"gpt2-crate-paper": {"checkpoint": models / "gpt2-random"},
            "gpt2-openai": {"checkpoint": models / "gpt2-random", "protocol": "openai"},
            "crate": {}, "crate-dtx": {"features": "hook:blocks.{l}.ista.hook_dtx"},
            "gpt": {"checkpoint": models / "gpt.pt"}}
    for name, extra in runs.items():
        run_interpretability(job(models, tmp_path / name, **extra))
    rows = pq.read_table(tmp_path / "gpt2-openai" / "results.parquet").to_pylist()
    assert {(r["arch"], r["feature_kind"], r["protocol"]) for r in rows} == {("gpt2", "neurons", "openai")}
    assert len(rows) == 2 * 4 and all(0 <= r["neuron"] < 128 for r in rows)
    assert sum(r["status"] == "scored" for r in rows) >= 1, [r["reason"] for r in rows]
    assert rows[0]["checkpoint"] == str(models / "gpt2-random") and rows[0]["model"].startswith("gpt2-random-")
    comparison = compare(read_results([tmp_path / name for name in runs]))
    series = set(zip(comparison.summary["arch"], comparison.summary["feature_kind"], comparison.summary["protocol"]))
    assert series == {("gpt2", "neurons", "crate-paper"), ("gpt2", "neurons", "openai"), ("crate", "neurons", "crate-paper"),
                      ("crate", "hook:blocks.{l}.ista.hook_dtx", "crate-paper"), ("gpt", "neurons", "crate-paper")}
    table = render_markdown(comparison)
    assert "| gpt2-random-" in table and "crate-tiny@1@blocks.{l}.ista.hook_dtx" in table
    assert set(comparison.improvements["crate"]) == {"crate-tiny@1"}  # CRATE against our GPT only


def test_an_sae_on_the_residual_stream_is_evaluated_there_trained_by_the_job_and_scored_like_neurons(models, tmp_path):
    model = build_model("crate-tiny")
    model.load_state_dict(torch.load(models / "crate.pt", weights_only=True)["model"])
    d = model.config.n_embd
    exact = SparseAutoencoder(SAEConfig(d_in=d, expansion=2))  # f = (ReLU(x), ReLU(-x)), x̂ = f·[I; -I] = x
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        exact.W_dec.copy_(exact.W_enc)
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    assert next(iter(LayerActivations(model, 0, [tokens()], RESID))).shape == (2 * 12, d)
    evaluation = evaluate_sae(model, 0, exact, tokens(4, 17).split(2), RESID)  # spliced in at the stream
    assert evaluation.mse < 1e-10 and evaluation.loss_recovered == pytest.approx(1.0)
    assert evaluation.loss_zero_ablated != pytest.approx(evaluation.loss_clean)

    argv = ["--checkpoint", str(models / "crate.pt"), "--layer", "0", "--site", RESID, "--output-dir",
            str(tmp_path / "train"), f"data.train={models / 'corpus.jsonl'}", f"data.val={models / 'val.jsonl'}",
            "data.context=16", "eval_blocks=4", "sae.expansion=2", "sae.batch_size=64", "sae.buffer_size=256",
            "sae.resample_at=[]", "tracking.enabled=false", "--steps", "10"]
    with pytest.raises(ConfigError, match="no hook point 'blocks.0.hook_nothing'") as error:
        train_sae_job.main([*argv, "--site", "blocks.{l}.hook_nothing"])
    assert error.value.field == "site"
    train_sae_job.main(argv)
    sae, source = load_sae(tmp_path / "train" / "sae.pt")
    assert (source.site, source.layer, sae.config.n_features) == (RESID, 0, 2 * d)
    assert 0 <= sae.checkpoint_metrics["eval/fvu"] and "eval/loss_recovered" in sae.checkpoint_metrics
    for name, extra in (("sae", {"features": f"sae:{tmp_path / 'train' / 'sae.pt'}"}), ("neurons", {})):
        run_interpretability(job(models, tmp_path / name, layers="[0]", **extra))
    rows = pq.read_table(tmp_path / "sae" / "results.parquet").to_pylist()
    assert {r["feature_kind"] for r in rows} == {f"sae:{RESID}"} and all(0 <= r["neuron"] < 2 * d for r in rows)
    assert sum(r["status"] == "scored" for r in rows) >= 1, [r["reason"] for r in rows]
    assert f"crate-tiny@1+SAE@{RESID}" in render_markdown(compare(read_results([tmp_path / "sae", tmp_path / "neurons"])))


@pytest.mark.integration  # Ray actors load the Hugging Face directory themselves
def test_ray_actors_collect_and_score_a_hugging_face_model_as_the_driver_alone_does(ray_cluster, models, tmp_path):
    alone = run_interpretability(job(models, tmp_path / "alone", checkpoint=models / "gpt2-random"))
    actors = run_interpretability(job(models, tmp_path / "actors", checkpoint=models / "gpt2-random",
                                      **{"workers.collect_actors": 2, "workers.actors": 1}))
    assert actors["model_sha256"] == alone["model_sha256"]
    scores = {name: sorted((r["layer"], r["neuron"], r["score"]) for r in
                           pq.read_table(tmp_path / name / "results.parquet").to_pylist()) for name in ("alone", "actors")}
    assert scores["actors"] == scores["alone"] and len(scores["alone"]) == 2 * 4
