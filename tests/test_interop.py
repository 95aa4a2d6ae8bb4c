"""Hugging Face interop: CRATE-LM as a registered `transformers` model, the GPT baseline as a stock GPT-2, both
converted back, and the exported GPT-2 in TransformerLens's HookedTransformer. Tiny models, offline."""

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: nothing here may touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from crate.errors import ConfigError
from crate.interop import CrateLMConfig, CrateLMForCausalLM, from_gpt2, from_hf, hf_tokenizer, to_gpt2, to_hf
from crate.interop.export import ExportConfig
from crate.interop.hf import CRATE_FIELDS
from crate.model import ModelConfig, build_model, load_model, save_model
from crate.tokenizer import gpt2_tokenizer

JOB = Path(__file__).resolve().parents[1] / "jobs" / "export.py"
_spec = importlib.util.spec_from_file_location("export_job", JOB)
_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_job)
export_main = _job.main  # the job's own entry point, in-process (a subprocess would re-import transformers)

TOKENS = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def trained_like(preset: str, **overrides):
    """A tiny model whose every parameter is off its initial value (LayerNorms too), as after training."""
    torch.manual_seed(1)
    model = build_model(preset, **overrides).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def checkpoint_dir(tmp_path, model):
    """A training checkpoint directory as the trainer leaves it: its model file is model.pt."""
    directory = tmp_path / "checkpoint_000003"
    save_model(model, directory / "model.pt", step=3)
    return directory


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out[0]


def test_a_crate_checkpoint_round_trips_through_transformers_with_equal_logits(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    native = trained_like("crate-tiny")
    out = tmp_path / "hf-crate"
    export_main(["--checkpoint", str(checkpoint_dir(tmp_path, native)), "--to", "hf", "--output", str(out)])
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "crate-lm"
    assert AutoConfig.from_pretrained(out).ista_sparsity == native.config.ista_sparsity

    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(hf, CrateLMForCausalLM) and not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.model.lm_head.weight is hf.model.transformer.wte.weight  # tied, as natively
    torch.testing.assert_close(logits(hf), logits(native), rtol=0, atol=1e-6)

    prompt = TOKENS[:1, :6]
    generated = hf.generate(prompt, max_new_tokens=10, do_sample=False)  # the library's generation loop
    assert torch.equal(generated, native.generate(prompt, 10, temperature=0))
    loss = hf(TOKENS, labels=TOKENS).loss  # transformers' labels: shifted inside
    torch.testing.assert_close(loss, native(TOKENS[:, :-1], TOKENS[:, 1:])[1])

    hf.save_pretrained(tmp_path / "resaved")  # save_pretrained / from_pretrained again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(logits(again), logits(native), rtol=0, atol=1e-6)

    back = tmp_path / "back.pt"
    export_main(["--checkpoint", str(out), "--to", "native", "--output", str(back)])
    restored = load_model(back)
    assert restored.config == native.config
    torch.testing.assert_close(logits(restored), logits(native), rtol=0, atol=0)


def test_the_gpt_baseline_exports_as_a_stock_gpt2_and_back(tmp_path):
    from transformers import GPT2LMHeadModel

    native = trained_like("gpt-tiny")
    out = tmp_path / "hf-gpt"
    export_main(["--checkpoint", str(checkpoint_dir(tmp_path, native)), "--to", "hf", "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "relu" and config["n_positions"] == native.config.block_size

    gpt2 = GPT2LMHeadModel.from_pretrained(out)
    biases = {k: v for k, v in gpt2.state_dict().items() if k.endswith(".bias")}
    assert biases and all(not v.any() for v in biases.values())  # the baseline has none: zeros
    torch.testing.assert_close(gpt2.transformer.h[0].mlp.c_fc.weight, native.transformer.h[0].mlp.c_fc.weight.t())
    torch.testing.assert_close(logits(gpt2), logits(native), rtol=0, atol=1e-5)

    restored = from_hf(out)
    assert restored.config.bias is False and restored.config.activation == "relu"
    torch.testing.assert_close(logits(restored), logits(native), rtol=0, atol=1e-5)


def test_a_gpt2_with_biases_and_gelu_converts_to_the_native_gpt():
    native = trained_like("gpt-tiny", bias=True, activation="gelu")
    gpt2 = to_gpt2(native)
    assert gpt2.config.activation_function == "gelu_new"
    torch.testing.assert_close(logits(gpt2), logits(native), rtol=0, atol=1e-5)
    restored = from_gpt2(gpt2)
    assert restored.config.bias is True and restored.config.activation == "gelu"
    torch.testing.assert_close(logits(restored), logits(native), rtol=0, atol=1e-5)


def test_the_crate_lm_config_carries_every_native_crate_field():
    native_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"arch", "activation", "bias"}
    assert set(CRATE_FIELDS) == native_fields
    assert native_fields <= {f.name for f in dataclasses.fields(CrateLMConfig)}
    config = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, ista_sparsity=0.3, ista_steps=3)
    assert CrateLMConfig.from_native(config).to_native() == config
    assert CrateLMConfig.from_native(config).hidden_size == 64  # the standard names read the native fields


def test_the_hf_tokenizer_is_the_projects_gpt2_tokenizer():
    text = "Hello world, CRATE's ISTA neurons\n  1 2 3 <|endoftext|>"
    assert hf_tokenizer()(text).input_ids == gpt2_tokenizer().encode(text, allowed_special="all")
    assert hf_tokenizer()("Hello world").input_ids == [15496, 995]


def test_bad_input_is_refused_with_the_field_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint"):
        ExportConfig(output=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="output"):
        ExportConfig(checkpoint="model.pt")
    with pytest.raises(ConfigError, match="checkpoint: no checkpoint file at .*model.pt"):
        ExportConfig(checkpoint=str(tmp_path), output=str(tmp_path / "x"))  # a directory without model.pt
    with pytest.raises(ConfigError, match="checkpoint.*config.json"):
        ExportConfig(checkpoint=str(tmp_path), to="native", output=str(tmp_path / "m.pt"))
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", "m.pt", "--to", "onnx", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="only the GPT baseline"):
        to_gpt2(build_model("crate-tiny"))
    gpt2 = to_gpt2(build_model("gpt-tiny"))
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        from_gpt2(gpt2)
    hf = to_hf(build_model("crate-tiny"))
    mask = torch.ones_like(TOKENS)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        hf(TOKENS, attention_mask=mask)


def test_the_exported_gpt2_loads_into_transformer_lens_offline(tmp_path):
    pytest.importorskip("transformer_lens", reason="the `interop` extra (transformer-lens) is not installed")
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from crate.interop.lens import hooked_transformer

    native = trained_like("gpt-tiny")
    out = tmp_path / "hf-gpt"
    export_main(["--checkpoint", str(checkpoint_dir(tmp_path, native)), "--to", "hf", "--output", str(out)])
    model, tokenizer = GPT2LMHeadModel.from_pretrained(out), AutoTokenizer.from_pretrained(out)

    lens = hooked_transformer(out, hf_model=model, tokenizer=tokenizer)  # TransformerLens's default processing
    assert lens.cfg.act_fn == "relu" and lens.cfg.n_ctx == native.config.block_size
    assert lens.to_tokens("Hello world", prepend_bos=False).tolist() == [[15496, 995]]
    with torch.no_grad():
        torch.testing.assert_close(lens(TOKENS).log_softmax(-1), logits(native).log_softmax(-1), rtol=0, atol=1e-4)

    raw = hooked_transformer(out, hf_model=model, tokenizer=tokenizer, fold_ln=False, center_writing_weights=False,
                             center_unembed=False)
    with torch.no_grad(), native.capture_neurons([1]) as neurons:
        native_logits = logits(native)
        lens_logits, cache = raw.run_with_cache(TOKENS, names_filter="blocks.1.mlp.hook_post")
    torch.testing.assert_close(lens_logits, native_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], neurons[1], rtol=0, atol=1e-5)
