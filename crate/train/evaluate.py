"""Evaluation on the validation stream: loss, perplexity, and per-layer neuron statistics.

For CRATE each layer's ISTA block is meant to solve the LASSO  min_A ½‖x − D·A‖² + λ‖A‖₁  (x = LN₂ of the
stream); we report how well the unrolled steps do — the objective at the code A and the relative
reconstruction error ‖x − D·A‖/‖x‖ — and how sparse the code is: the fraction of zero neurons, the mean number
of active neurons per token, and the fraction of neurons never active in the window ("dead"). For GPT the same
activation statistics describe the MLP hidden layer.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from crate.model.crate import CRATEBlock
from crate.model.lm import LanguageModel


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) across ranks; identity in a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather(value, world_size: int) -> list:
    """Every rank's `value` (picklable), in rank order; `[value]` in a single process. A collective."""
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        values = [None] * world_size
        dist.all_gather_object(values, value)
        return values
    return [value]


class NeuronStatistics:
    """Accumulates per-layer neuron (and, for CRATE, LASSO) statistics through forward hooks."""

    def __init__(self, model: LanguageModel):
        self.model = model
        n_layer, n = model.config.n_layer, model.config.n_neurons
        device = next(model.parameters()).device
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros(n_layer, dtype=torch.float64, device=device)  # Σ_tokens #active neurons
        self.ever_active = torch.zeros(n_layer, n, dtype=torch.float64, device=device)
        self.lasso = torch.zeros(n_layer, dtype=torch.float64, device=device)  # Σ_tokens ½‖x − DA‖² + λ‖A‖₁
        self.relative_error = torch.zeros(n_layer, dtype=torch.float64, device=device)  # Σ_tokens ‖x − DA‖/‖x‖
        self.is_crate = isinstance(model.transformer.h[0], CRATEBlock)
        self._codes: dict[int, torch.Tensor] = {}  # the code of the forward in flight, for the LASSO hook

    @contextlib.contextmanager
    def recording(self):
        handles = []
        for layer, block in enumerate(self.model.transformer.h):
            handles.append(block.neurons.register_forward_hook(self._neuron_hook(layer)))
            if self.is_crate:
                handles.append(block.ista.register_forward_hook(self._lasso_hook(layer, block.ista.sparsity)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _neuron_hook(self, layer: int):
        def hook(module, inputs, output):
            code = output.detach().float().flatten(0, -2)  # (tokens, n)
            active = code > 0
            if layer == 0:
                self.tokens += code.shape[0]
            self.active[layer] += active.sum()
            self.ever_active[layer] = torch.maximum(self.ever_active[layer], active.any(0).double())
            if self.is_crate:
                self._codes[layer] = code

        return hook

    def _lasso_hook(self, layer: int, sparsity: float):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().flatten(0, -2)
            decoded = output.detach().float().flatten(0, -2)  # the ISTA block's output is D·A
            code = self._codes.pop(layer)  # the act hook ran inside this forward, just before
            residual = (x - decoded).norm(dim=-1)
            self.lasso[layer] += (0.5 * residual.square() + sparsity * code.abs().sum(-1)).sum()
            self.relative_error[layer] += (residual / x.norm(dim=-1).clamp_min(1e-12)).sum()

        return hook

    def reduced(self) -> dict[str, float]:
        tokens = all_reduce(self.tokens.clone()).item()
        active = all_reduce(self.active.clone())
        ever = all_reduce(self.ever_active.clone(), dist.ReduceOp.MAX if dist.is_initialized() else None)
        metrics: dict[str, float] = {}
        n = self.model.config.n_neurons
        for layer in range(self.model.config.n_layer):
            per_token = active[layer].item() / max(tokens, 1)
            metrics[f"neurons/L{layer}/active_per_token"] = per_token
            metrics[f"neurons/L{layer}/zero_fraction"] = 1.0 - per_token / n
            metrics[f"neurons/L{layer}/dead_fraction"] = 1.0 - ever[layer].mean().item()
        if self.is_crate:
            lasso, error = all_reduce(self.lasso.clone()), all_reduce(self.relative_error.clone())
            for layer in range(self.model.config.n_layer):
                metrics[f"neurons/L{layer}/lasso_objective"] = lasso[layer].item() / max(tokens, 1)
                metrics[f"neurons/L{layer}/relative_recon_error"] = error[layer].item() / max(tokens, 1)
        for name in {k.split("/")[-1] for k in metrics}:  # means over layers, what sweeps optimise
            values = [v for k, v in metrics.items() if k.endswith(f"/{name}")]
            metrics[f"neurons/{name}"] = sum(values) / len(values)
        return metrics


@torch.no_grad()
def evaluate(model: LanguageModel, batches: Iterable, device: torch.device,
             precision_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """Mean next-token loss and perplexity over `batches`, plus the neuron statistics; reduced across ranks."""
    was_training = model.training
    model.eval()
    stats = NeuronStatistics(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.float64, device=device)
    with stats.recording():
        for batch in batches:
            tokens = batch.tokens.to(device, non_blocking=True)
            with precision_context():
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            count = tokens[:, 1:].numel()
            loss_sum += loss.double() * count
            n_tokens += count
    model.train(was_training)
    loss = (all_reduce(loss_sum) / all_reduce(n_tokens).clamp_min(1)).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), **stats.reduced()}
