"""SAE features as a feature source of the interpretability pipeline: `--features sae:PATH` scores the
features of the SAE in PATH exactly like neurons (records → explain → score), on the layer and at the hook point
(`SAESource.site`: the neurons, Dᵀx, the residual stream, ...) it was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from crate.errors import ConfigError
from crate.interp.features import FeatureSource, check_layer
from crate.interp.sites import NEURONS, at_layer
from crate.interp.subject import subject_model
from crate.sae.model import load_sae


class SAEFeatures(FeatureSource):
    def __init__(self, argument: str | None = None):
        self.check_argument(argument)
        try:
            self.sae, self.source = load_sae(argument)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError("features", str(error)) from None
        self.sae.eval().requires_grad_(False)
        self.spec = f"sae:{argument}"
        self.site = at_layer(self.source.site, self.source.layer)
        self.kind = "sae" if self.source.site == NEURONS else f"sae:{self.source.site}"

    @classmethod
    def check_argument(cls, argument: str | None) -> None:
        if not argument:
            raise ConfigError("features", "'sae' needs the SAE checkpoint: --features sae:PATH")
        if not Path(argument).is_file():
            raise ConfigError("features", f"no SAE checkpoint at {argument}")

    def n_features(self, model, layer: int) -> int:
        model = subject_model(model)
        check_layer(model, layer)
        if layer != self.source.layer:
            raise ValueError(f"the SAE {self.spec} encodes layer {self.source.layer}, not layer {layer} "
                             f"(interpret only its layer: --layers {self.source.layer})")
        what = "neurons" if self.source.site == NEURONS else f"values at {self.source.site}"
        encodes = f"the SAE {self.spec} encodes {self.sae.config.d_in} {self.source.arch} {what} (from {self.source.checkpoint})"
        if model.arch != self.source.arch:
            raise ValueError(f"{encodes}; this is a {model.arch} model")
        width = model.width(self.site)
        if width != self.sae.config.d_in:
            raise ValueError(f"{encodes}; this model has {width} {what} per layer")
        return self.sae.config.n_features

    @torch.no_grad()
    def activations(self, model, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        if list(layers) != [self.source.layer]:
            raise ValueError(f"the SAE {self.spec} encodes layer {self.source.layer} only, not layers {list(layers)}")
        x = subject_model(model).read(tokens, [self.site])[self.site]
        return {self.source.layer: self.sae.to(tokens.device).encode(x.float())}
