"""A layer's neurons over a token stream, as rows for SAE training: forward passes in chunks of blocks, then a
shuffle buffer so consecutive SAE batches mix tokens from many blocks (the paper's 2¹⁹-activation buffer)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


class LayerActivations:
    """Iterates (B·T, n_neurons) float32 tensors of one layer's neurons, one per (B, T) token batch."""

    def __init__(self, model, layer: int, token_batches: Iterable[torch.Tensor]):
        if not 0 <= layer < model.config.n_layer:
            raise ValueError(f"layer {layer} does not exist: the model has {model.config.n_layer} layers")
        self.model = model.eval()
        self.layer = layer
        self.token_batches = token_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        device = next(self.model.parameters()).device
        for tokens in self.token_batches:
            yield self.neurons(torch.as_tensor(tokens, dtype=torch.long).to(device))

    @torch.no_grad()
    def neurons(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(tokens.device), self.model.capture_neurons([self.layer]) as captured:
            self.model.hidden_states(tokens, self.layer + 1)  # the layers above are not needed
        return captured[self.layer].flatten(0, 1).float()


def shuffled_batches(chunks: Iterable[torch.Tensor], buffer_size: int, batch_size: int,
                     generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Batches of `batch_size` rows drawn from a buffer of up to `buffer_size` rows: fill it, shuffle, hand out
    half of it, refill that half from `chunks`, shuffle again... Whatever is left at the end is shuffled
    and handed out too (the last batch may be short)."""
    chunks = iter(chunks)
    buffer = _fill(chunks, [], buffer_size)
    while buffer is not None and len(buffer) > 0:
        buffer = buffer[torch.randperm(len(buffer), generator=generator, device="cpu").to(buffer.device)]
        half = max(batch_size, (len(buffer) // 2) // batch_size * batch_size)
        for start in range(0, min(half, len(buffer)), batch_size):
            yield buffer[start:start + batch_size]
        rest = buffer[half:]
        refilled = _fill(chunks, [rest], buffer_size)
        if refilled is None or len(refilled) == len(rest):  # the stream has ended: drain what is left
            for start in range(0, len(rest), batch_size):
                yield rest[start:start + batch_size]
            return
        buffer = refilled


def _fill(chunks: Iterator[torch.Tensor], parts: list[torch.Tensor], size: int) -> torch.Tensor | None:
    total = sum(len(p) for p in parts)
    while total < size:
        chunk = next(chunks, None)
        if chunk is None:
            break
        parts.append(chunk)
        total += len(chunk)
    return torch.cat(parts) if parts else None


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the forward's cost dominates activation collection), plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
