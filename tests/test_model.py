"""CRATE-LM and the GPT baseline: the paper's equations, parameter counts, causality, hooks, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from crate.errors import CheckpointError, ConfigError
from crate.model import CRATE, GPT, PRESETS, build_model, load_checkpoint, load_model, load_released, model_config, save_model
from crate.model.crate import ISTA

PAPER_COUNTS = {
    "crate-1l": 6_538_112, "crate-2l": 6_637_056, "crate-3l": 6_736_000, "crate-6l": 59_891_712, "crate-12l": 81_148_416,
    "gpt-1l": 6_635_904, "gpt-2l": 6_832_768, "gpt-3l": 7_029_632, "gpt-6l": 81_110_784, "gpt-12l": 123_587_328,
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_counts_equal_the_paper_table(name):
    with torch.device("meta"):
        model = build_model(name)
    assert model.num_params() == PAPER_COUNTS[name]


def literal_two_step_ista(x, D, eta, lam):
    """The paper's equations with D ∈ R^{d×m} as a matrix, no shared terms."""
    a1 = F.relu(eta * x @ D - eta * lam)
    a2 = F.relu(a1 + eta * (x @ D - (a1 @ D.T) @ D) - eta * lam)
    return a2 @ D.T, a2


def test_efficient_ista_equals_the_literal_two_step_formula():
    torch.manual_seed(0)
    config = model_config("crate-tiny", ista_step_size=0.37, ista_sparsity=0.21)
    ista = ISTA(config).double()
    ista.init_weights()
    x = torch.randn(3, 7, config.n_embd, dtype=torch.float64)
    D = ista.weight.T  # (d, m)
    expected_out, expected_code = literal_two_step_ista(x, D, 0.37, 0.21)
    with torch.no_grad():
        out = ista(x)
        code = ista.code(x)
    assert (code > 0).any() and (code == 0).any(), "the test must exercise both sides of the threshold"
    assert torch.max(torch.abs(out - expected_out)) <= 1e-10
    assert torch.max(torch.abs(code - expected_code)) <= 1e-10


def test_ista_uses_four_matmuls_for_two_steps():
    config = model_config("crate-tiny")
    ista = ISTA(config)
    ista.init_weights()
    calls = []
    original = F.linear

    def counting_linear(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    F.linear = counting_linear
    try:
        ista(torch.randn(2, 3, config.n_embd))
    finally:
        F.linear = original
    assert len(calls) == 4


def test_ista_hyperparameters_are_settable_per_model():
    model = build_model("crate-tiny", ista_sparsity=0.05, ista_step_size=0.2, ista_steps=3, ista_overcomplete=2)
    ista = model.transformer.h[0].ista
    assert (ista.sparsity, ista.step_size, ista.steps) == (0.05, 0.2, 3)
    assert ista.weight.shape == (2 * 32, 32)
    assert model.config.n_neurons == 64


@pytest.mark.parametrize("name", ["crate-tiny", "gpt-tiny"])
def test_changing_a_token_never_changes_earlier_logits(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    idx = torch.randint(0, 50257, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50257
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert a.shape == (2, 16, 50304)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("name", ["crate-tiny", "gpt-tiny"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name)
    idx = torch.randint(0, 50257, (2, 16))
    _, loss = model(idx, torch.roll(idx, -1, 1))
    assert loss is not None and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(50304)) < 1.0  # near-uniform at init
    loss.backward()
    for name_, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name_


def test_no_loss_without_targets():
    model = build_model("crate-tiny")
    logits, loss = model(torch.zeros(1, 4, dtype=torch.long))
    assert loss is None and logits.shape == (1, 4, 50304)


def test_crate_block_has_no_residual_around_ista():
    torch.manual_seed(0)
    model = build_model("crate-tiny").eval()
    block = model.transformer.h[0]
    z = torch.randn(1, 5, 32)
    with torch.no_grad():
        half = z + block.attn(block.ln_1(z))
        assert torch.allclose(block(z), block.ista(block.ln_2(half)))


def test_init_follows_the_released_code():
    torch.manual_seed(0)
    model = build_model("crate-12l")
    ista_bound = math.sqrt(6 / 768)
    w = model.transformer.h[0].ista.weight
    assert w.abs().max() <= ista_bound and w.abs().max() > 0.95 * ista_bound
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(24)) < 5e-4
    assert model.transformer.h[0].attn.c_proj.bias.abs().sum() == 0
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt_baseline_defaults_to_relu_and_no_bias():
    model = build_model("gpt-tiny")
    assert isinstance(model.transformer.h[0].mlp.act, torch.nn.ReLU)
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())
    gelu = build_model("gpt-tiny", activation="gelu", bias=True)
    assert isinstance(gelu.transformer.h[0].mlp.act, torch.nn.GELU)
    assert gelu.transformer.ln_f.bias is not None


def test_bad_model_configs_name_the_field():
    with pytest.raises(ConfigError, match="preset"):
        build_model("crate-7l")
    with pytest.raises(ConfigError, match="ista_step_size"):
        build_model("crate-tiny", ista_step_size=0.0)
    with pytest.raises(ConfigError, match="ista_sparsity"):
        build_model("crate-tiny", ista_sparsity=-0.1)
    with pytest.raises(ConfigError, match="n_head"):
        build_model("crate-tiny", n_head=3)
    with pytest.raises(ConfigError, match="ista_sparsity"):
        build_model("gpt-tiny", ista_sparsity=0.05)
    with pytest.raises(ConfigError, match="eta"):
        build_model("crate-tiny", eta=0.1)


@pytest.mark.parametrize("name", ["crate-tiny", "gpt-tiny"])
def test_capture_matches_the_neurons_and_does_not_change_the_output(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    idx = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        plain, _ = model(idx)
        with model.capture_neurons([0, 1]) as neurons:
            captured_logits, _ = model(idx)
    assert torch.equal(plain, captured_logits)
    assert neurons[1].shape == (2, 8, model.config.n_neurons)
    if name.startswith("crate"):
        block = model.transformer.h[0]
        with torch.no_grad():
            x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(8))
            expected = block.ista.code(block.ln_2(x + block.attn(block.ln_1(x))))
        assert torch.allclose(neurons[0], expected, atol=1e-6)
        assert (neurons[0] >= 0).all()


@pytest.mark.parametrize("name", ["crate-tiny", "gpt-tiny"])
def test_steering_changes_the_next_token_distribution_and_restores_exactly(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        before, _ = model(idx)
        with model.steer(layer=1, neurons=3, value=25.0):
            steered, _ = model(idx)
            with model.capture_neurons([1]) as neurons:
                model(idx)
        after, _ = model(idx)
    assert torch.all(neurons[1][..., 3] == 25.0)
    shift = (F.softmax(steered[0, -1], -1) - F.softmax(before[0, -1], -1)).abs().sum()
    assert shift > 1e-3
    assert torch.equal(before, after)


def test_steering_rejects_a_neuron_that_does_not_exist():
    model = build_model("crate-tiny")
    with pytest.raises(ValueError, match="no neuron"):
        with model.steer(layer=0, neurons=128, value=1.0):
            pass


def test_generate_extends_the_prompt():
    torch.manual_seed(0)
    model = build_model("crate-tiny").eval()
    prompt = torch.tensor([[16, 362, 513]])
    greedy = model.generate(prompt, 5, temperature=0)
    assert greedy.shape == (1, 8) and torch.equal(greedy[:, :3], prompt)
    assert torch.equal(greedy, model.generate(prompt, 5, temperature=0))
    sampled = model.generate(prompt, 70, temperature=0.8, top_k=10)  # longer than block_size: context is cropped
    assert sampled.shape == (1, 73)


@pytest.mark.parametrize("name", ["crate-tiny", "gpt-tiny"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(name, **({"ista_sparsity": 0.05} if name.startswith("crate") else {})).eval()
    path = save_model(model, tmp_path / "model.pt", step=7)
    loaded, metadata = load_checkpoint(path)
    loaded.eval()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.config == model.config
    assert metadata == {"step": 7}


def released_layout(model):
    """A state dict as the paper's code saves it: prenorm names, a compile prefix, mask buffers, nanoGPT dict."""
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace(".ln_1.", ".prenorm_1.").replace(".ln_2.", ".prenorm_2.")
        state[f"_orig_mod.{key}"] = value.clone()
    for i in range(model.config.n_layer):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    return {"model": state, "model_args": {"n_layer": model.config.n_layer, "n_head": model.config.n_head,
                                           "n_embd": model.config.n_embd, "block_size": model.config.block_size,
                                           "bias": False, "vocab_size": model.config.vocab_size, "dropout": 0.0},
            "iter_num": 600000}


def test_released_crate_state_dict_loads(tmp_path):
    torch.manual_seed(0)
    original = build_model("crate-2l").eval()
    path = tmp_path / "ckpt.pt"
    torch.save(released_layout(original), path)
    loaded = load_model(path).eval()
    assert isinstance(loaded, CRATE)
    assert (loaded.config.n_layer, loaded.config.n_head, loaded.config.n_embd) == (2, 4, 128)
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.equal(original(idx)[0], loaded(idx)[0])


def test_released_gpt_bare_state_dict_loads_with_shape_inference():
    torch.manual_seed(0)
    original = build_model("gpt-1l").eval()
    bare = {k: v for k, v in original.state_dict().items() if k != "lm_head.weight"}
    loaded = load_released(bare).eval()
    assert isinstance(loaded, GPT) and loaded.config.n_head == 4 and not loaded.config.bias
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.equal(original(idx)[0], loaded(idx)[0])


def test_flops_count_the_real_matmuls():
    crate, gpt = build_model("crate-12l", ista_steps=2), build_model("gpt-12l")
    assert 1.25 < crate.flops_per_token() / gpt.flops_per_token() < 1.35  # CRATE's ISTA costs ~1.3× per token
    more_steps = build_model("crate-12l", ista_steps=3)
    d, m = 768, 3072
    assert more_steps.flops_per_token() - crate.flops_per_token() == 3 * 12 * 2 * 2 * d * m


def test_every_preset_builds():
    for name in PRESETS:
        with torch.device("meta"):
            assert build_model(name).config.preset == name


def test_param_groups_decay_the_dictionary_but_not_norms():
    model = build_model("crate-tiny")
    decay, no_decay = model.param_groups(0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.transformer.h[0].ista.weight) in decayed
    assert id(model.transformer.h[0].ln_1.weight) not in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_checkpoints_load_from_file_uris(tmp_path):
    path = save_model(build_model("gpt-tiny"), tmp_path / "model.pt")
    assert load_model(f"file://{path}").config.preset == "gpt-tiny"
    with pytest.raises(CheckpointError, match="missing.pt: no checkpoint file"):
        load_model(tmp_path / "missing.pt")
