"""Named hook points, as TransformerLens has them: an identity module on every activation.

A `HookPoint` returns its input unchanged. Hooks are torch forward hooks on it, added only for the duration
of `LanguageModel.hooks(...)` (and so of `run_with_hooks`, `run_with_cache`, `capture_neurons`, `steer`):
with none added, a forward pass calls no Python hook function at all. A hook is `fn(activation, hook)` and
may return a replacement activation (None keeps it), as in TransformerLens.

Names are the module paths rewritten to TransformerLens's layout (`transformer.h.3.attn.hook_z` ->
`blocks.3.attn.hook_z`, `transformer.ln_f.hook_normalized` -> `ln_final.hook_normalized`, the ISTA steps'
`hook_code.0` -> `hook_code_1`); the table of names is in docs/model.md.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Union

import torch
import torch.nn as nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
LAYER = "{l}"  # where a site template puts the layer index: "blocks.{l}.hook_resid_post" names one hook per layer
NEURONS = "blocks.{l}.mlp.hook_post"  # the neurons of both architectures (CRATE: the ISTA code A_T)


def at_layer(site: str, layer: int) -> str:
    """The hook name a site template names at `layer` ("blocks.{l}.ista.hook_dtx", 3 -> "blocks.3.ista.hook_dtx")."""
    return site.replace(LAYER, str(layer))


class HookPoint(nn.Module):
    """The identity on one named activation; `name` is set when the model is built."""

    def __init__(self):
        super().__init__()
        self.name: str | None = None

    def add_hook(self, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        return self.register_forward_hook(lambda module, inputs, output: fn(output, self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with its output at `hook_normalized` (after the affine weight and bias)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(super().forward(x))


_RENAMES = [
    (re.compile(r"^transformer\.h\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^transformer\.ln_f\."), "ln_final."),
    (re.compile(r"(^|\.)ln_([12])\."), r"\1ln\2."),
]
_STEP = re.compile(r"\.(\d+)$")  # a ModuleList of per-step hook points: steps count from 1


def hook_name(path: str) -> str:
    """A HookPoint's TransformerLens-style name from its module path."""
    for pattern, replacement in _RENAMES:
        path = pattern.sub(replacement, path)
    return _STEP.sub(lambda m: f"_{int(m.group(1)) + 1}", path)


def names_filter_fn(names_filter: NamesFilter) -> Callable[[str], bool]:
    """TransformerLens's names_filter: None (every hook point), one name, a list of names, or a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    names = set(names_filter)
    return lambda name: name in names
