"""Names of activation sites: where in a model a feature source reads one activation per token and layer.

A site is a template with `{l}` where the layer index goes, so one name covers every layer:

    blocks.{l}.mlp.hook_post         our models' neurons (CRATE: the ISTA code A_T; GPT: the MLP hidden units)
    blocks.{l}.ista.hook_dtx         any hook point of our models (crate.model.hooks; table in docs/model.md)
    transformer.h.{l}.mlp.act        a module of a Hugging Face model (its output), here GPT-2's MLP hidden units

A site's activation is (B, T, ...) per forward pass; the dimensions after T are flattened into the features
(`blocks.{l}.attn.hook_z`: K·p features, head after head).
"""

from __future__ import annotations

from crate.errors import ConfigError
from crate.model.hooks import LAYER, NEURONS, at_layer

# The neurons of Hugging Face models, by `config.model_type`: the MLP's hidden units, the output of the
# activation module (GPT-2: act(W_fc·x + b_fc), 4d per layer, as OpenAI's neuron_explainer reads them).
HF_NEURONS = {"gpt2": "transformer.h.{l}.mlp.act"}

__all__ = ["HF_NEURONS", "LAYER", "NEURONS", "at_layer", "checked_site"]


def checked_site(site: str | None) -> str:
    """`site` if it is a template naming one activation per layer, else a ConfigError on `features` saying why."""
    if not site:
        raise ConfigError("features", "'hook' needs a site: --features 'hook:blocks.{l}.hook_resid_post'")
    if site.count(LAYER) != 1 or site.replace(LAYER, "").count("{") or site.replace(LAYER, "").count("}"):
        raise ConfigError("features", f"site {site!r} must hold {LAYER} exactly once, where the layer index goes "
                                      f"(e.g. blocks.{LAYER}.hook_resid_post, transformer.h.{LAYER}.mlp.act)")
    return site
