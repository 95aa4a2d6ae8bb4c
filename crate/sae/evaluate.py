"""How good an SAE is, measured inside the model: reconstruction, sparsity, and the loss with it spliced in.

The SAE encodes one hook point of one layer (its `site`, by default the neurons); on held-out token batches
(B, T+1) (inputs and shifted targets), three forward passes per batch, the site patched through the model's hooks:
  clean         the model as it is                                         → L_clean
  spliced       the site's activation replaced by the SAE's reconstruction  → L_sae
  zero-ablated  the site's activation replaced by zeros                     → L_zero
  loss recovered = (L_zero − L_sae) / (L_zero − L_clean)   — 1: as good as the neurons, 0: no better than nothing.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from crate.model.hooks import NEURONS, at_layer
from crate.sae.activations import autocast
from crate.sae.model import SparseAutoencoder


@dataclass
class SAEEvaluation:
    tokens: int
    mse: float  # mean squared error per activation element
    fvu: float  # fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖² (normalised MSE)
    l0: float  # mean number of active features per token
    dead_fraction: float  # features that never fired on the evaluation tokens
    loss_clean: float
    loss_spliced: float
    loss_zero_ablated: float
    loss_recovered: float
    feature_density: np.ndarray = dataclasses.field(repr=False)  # per feature: fraction of tokens it fired on

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "feature_density"}


@contextmanager
def replaced_neurons(model, layer: int, replace: Callable[[torch.Tensor], torch.Tensor],
                     site: str = NEURONS) -> Iterator[None]:
    """Within the block, layer `layer`'s activation at `site` (default: its neurons) is `replace(activation)` in
    every forward pass."""
    with model.hooks([(at_layer(site, layer), lambda activation, hook: replace(activation))]):
        yield


@torch.no_grad()
def evaluate_sae(model, layer: int, sae: SparseAutoencoder, token_batches: Iterable[torch.Tensor],
                 site: str = NEURONS) -> SAEEvaluation:
    """The SAE's statistics on `token_batches`, spliced in at `site` of `layer` (the hook point it encodes)."""
    model.eval()
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    stats = _Stats(sae.config.n_features, sae.config.d_in, device)

    def reconstruct(activation: torch.Tensor) -> torch.Tensor:
        x = activation.reshape(*activation.shape[:2], -1).float()  # (B, T, ...) -> (B, T, d_in)
        with torch.autocast(device.type, enabled=False):  # the SAE in fp32 even inside the bf16 forward
            x_hat, f = sae(x)
        stats.add(x.flatten(0, -2), x_hat.flatten(0, -2), f.flatten(0, -2))
        return x_hat.reshape(activation.shape).to(activation.dtype)

    losses = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n_tokens = 0
    for batch in token_batches:
        batch = torch.as_tensor(batch, dtype=torch.long).to(device)
        idx, targets = batch[:, :-1], batch[:, 1:]
        n = targets.numel()
        with autocast(device):
            losses["clean"] += model(idx, targets)[1].item() * n
            with replaced_neurons(model, layer, reconstruct, site):
                losses["spliced"] += model(idx, targets)[1].item() * n
            with replaced_neurons(model, layer, torch.zeros_like, site):
                losses["zero"] += model(idx, targets)[1].item() * n
        n_tokens += n
    if n_tokens == 0:
        raise ValueError("no evaluation blocks: the evaluation stream is empty")
    clean, spliced, zero = (losses[k] / n_tokens for k in ("clean", "spliced", "zero"))
    density = (stats.fired / stats.count).cpu().numpy()
    return SAEEvaluation(
        tokens=n_tokens, mse=stats.squared_error / (stats.count * sae.config.d_in), fvu=stats.fvu(),
        l0=stats.active / stats.count, dead_fraction=float((density == 0).mean()),
        loss_clean=clean, loss_spliced=spliced, loss_zero_ablated=zero,
        loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else float("nan"),
        feature_density=density)


class _Stats:
    """Running sums over evaluation tokens (float64 on the device; no host sync per batch)."""

    def __init__(self, n_features: int, d_in: int, device: torch.device):
        self.count = 0
        self._squared_error = torch.zeros((), dtype=torch.float64, device=device)
        self._sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self._sum_squares = torch.zeros((), dtype=torch.float64, device=device)
        self._active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(n_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        self.count += len(x)
        self._squared_error += (x - x_hat).double().pow(2).sum()
        self._sum += x.double().sum(0)
        self._sum_squares += x.double().pow(2).sum()
        active = f > 0
        self._active += active.sum()
        self.fired += active.sum(0)

    @property
    def squared_error(self) -> float:
        return float(self._squared_error)

    @property
    def active(self) -> float:
        return float(self._active)

    def fvu(self) -> float:
        total_variance = float(self._sum_squares) - float(self._sum.pow(2).sum()) / self.count  # Σ‖x − x̄‖²
        return self.squared_error / total_variance if total_variance > 0 else float("nan")
