"""What "the features of layer l" are: a registry of feature sources.

A feature source turns a batch of token blocks into per-layer feature activations (B, T, F). The collector only
ever talks to this interface, so the same records → explain → score pipeline runs on model neurons, SAE features
or anything else with one activation per token.

    source = feature_source("neurons")            # CRATE's ISTA code A / GPT's MLP hidden (the default)
    source = feature_source("sae:/ckpt/sae.pt")   # "name:argument" -> FEATURE_SOURCES["name"]("argument")

A new kind registers a factory `(argument: str | None) -> FeatureSource` under its name, either at import time
with `register_feature_source("sae", SAEFeatures)` or lazily as an import string in `FEATURE_SOURCES`
(`"sae": "crate.interp.sae_features:SAEFeatures"`), so `--features sae:PATH` needs no change anywhere else.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from crate.errors import ConfigError


class FeatureSource(ABC):
    """Per-token features of chosen layers of a model."""

    spec: str  # as given on the command line; recorded with every records file and result row
    kind: str  # the registry name ("neurons", "sae", ...)

    @abstractmethod
    def n_features(self, model, layer: int) -> int:
        """Features of `layer`; raise ValueError when the source does not fit this model."""

    @abstractmethod
    def activations(self, model, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """tokens (B, T) int64 -> {layer: (B, T, n_features(layer))}, computed without gradients."""


class ModelNeurons(FeatureSource):
    """The model's own neurons (`model.capture_neurons`); only the blocks up to the deepest layer are run."""

    kind = "neurons"

    def __init__(self, argument: str | None = None):
        if argument:
            raise ConfigError("features", f"'neurons' takes no argument, got {argument!r}")
        self.spec = "neurons"

    def n_features(self, model, layer: int) -> int:
        if not 0 <= layer < model.config.n_layer:
            raise ValueError(f"layer {layer} does not exist: the model has {model.config.n_layer} layers")
        return model.config.n_neurons

    @torch.no_grad()
    def activations(self, model, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        with model.capture_neurons(layers) as captured:
            model.hidden_states(tokens, max(layers) + 1)
        return {layer: captured[layer] for layer in layers}


FeatureFactory = Callable[[str | None], FeatureSource]
FEATURE_SOURCES: dict[str, FeatureFactory | str] = {
    "neurons": ModelNeurons,
    "sae": "crate.interp.sae_features:SAEFeatures",  # features of an SAE trained by jobs/train_sae.py
}


def register_feature_source(name: str, factory: FeatureFactory | str) -> None:
    """Make `--features name[:argument]` build `factory(argument)`; a string is a lazy "module:attribute"."""
    FEATURE_SOURCES[name] = factory


def feature_source(spec: str) -> FeatureSource:
    """The source a `features` spec names ("neurons", "sae:PATH", ...)."""
    name, _, argument = spec.partition(":")
    factory = FEATURE_SOURCES.get(name)
    if factory is None:
        raise ConfigError("features", f"unknown feature source {name!r} in {spec!r}; registered: {', '.join(FEATURE_SOURCES)}")
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    source = factory(argument or None)
    source.spec = spec
    return source
