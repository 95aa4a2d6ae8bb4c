"""The sparse autoencoder of the paper's baselines (§5: a 16× ReLU SAE with an L1 penalty, Arthur Conmy's
`sae`, which follows Anthropic's "Towards Monosemanticity"):

    f  = ReLU(W_enc·(x − b_dec) + b_enc)          features, n_features = expansion · d_in
    x̂  = W_decᵀ·f + b_dec                          every decoder row (dictionary atom) has unit norm
    L  = ‖x − x̂‖² + α·‖f‖₁                        per activation vector, averaged over the batch

A checkpoint is one file: the SAE config, its weights, and where its inputs came from (model checkpoint,
architecture, layer, hook point), so `--features sae:PATH` can rebuild the feature source from it alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from crate.errors import ConfigError
from crate.files import replacing
from crate.model.checkpoint import load_data
from crate.model.hooks import NEURONS

FORMAT = "crate-sae-checkpoint"
VERSION = 1


@dataclass
class SAEConfig:
    d_in: int  # width of the activations it encodes (the layer's neurons, or another site's values)
    expansion: int = 16  # n_features = expansion · d_in
    l1_coefficient: float = 8e-5  # α

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.expansion < 1:
            raise ConfigError("expansion", f"d_in and expansion must be >= 1, got {self.d_in}, {self.expansion}")
        if self.l1_coefficient < 0:
            raise ConfigError("l1_coefficient", f"must be >= 0, got {self.l1_coefficient}")

    @property
    def n_features(self) -> int:
        return self.expansion * self.d_in


@dataclass
class SAESource:
    """Which activations an SAE was trained on."""

    checkpoint: str  # the model checkpoint the activations came from
    arch: str  # "crate" or "gpt"
    layer: int
    model_run_id: str | None = None  # the MLflow run that trained that model, when recorded
    corpus: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the hook point it encodes, {l} = `layer` (crate.model.hooks; checkpoints from before sites: the neurons —
    # CRATE's ISTA code A_T, GPT's MLP hidden activations)
    site: str = NEURONS


class SparseAutoencoder(nn.Module):
    def __init__(self, config: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        n, d = config.n_features, config.d_in
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))  # row j: feature j's dictionary atom
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.init_weights(generator)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random unit atoms; the encoder starts as the decoder's transpose (each feature reads its atom)."""
        nn.init.kaiming_uniform_(self.W_dec, generator=generator)
        self.normalize_decoder()
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., n_features): f = ReLU(W_enc·(x − b_dec) + b_enc)."""
        return F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(..., n_features) -> (..., d_in): x̂ = W_decᵀ·f + b_dec."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L = mean over the batch of ‖x − x̂‖² + α‖f‖₁; also the terms and the features, for logging."""
        x_hat, f = self(x)
        squared_error = (x_hat - x).pow(2).sum(-1)  # (N,)
        l1 = f.abs().sum(-1)  # (N,)
        total = (squared_error + self.config.l1_coefficient * l1).mean()
        return total, {"squared_error": squared_error, "l1": l1, "features": f}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_out_parallel_grads(self) -> None:
        """Drop the gradient component along each atom, so the step does not fight the unit-norm constraint."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, source: SAESource,
             metrics: dict[str, float] | None = None, training: dict[str, Any] | None = None) -> Path:
    """One file: config, fp32 weights, the activation source, final metrics and training settings (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(sae.config),
               "state": {k: v.detach().float().cpu() for k, v in sae.state_dict().items()},
               "source": dataclasses.asdict(source), "metrics": dict(metrics or {}), "training": dict(training or {})}
    with replacing(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_sae(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[SparseAutoencoder, SAESource]:
    """The SAE and the source it was trained on; `sae.checkpoint_metrics` holds its recorded metrics."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no SAE checkpoint at {path}")
    payload = load_data(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an SAE checkpoint (expected format {FORMAT!r}); train one with "
                         "jobs/train_sae.py")
    sae = SparseAutoencoder(SAEConfig(**payload["config"]))
    sae.load_state_dict(payload["state"])
    sae.checkpoint_metrics = payload.get("metrics", {})
    sae.training_settings = payload.get("training", {})
    return sae, SAESource(**payload["source"])
