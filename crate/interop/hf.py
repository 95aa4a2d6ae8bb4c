"""Hugging Face `transformers` models of CRATE-LM and the GPT baseline, converted both ways.

- CRATE-LM is its own model type, `crate-lm`: `CrateLMConfig` + `CrateLMForCausalLM`, registered with
  `AutoConfig` / `AutoModelForCausalLM` when this module is imported. The model holds the native
  `crate.model.CRATE` (as `.model`; parameter names `model.transformer...`) and runs its forward: the math is
  crate.model's, not a copy. `generate()` is the library's own (no KV cache: every step reruns the context,
  as the native `generate` does).
- The GPT baseline becomes a stock `GPT2LMHeadModel`: ReLU (`activation_function="relu"`), the biases and
  LayerNorm biases the baseline lacks set to zero, linear weights transposed into GPT-2's Conv1D layout.
  Any GPT-2-shaped model converts back (OpenAI's GPT-2 too: GELU, with biases).

    from crate.interop import to_hf, from_hf
    to_hf(load_model("model.pt")).save_pretrained("hf-out")     # CrateLMForCausalLM or GPT2LMHeadModel
    native = from_hf("hf-out")                                   # a crate.model LanguageModel again
    AutoModelForCausalLM.from_pretrained("hf-out").generate(ids, max_new_tokens=20, do_sample=False)

The tokenizer is GPT-2's, built offline from OpenAI's `encoder.json` + `vocab.bpe` (`hf_tokenizer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, GPT2Config, GPT2LMHeadModel,
                          GPT2TokenizerFast, PreTrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutput

from crate.model import CRATE, GPT, LanguageModel, ModelConfig
from crate.tokenizer import EOT_TOKEN, HOW_TO_PROVIDE, TokenizerError, _verified, vocabulary_source

MODEL_TYPE = "crate-lm"
# The native config fields a CRATE-LM config carries (the GPT-only ones and `arch` are implied).
CRATE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "ista_step_size",
                "ista_sparsity", "ista_steps", "ista_overcomplete", "preset")
# native GPT activation <-> GPT-2's activation_function (nn.GELU(approximate="tanh") is GPT-2's gelu_new)
GPT2_ACTIVATION = {"relu": "relu", "gelu": "gelu_new"}
_NATIVE_ACTIVATION = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_LINEARS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the native models use


@strict
class CrateLMConfig(PreTrainedConfig):
    """CRATE-LM's `crate.model.ModelConfig` fields, under the standard names too (`hidden_size` = n_embd...)."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size"}

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    dropout: float = 0.0
    ista_step_size: float = 0.1
    ista_sparsity: float = 0.1
    ista_steps: int = 2
    ista_overcomplete: int = 4
    preset: str | None = None
    use_cache: bool = False  # no KV cache: generation feeds the whole context each step
    tie_word_embeddings: bool = True
    bos_token_id: int | None = EOT_TOKEN
    eos_token_id: int | None = EOT_TOKEN

    @classmethod
    def from_native(cls, config: ModelConfig) -> "CrateLMConfig":
        if config.arch != "crate":
            raise ValueError(f"CrateLMConfig is for CRATE models; a {config.arch!r} model exports as GPT-2 (to_hf)")
        return cls(**{name: getattr(config, name) for name in CRATE_FIELDS})

    def to_native(self) -> ModelConfig:
        return ModelConfig(arch="crate", **{name: getattr(self, name) for name in CRATE_FIELDS})


class CrateLMForCausalLM(PreTrainedModel, GenerationMixin):
    """CRATE-LM as a causal LM: the native `crate.model.CRATE` as `.model`, its forward and its weights."""

    config_class = CrateLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.transformer.wte.weight"}

    def __init__(self, config: CrateLMConfig):
        super().__init__(config)
        self.model: CRATE = CRATE(config.to_native())  # initialised as crate.model initialises
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to add: the native constructor already initialised every parameter its own way."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.transformer.wte

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutput:
        """Logits of the native model; `labels` as in transformers (shifted inside, -100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask: CRATE-LM has no padding mask; pass unpadded sequences of one length")
        logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, CrateLMConfig, exist_ok=True)
AutoModelForCausalLM.register(CrateLMConfig, CrateLMForCausalLM, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------------
def to_hf(model: LanguageModel) -> PreTrainedModel:
    """The Hugging Face model of a native one: CrateLMForCausalLM for CRATE, a stock GPT2LMHeadModel for GPT."""
    if model.config.arch == "gpt":
        return to_gpt2(model)
    hf = CrateLMForCausalLM(CrateLMConfig.from_native(model.config))
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


def from_hf(source: str | os.PathLike | PreTrainedModel) -> LanguageModel:
    """The native model of a CRATE-LM or GPT-2 Hugging Face model (an object, or a local directory)."""
    if isinstance(source, (str, os.PathLike)):
        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model at {source} (config.json missing)")
        source = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if isinstance(source, CrateLMForCausalLM):
        native = CRATE(source.config.to_native())
        native.load_state_dict(source.model.state_dict())
        return native.eval()
    if isinstance(source, GPT2LMHeadModel):
        return from_gpt2(source)
    raise ValueError(f"{type(source).__name__} is neither CRATE-LM nor GPT-2: only those convert to a native model")


def to_gpt2(model: LanguageModel) -> GPT2LMHeadModel:
    """The GPT baseline as a stock GPT-2: same logits; absent biases are zeros, nn.Linear weights transposed."""
    c = model.config
    if c.arch != "gpt":
        raise ValueError(f"only the GPT baseline converts to GPT-2, not a {c.arch!r} model")
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function=GPT2_ACTIVATION[c.activation],
                        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                        layer_norm_epsilon=LAYER_NORM_EPS, bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN,
                        tie_word_embeddings=True,
                        n_ctx=c.block_size)  # OpenAI's config.json key, which TransformerLens reads
    hf = GPT2LMHeadModel(config)
    native = model.state_dict()
    state = {}
    for key, target in hf.state_dict().items():
        if key in native:
            state[key] = native[key].t() if key.endswith(_LINEARS) else native[key]
        elif key.endswith(".bias"):
            state[key] = torch.zeros_like(target)  # the baseline trains without biases
        else:
            raise KeyError(f"GPT-2 parameter {key} has no counterpart in the native GPT model")
    hf.load_state_dict(state)
    return hf.eval()


def from_gpt2(hf: GPT2LMHeadModel) -> GPT:
    """A GPT-2-shaped model as the native GPT: biases kept only if any is non-zero (then `bias=True`)."""
    c = hf.config
    checks = {
        "activation_function": c.activation_function in _NATIVE_ACTIVATION,
        "layer_norm_epsilon": c.layer_norm_epsilon == LAYER_NORM_EPS,
        "n_inner": c.n_inner in (None, 4 * c.n_embd),
        "scale_attn_weights": c.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": not c.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": c.tie_word_embeddings,
        "add_cross_attention": not c.add_cross_attention,
    }
    for field, ok in checks.items():
        if not ok:
            raise ValueError(f"{field}={getattr(c, field)!r}: the native GPT cannot represent this GPT-2 variant")
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    bias = any(bool(v.any()) for k, v in state.items() if k.endswith(".bias"))
    config = ModelConfig(arch="gpt", n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                         vocab_size=c.vocab_size, dropout=c.resid_pdrop,
                         activation=_NATIVE_ACTIVATION[c.activation_function], bias=bias)
    native = GPT(config)
    wanted = native.state_dict()
    native.load_state_dict({k: (v.t() if k.endswith(_LINEARS) else v) for k, v in state.items() if k in wanted})
    return native.eval()


def hf_tokenizer(path: str | os.PathLike | None = None) -> GPT2TokenizerFast:
    """GPT-2's tokenizer as a Hugging Face fast tokenizer, offline, from the same vocabulary files as
    `crate.tokenizer.gpt2_tokenizer` (OpenAI's encoder.json + vocab.bpe, checked against tiktoken's hashes)."""
    source = vocabulary_source(path)
    if source is None or not source.is_dir():
        raise TokenizerError(f"the Hugging Face tokenizer needs a directory with encoder.json and vocab.bpe, not "
                             f"{source}; {HOW_TO_PROVIDE}")
    vocab = json.loads(Path(_verified(source / "encoder.json", "encoder.json")).read_text(encoding="utf-8"))
    lines = Path(_verified(source / "vocab.bpe", "vocab.bpe")).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line]  # the first line is "#version: 0.2"
    return GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)
