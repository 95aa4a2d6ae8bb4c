"""SAE features as a feature source of the interpretability pipeline: `--features sae:PATH` scores the
features of the SAE in PATH exactly like neurons (records → explain → score), on the layer it was trained on."""

from __future__ import annotations

from typing import Sequence

import torch

from crate.errors import ConfigError
from crate.interp.features import FeatureSource
from crate.sae.activations import autocast
from crate.sae.model import load_sae


class SAEFeatures(FeatureSource):
    kind = "sae"

    def __init__(self, argument: str | None = None):
        if not argument:
            raise ConfigError("features", "'sae' needs the SAE checkpoint: --features sae:PATH")
        try:
            self.sae, self.source = load_sae(argument)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError("features", str(error)) from None
        self.sae.eval().requires_grad_(False)
        self.spec = f"sae:{argument}"

    def n_features(self, model, layer: int) -> int:
        if layer != self.source.layer:
            raise ValueError(f"the SAE {self.spec} encodes layer {self.source.layer}, not layer {layer} "
                             f"(interpret only its layer: --layers {self.source.layer})")
        if model.config.arch != self.source.arch or model.config.n_neurons != self.sae.config.d_in:
            raise ValueError(f"the SAE {self.spec} encodes {self.sae.config.d_in} {self.source.arch} neurons "
                             f"(from {self.source.checkpoint}); this model has {model.config.n_neurons} "
                             f"{model.config.arch} neurons per layer")
        return self.sae.config.n_features

    @torch.no_grad()
    def activations(self, model, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        for layer in layers:
            self.n_features(model, layer)
        sae = self.sae.to(tokens.device)
        with autocast(tokens.device), model.capture_neurons([self.source.layer]) as captured:
            model.hidden_states(tokens, self.source.layer + 1)
        with torch.autocast(tokens.device.type, enabled=False):  # encode in fp32 even inside a bf16 forward
            return {self.source.layer: sae.encode(captured[self.source.layer].float())}
