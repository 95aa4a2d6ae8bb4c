"""Steering moves the next-token distribution the way a neuron's output weights say it must."""

import json

import pytest
import torch
import torch.nn.functional as F

from crate.errors import ConfigError
from crate.config import load_config
from crate.model import build_model, save_model
from crate.results.steering import (SteerConfig, format_effect, next_token_probs, run_steering, steering_effect,
                            steering_effects)
from crate.tokenizer import gpt2_tokenizer

PROMPT = "1 2 3 4 5"
NEURON = 7


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def wired_model(arch: str, token_id: int) -> torch.nn.Module:
    """A tiny model whose neuron NEURON of the last layer writes token `token_id`'s embedding direction:
    GPT through its MLP output column, CRATE through its dictionary atom (D's column = Dᵀ's row). The token's
    (tied) embedding gets norm 5 so that a residual stream along it makes the token likely (logit ≈ 5·√d)."""
    torch.manual_seed(0)
    model = build_model(f"{arch}-tiny").eval()
    last = model.transformer.h[-1]
    with torch.no_grad():
        direction = model.transformer.wte.weight[token_id] / model.transformer.wte.weight[token_id].norm()
        model.transformer.wte.weight[token_id] = 5 * direction
        if arch == "gpt":
            last.mlp.c_proj.weight[:, NEURON] = direction
        else:
            last.ista.weight[NEURON] = direction
    return model


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_clamping_a_neuron_that_writes_a_token_raises_that_token(arch, tokenizer):
    target = tokenizer.encode(" banana")[0]
    model = wired_model(arch, target)
    layer = model.config.n_layer - 1
    effect = steering_effect(model, tokenizer, PROMPT, layer, NEURON, value=50.0, top_tokens=5, new_tokens=4)
    assert effect.increased[0].token_id == target
    assert effect.increased[0].after > 0.5 > effect.increased[0].before
    assert all(shift.delta < 0 for shift in effect.decreased)
    assert effect.kl_divergence > 0.5
    assert effect.steered_generation == " banana" * 4
    # the clamp is gone afterwards: the distribution is the original one again
    after = next_token_probs(model, torch.tensor([tokenizer.encode(PROMPT)]), tokenizer.n_vocab)
    assert after[target].item() == pytest.approx(effect.increased[0].before, rel=1e-6)
    text = format_effect(effect)
    assert "' banana'" in text and "most increased" in text


def test_a_sweep_shows_the_effect_growing_with_the_clamp_value(tokenizer):
    target = tokenizer.encode(" banana")[0]
    model = wired_model("gpt", target)
    effects = steering_effects(model, tokenizer, PROMPT, 1, [NEURON], [0.0, 5.0, 20.0, 50.0], top_tokens=3,
                               new_tokens=0)
    kls = [e.kl_divergence for e in effects]
    probs = [e.sweep_tokens[0].after for e in effects]
    assert effects[0].sweep_tokens[0].token_id == target
    assert kls == sorted(kls) and kls[0] == pytest.approx(0.0, abs=1e-6)
    assert probs == sorted(probs)


def test_the_job_writes_tables_and_a_sweep_plot(tmp_path, tokenizer):
    target = tokenizer.encode(" banana")[0]
    checkpoint = save_model(wired_model("crate", target), tmp_path / "crate.pt")
    config = load_config(SteerConfig, {
        "checkpoint": str(checkpoint), "layer": 1, "neurons": [NEURON], "sweep": [1.0, 50.0], "new_tokens": 3,
        "output_dir": str(tmp_path / "out"), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db",
                                                         "system_metrics": False}})
    effects = run_steering(config)
    assert len(effects) == 2
    printed = "\n\n".join(map(format_effect, effects))  # what jobs/steer.py prints
    assert "' banana'" in printed and "steered:" in printed
    rows = json.loads((tmp_path / "out" / "steering.json").read_text())
    assert rows[1]["increased"][0]["token_id"] == target and rows[1]["increased"][0]["delta"] > 0.5
    shifts = sum(len(e.increased) + len(e.decreased) for e in effects)
    assert (tmp_path / "out" / "steering.csv").read_text().count("\n") == 1 + shifts
    assert len(effects[1].increased) == 1 and len(effects[1].decreased) == 10  # only the token rises at 50
    assert (tmp_path / "out" / f"sweep-layer1-neuron{NEURON}.png").stat().st_size > 0
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("crate-lm").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "steering")} >= {
        "steering/steering.json", "steering/steering.csv", f"steering/sweep-layer1-neuron{NEURON}.png"}


@pytest.mark.parametrize("fields, bad", [
    ({"neurons": [1], "layer": 0}, "value"),
    ({"value": 1.0, "layer": 0}, "neurons"),
    ({"value": 1.0, "neurons": [1]}, "layer"),
    ({"value": 1.0, "top_explained": 3}, "results"),
])
def test_incomplete_requests_fail_before_any_work(fields, bad):
    with pytest.raises(ConfigError) as error:
        load_config(SteerConfig, {"checkpoint": "model.pt", **fields})
    assert error.value.field == bad


def test_top_explained_steers_the_best_scored_neurons_of_a_results_table(tmp_path, tokenizer):
    from test_compare import write_results

    target = tokenizer.encode(" banana")[0]
    checkpoint = save_model(wired_model("gpt", target), tmp_path / "gpt.pt")
    base = {"model": "gpt-tiny", "features": "neurons", "protocol": "crate-paper", "metric": "tar",
            "backend": "token-set", "prompt_version": "v1", "seed": 0, "status": "scored", "feature_kind": "neurons",
            "arch": "gpt", "n_layer": 2}
    rows = [{**base, "layer": 1, "neuron": NEURON, "score": 0.9, "explanation": "bananas"},
            {**base, "layer": 0, "neuron": 3, "score": 0.5, "explanation": "digits"},
            {**base, "layer": 0, "neuron": 4, "score": float("nan"), "status": "undefined"},
            {**base, "layer": 1, "neuron": 5, "score": 0.99, "feature_kind": "sae", "features": "sae:x.pt"},
            {**base, "layer": 0, "neuron": 6, "score": 0.1}]
    results = write_results(tmp_path / "results.parquet", rows)
    config = load_config(SteerConfig, {"checkpoint": str(checkpoint), "top_explained": 2, "results": str(results),
                                       "value": 50.0, "new_tokens": 0, "output_dir": str(tmp_path / "out"),
                                       "tracking": {"enabled": False}})
    effects = run_steering(config)
    assert [(e.layer, e.neurons, e.explanation) for e in effects] == [(1, [NEURON], "bananas"), (0, [3], "digits")]
    assert effects[0].increased[0].token_id == target
    assert effects[0].checkpoint == str(checkpoint.resolve())


# ---- the released code's variants (issue 15.6): every layer, and CRATE's attention channel ----------------
def hand_forward(model, idx, gpt_neuron=None, attn=None):
    """The logits computed with the model's modules, no hooks: GPT with neuron `gpt_neuron` = (i, v) clamped
    in every layer's MLP hidden units (the released gpt.py); CRATE with `attn` = (layer, channel, v) clamped in
    that layer's tied q=k=v projection before it is split into heads (crate_overcomplete.py's 'attn')."""
    B, T = idx.shape
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))
    for l, block in enumerate(model.transformer.h):
        if model.config.arch == "gpt":
            x = x + block.attn(block.ln_1(x))
            hidden = block.mlp.act(block.mlp.c_fc(block.ln_2(x)))
            hidden[..., gpt_neuron[0]] = gpt_neuron[1]
            x = x + block.mlp.c_proj(hidden)
        else:
            attention = block.attn
            if l == attn[0]:
                qkv = attention.c_attn(block.ln_1(x))
                qkv[..., attn[1]] = attn[2]
                u = qkv.view(B, T, attention.n_head, -1).transpose(1, 2)
                y = F.scaled_dot_product_attention(u, u, u, is_causal=True).transpose(1, 2).reshape(B, T, -1)
                x = x + attention.c_proj(y)
            else:
                x = x + attention(block.ln_1(x))
            x = block.ista(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x))


def test_layers_all_clamps_the_neuron_in_every_layer_as_the_released_gpt_code():
    model = wired_model("gpt", 100)
    idx = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        expected = hand_forward(model, idx, gpt_neuron=(NEURON, 3.0))
        with model.steer("all", NEURON, 3.0):
            steered, _ = model(idx)
        with model.steer(1, NEURON, 3.0):
            last_only, _ = model(idx)
    assert torch.equal(steered, expected)
    assert (steered - last_only).abs().max() > 1e-3  # layer 0's clamp matters


def test_site_attn_clamps_a_channel_of_cratess_tied_qkv_projection():
    model = wired_model("crate", 100)
    idx = torch.randint(0, 50257, (1, 9))
    channel = 21  # head 1, dimension 5 of crate-tiny's 2 heads of 16
    with torch.no_grad():
        expected = hand_forward(model, idx, attn=(0, channel, 4.0))
        plain, _ = model(idx)
        with model.steer(0, channel, 4.0, site="attn"):
            steered, _ = model(idx)
    assert torch.equal(steered, expected)
    assert (steered - plain).abs().max() > 1e-3


def test_site_attn_on_gpt_and_out_of_range_channels_are_refused(tokenizer):
    with pytest.raises(ConfigError) as error:
        steering_effect(wired_model("gpt", 100), tokenizer, PROMPT, 0, 1, 1.0, site="attn")
    assert error.value.field == "site" and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"no attention channel \[32\] in layer 0"):
        steering_effect(wired_model("crate", 100), tokenizer, PROMPT, 0, 32, 1.0, site="attn")


def test_the_job_steers_every_layer_and_the_attention(tmp_path, tokenizer):
    target = tokenizer.encode(" banana")[0]
    checkpoint = save_model(wired_model("crate", target), tmp_path / "crate.pt")
    common = {"checkpoint": str(checkpoint), "neurons": [NEURON], "value": 50.0, "new_tokens": 0,
              "tracking": {"enabled": False}}
    every = run_steering(load_config(SteerConfig, {**common, "layers": "all", "output_dir": str(tmp_path / "a")}))
    assert every[0].layer == "all" and every[0].increased[0].token_id == target
    attn = run_steering(load_config(SteerConfig, {**common, "layer": 0, "site": "attn",
                                                  "output_dir": str(tmp_path / "b")}))
    assert attn[0].site == "attn" and "attention channel" in format_effect(attn[0])
    rows = json.loads((tmp_path / "b" / "steering.json").read_text())
    assert rows[0]["site"] == "attn" and rows[0]["layer"] == 0
    gpt = save_model(wired_model("gpt", target), tmp_path / "gpt.pt")
    with pytest.raises(ConfigError, match="site"):
        run_steering(load_config(SteerConfig, {**common, "checkpoint": str(gpt), "layer": 0, "site": "attn",
                                               "output_dir": str(tmp_path / "c")}))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("fields, bad", [
    ({"neurons": [1], "value": 1.0, "layer": 0, "layers": "all"}, "layers"),
    ({"value": 1.0, "top_explained": 2, "results": "r.parquet", "site": "attn"}, "site"),
    ({"neurons": [1], "value": 1.0, "layer": 0, "site": "mlp"}, "site"),
])
def test_variant_requests_that_make_no_sense_fail_before_any_work(fields, bad):
    with pytest.raises(ConfigError) as error:
        load_config(SteerConfig, {"checkpoint": "model.pt", **fields})
    assert error.value.field == bad
