"""What "the features of layer l" are: a registry of feature sources.

A feature source turns a batch of token blocks into per-layer feature activations (B, T, F). The collector only
ever talks to this interface, so the same records → explain → score pipeline runs on model neurons, any hook
point or module, SAE features or anything else with one activation per token, of any subject model
(crate.interp.subject: our checkpoints or a local Hugging Face causal LM).

    source = feature_source("neurons")                          # the subject's neurons (the default)
    source = feature_source("hook:blocks.{l}.ista.hook_dtx")    # any site, {l} = the layer (crate.interp.sites)
    source = feature_source("sae:/ckpt/sae.pt")                 # "name:argument" -> FEATURE_SOURCES["name"]("argument")

A new kind registers a factory `(argument: str | None) -> FeatureSource` under its name, either at import time
with `register_feature_source("sae", SAEFeatures)` or lazily as an import string in `FEATURE_SOURCES`
(`"sae": "crate.interp.sae_features:SAEFeatures"`), so `--features sae:PATH` needs no change anywhere else. A
factory with a `check_argument(argument)` classmethod has its argument checked when the job's config loads,
before any model or weights are read.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from crate.errors import ConfigError
from crate.interp.sites import at_layer, checked_site
from crate.interp.subject import SubjectModel, subject_model


class FeatureSource(ABC):
    """Per-token features of chosen layers of a model (our LanguageModel or a SubjectModel)."""

    spec: str  # as given on the command line; recorded with every records file and result row
    # what the features are, the `feature_kind` of result rows and the series of Table 2: "neurons", "sae" (an SAE
    # on the neurons), "hook:SITE", "sae:SITE" (an SAE on another site)
    kind: str

    @abstractmethod
    def n_features(self, model, layer: int) -> int:
        """Features of `layer`; raise ValueError when the layer does not fit this model, ConfigError (features)
        when the source does not."""

    @abstractmethod
    def activations(self, model, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """tokens (B, T) int64 -> {layer: (B, T, n_features(layer))}, computed without gradients."""


def check_layer(model: SubjectModel, layer: int) -> None:
    if not 0 <= layer < model.n_layer:
        raise ValueError(f"layer {layer} does not exist: the model has {model.n_layer} layers")


class SiteFeatures(FeatureSource):
    """The activations at one site per layer (`hook:SITE`): a hook point of our models (`blocks.{l}.ista.hook_dtx`,
    `blocks.{l}.hook_resid_post`, ...) or a module of a Hugging Face model (`transformer.h.{l}.mlp.act`)."""

    def __init__(self, argument: str | None = None):
        self.template = checked_site(argument)
        self.spec = self.kind = f"hook:{self.template}"

    @classmethod
    def check_argument(cls, argument: str | None) -> None:
        checked_site(argument)

    def site(self, model: SubjectModel) -> str:
        return self.template

    def n_features(self, model, layer: int) -> int:
        model = subject_model(model)
        check_layer(model, layer)
        return model.width(at_layer(self.site(model), layer))

    @torch.no_grad()
    def activations(self, model, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        model = subject_model(model)
        names = {layer: at_layer(self.site(model), layer) for layer in layers}
        read = model.read(tokens, list(names.values()))
        return {layer: read[name] for layer, name in names.items()}


class ModelNeurons(SiteFeatures):
    """The model's own neurons: `blocks.{l}.mlp.hook_post` of ours (CRATE's ISTA code A_T, GPT's MLP hidden
    units), the MLP hidden units of a Hugging Face model of a known type (`crate.interp.sites.HF_NEURONS`)."""

    kind = "neurons"

    def __init__(self, argument: str | None = None):
        self.check_argument(argument)
        self.spec = "neurons"

    @classmethod
    def check_argument(cls, argument: str | None) -> None:
        if argument:
            raise ConfigError("features", f"'neurons' takes no argument, got {argument!r}")

    def site(self, model: SubjectModel) -> str:
        if model.neurons is None:
            raise ConfigError("features", f"no known neurons for a {model.arch} model; name the site of its MLP "
                                          f"hidden units: --features 'hook:<module path with {{l}}>'")
        return model.neurons


FeatureFactory = Callable[[str | None], FeatureSource]
FEATURE_SOURCES: dict[str, FeatureFactory | str] = {
    "neurons": ModelNeurons,
    "hook": SiteFeatures,
    "sae": "crate.interp.sae_features:SAEFeatures",  # features of an SAE trained by jobs/train_sae.py
}


def register_feature_source(name: str, factory: FeatureFactory | str) -> None:
    """Make `--features name[:argument]` build `factory(argument)`; a string is a lazy "module:attribute"."""
    FEATURE_SOURCES[name] = factory


def _factory(spec: str) -> tuple[FeatureFactory, str | None]:
    name, _, argument = spec.partition(":")
    factory = FEATURE_SOURCES.get(name)
    if factory is None:
        raise ConfigError("features", f"unknown feature source {name!r} in {spec!r}; registered: {', '.join(FEATURE_SOURCES)}")
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory, argument or None


def check_feature_spec(spec: str) -> None:
    """A ConfigError on `features` when `spec` names no registered source or an argument it refuses (no model or
    weights are loaded: the config's check)."""
    factory, argument = _factory(spec)
    check = getattr(factory, "check_argument", None)
    if check is not None:
        check(argument)


def feature_source(spec: str) -> FeatureSource:
    """The source a `features` spec names ("neurons", "hook:SITE", "sae:PATH", ...)."""
    factory, argument = _factory(spec)
    source = factory(argument)
    source.spec = spec
    return source
