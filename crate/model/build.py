"""Model construction by preset name or config."""

from __future__ import annotations

from typing import Any

import torch

from crate.model.config import ModelConfig, model_config
from crate.model.crate import CRATE
from crate.model.gpt import GPT
from crate.model.lm import LanguageModel

ARCHITECTURES: dict[str, type[LanguageModel]] = {"crate": CRATE, "gpt": GPT}


def build_model(name: str | ModelConfig | None = None, **overrides: Any) -> LanguageModel:
    """A freshly initialised model from a preset name (or a ModelConfig), with config fields as keyword overrides."""
    config = model_config(name, **overrides)
    return ARCHITECTURES[config.arch](config)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA device when this process sees one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
