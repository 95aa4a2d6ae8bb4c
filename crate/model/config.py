"""Model configuration and the named presets of the paper's model table.

Field names are part of the public interface: configs, sweeps and checkpoints use them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from crate.errors import ConfigError

MAX_BLOCK_SIZE = 65536  # longer contexts are refused before the position table (block_size × n_embd) is allocated


@dataclass
class ModelConfig:
    arch: Literal["crate", "gpt"] = "crate"  # CRATE-LM (ISTA blocks) or the GPT-2 baseline
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; must divide n_embd
    n_embd: int = 768  # width d of the residual stream
    block_size: int = 1024  # context length (learned absolute positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    dropout: float = 0.0  # on attention, residual and MLP outputs (the paper trains with 0)

    # CRATE's ISTA block: sparse coding of LN(Z) against an overcomplete dictionary D.
    ista_step_size: float = 0.1  # η
    ista_sparsity: float = 0.1  # λ, weight of the L1 penalty
    ista_steps: int = 2  # unrolled ISTA iterations from A₀ = 0
    ista_overcomplete: int = 4  # D ∈ R^{d × (ista_overcomplete·d)}

    # GPT baseline only.
    activation: Literal["relu", "gelu"] = "relu"  # the paper's baseline uses ReLU
    bias: bool = False  # biases in linears and LayerNorms (nanoGPT's flag; the paper trains with False)

    preset: str | None = None  # the preset this config started from, for the record

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "ista_steps", "ista_overcomplete"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.block_size > MAX_BLOCK_SIZE:
            raise ConfigError("block_size", f"must be <= {MAX_BLOCK_SIZE}, got {self.block_size}")
        if self.n_embd % self.n_head:
            raise ConfigError("n_head", f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.ista_step_size <= 0:
            raise ConfigError("ista_step_size", f"η must be > 0, got {self.ista_step_size}")
        if self.ista_sparsity < 0:
            raise ConfigError("ista_sparsity", f"λ must be >= 0, got {self.ista_sparsity}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")

    @property
    def n_neurons(self) -> int:
        """Neurons per layer: the ISTA code A (CRATE) or the MLP hidden layer (GPT)."""
        return self.ista_overcomplete * self.n_embd if self.arch == "crate" else 4 * self.n_embd

    @classmethod
    def defaults_for(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Config-loader hook: a `preset` key supplies the defaults the other keys override."""
        name = raw.get("preset")
        return preset_fields(name) if name is not None else {}


_CRATE_ONLY = ("ista_step_size", "ista_sparsity", "ista_steps", "ista_overcomplete")
_GPT_ONLY = ("activation", "bias")

# name -> (arch, n_layer, n_head, n_embd); the d=128 and d=768 rows are the paper's model table.
_SHAPES = {
    "1l": (1, 4, 128),
    "2l": (2, 4, 128),
    "3l": (3, 4, 128),
    "6l": (6, 12, 768),
    "12l": (12, 12, 768),
    "tiny": (2, 2, 32),
}
PRESETS: dict[str, dict[str, Any]] = {
    f"{arch}-{size}": dict(arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    for arch in ("crate", "gpt")
    for size, (n_layer, n_head, n_embd) in _SHAPES.items()
}
for _arch in ("crate", "gpt"):
    PRESETS[f"{_arch}-tiny"]["block_size"] = 64  # tests and smoke runs


def preset_fields(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name], preset=name)


def model_config(name: str | ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """A preset by name (or an existing config) with keyword overrides, validated."""
    if isinstance(name, ModelConfig):
        base = dataclasses.asdict(name)
    else:
        base = preset_fields(name) if name is not None else {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"not a model config field (fields: {', '.join(f.name for f in dataclasses.fields(ModelConfig))})")
    arch = overrides.get("arch", base.get("arch", "crate"))
    foreign = [k for k in overrides if k in (_CRATE_ONLY if arch == "gpt" else _GPT_ONLY)]
    if foreign:
        raise ConfigError(foreign[0], f"does not apply to a {arch!r} model")
    return ModelConfig(**{**base, **overrides})
