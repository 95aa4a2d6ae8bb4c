"""Hook points: TransformerLens's names and semantics on both architectures, and no cost when unused."""

import sys

import pytest
import torch
import torch.nn.functional as F

import crate.model.hooks
from crate.model import build_model

TRANSFORMER_LENS = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"] + [
    f"blocks.{l}.{name}" for l in range(2) for name in (
        "hook_resid_pre", "ln1.hook_normalized", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
        "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")]
OWN = {
    "gpt": ["attn.hook_q", "attn.hook_k", "attn.hook_v"],
    "crate": ["attn.hook_qkv", "ista.hook_dtx", "ista.hook_pre_1", "ista.hook_code_1", "ista.hook_pre_2",
              "ista.hook_code_2", "ista.hook_recon"],
}


def tiny(arch):
    torch.manual_seed(0)
    return build_model(f"{arch}-tiny").eval()


@pytest.fixture
def idx():
    torch.manual_seed(1)
    return torch.randint(0, 50257, (2, 8))


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_every_transformer_lens_name_and_the_architectures_own(arch):
    model = tiny(arch)
    own = [f"blocks.{l}.{name}" for l in range(2) for name in OWN[arch]]
    assert sorted(model.hook_dict) == sorted(TRANSFORMER_LENS + own)
    if arch == "crate":  # TransformerLens's MLP names are aliases of the ISTA block's
        assert model.hook_dict["blocks.1.mlp.hook_post"] is model.hook_dict["blocks.1.ista.hook_code_2"]
        assert model.hook_dict["blocks.1.mlp.hook_pre"] is model.hook_dict["blocks.1.ista.hook_pre_2"]
        assert model.hook_dict["blocks.1.hook_mlp_out"] is model.hook_dict["blocks.1.ista.hook_recon"]
        assert model.hook_dict["blocks.1.mlp.hook_post"].name == "blocks.1.ista.hook_code_2"
    assert model.neuron_module(1) is model.hook_dict["blocks.1.mlp.hook_post"]


def test_a_forward_without_hooks_runs_no_hook_callback(idx):
    """Only the identity forwards of the hook points run: a profiler sees no other function of hooks.py."""
    model = tiny("crate")
    hooks_file = crate.model.hooks.__file__
    called = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == hooks_file:
            called.append(frame.f_code.co_name)

    counter = []
    with torch.no_grad():
        model.run_with_hooks(idx, [(lambda name: True, lambda act, hook: counter.append(hook.name))])
        assert len(counter) == len(set(map(id, model.hook_dict.values())))  # once per hook point
        sys.setprofile(profile)
        try:
            model(idx)
        finally:
            sys.setprofile(None)
    assert set(called) == {"forward"} and len(counter) == len(set(map(id, model.hook_dict.values())))
    assert all(not point._forward_hooks for point in model.hook_dict.values())


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_the_cache_holds_the_activations_the_modules_compute(arch, idx):
    model = tiny(arch)
    with torch.no_grad():
        plain, _ = model(idx)
        logits, cache = model.run_with_cache(idx)
        block = model.transformer.h[1]
        assert torch.equal(logits, plain)
        assert torch.equal(cache["hook_embed"] + cache["hook_pos_embed"], cache["blocks.0.hook_resid_pre"])
        assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
        resid_mid = cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"]
        assert torch.equal(cache["blocks.1.hook_resid_mid"], resid_mid)
        assert torch.equal(cache["blocks.1.ln2.hook_normalized"], block.ln_2(resid_mid))
        assert torch.equal(cache["ln_final.hook_normalized"], model.transformer.ln_f(cache["blocks.1.hook_resid_post"]))
        assert cache["blocks.1.attn.hook_z"].shape == (2, 8, 2, 16)  # (B, T, heads, d_head)
        assert cache["hook_pos_embed"].shape == (2, 8, 32)
        neurons = cache["blocks.1.mlp.hook_post"]
        assert neurons.shape == (2, 8, model.config.n_neurons)
        if arch == "crate":
            x = cache["blocks.1.ln2.hook_normalized"]
            assert torch.equal(cache["blocks.1.ista.hook_dtx"], F.linear(x, block.ista.weight))
            assert torch.equal(cache["blocks.1.ista.hook_code_1"], F.relu(cache["blocks.1.ista.hook_pre_1"]))
            assert torch.equal(neurons, F.relu(cache["blocks.1.mlp.hook_pre"]))
            assert torch.equal(cache["blocks.1.ista.hook_recon"], F.linear(neurons, block.ista.weight.t()))
            assert torch.equal(cache["blocks.1.hook_resid_post"], cache["blocks.1.ista.hook_recon"])
            assert cache["blocks.1.attn.hook_qkv"].shape == (2, 8, 2, 16)
        else:
            assert torch.equal(neurons, F.relu(cache["blocks.1.mlp.hook_pre"]))
            assert torch.equal(cache["blocks.1.hook_resid_post"], resid_mid + cache["blocks.1.hook_mlp_out"])


def test_names_filter_takes_a_name_a_list_or_a_predicate(idx):
    model = tiny("gpt")
    with torch.no_grad():
        assert list(model.run_with_cache(idx, names_filter="blocks.0.mlp.hook_post")[1]) == ["blocks.0.mlp.hook_post"]
        _, cache = model.run_with_cache(idx, names_filter=["hook_embed", "blocks.1.hook_resid_post"])
        assert sorted(cache) == ["blocks.1.hook_resid_post", "hook_embed"]
        _, cache = model.run_with_cache(idx, names_filter=lambda name: name.endswith("hook_resid_pre"))
        assert sorted(cache) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    with pytest.raises(ValueError, match="no hook point 'blocks.0.mlp.hook_out'"):
        model.run_with_hooks(idx, [("blocks.0.mlp.hook_out", lambda act, hook: None)])


@pytest.mark.parametrize("arch", ["crate", "gpt"])
def test_a_hook_may_replace_the_activation(arch, idx):
    """Patching layer 0's output with another prompt's makes the logits that prompt's (activation patching),
    and zero-ablating the last layer's neurons gives the logits computed by hand."""
    model = tiny(arch)
    other = torch.roll(idx, 1, dims=1)
    with torch.no_grad():
        other_logits, other_cache = model.run_with_cache(other, names_filter="blocks.0.hook_resid_post")
        patched = model.run_with_hooks(idx, [("blocks.0.hook_resid_post",
                                              lambda act, hook: other_cache["blocks.0.hook_resid_post"])])
        assert torch.equal(patched, other_logits)

        _, cache = model.run_with_cache(idx, names_filter="blocks.1.hook_resid_mid")
        ablated = model.run_with_hooks(idx, [("blocks.1.mlp.hook_post", lambda act, hook: torch.zeros_like(act))])
        block, mid = model.transformer.h[1], cache["blocks.1.hook_resid_mid"]
        if arch == "crate":
            stream = torch.zeros_like(mid)  # D·0: no residual around ISTA
        else:
            stream = mid + block.mlp.c_proj(torch.zeros(2, 8, model.config.n_neurons))
        assert torch.equal(ablated, model.lm_head(model.transformer.ln_f(stream)))
        assert torch.equal(model(idx)[0], model.run_with_hooks(idx))  # the hooks are gone


def test_hooks_are_removed_when_the_block_raises(idx):
    model = tiny("crate")
    with pytest.raises(RuntimeError, match="stop"):
        with model.hooks([("hook_embed", lambda act, hook: act)]):
            raise RuntimeError("stop")
    assert not model.hook_dict["hook_embed"]._forward_hooks
