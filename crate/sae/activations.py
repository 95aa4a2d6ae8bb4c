"""A layer's activations at one hook point (by default its neurons) over a token stream, as rows for SAE
training: forward passes in chunks of blocks, then a shuffle buffer so consecutive SAE batches mix tokens from
many blocks (the paper's 2¹⁹-activation buffer)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from crate.model.hooks import NEURONS, at_layer


class LayerActivations:
    """Iterates (B·T, width) float32 tensors of one layer's activations at `site` (a hook point template,
    `{l}` = the layer; default the neurons), one per (B, T) token batch; dimensions after T are flattened."""

    def __init__(self, model, layer: int, token_batches: Iterable[torch.Tensor], site: str = NEURONS):
        if not 0 <= layer < model.config.n_layer:
            raise ValueError(f"layer {layer} does not exist: the model has {model.config.n_layer} layers")
        self.name = at_layer(site, layer)
        if self.name not in model.hook_dict:
            raise ValueError(f"the {model.config.arch} model has no hook point {self.name!r} (docs/model.md)")
        self.model = model.eval()
        self.layer = layer
        self.token_batches = token_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for tokens in self.token_batches:
            yield self.rows(torch.as_tensor(tokens, dtype=torch.long).to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def width(self) -> int:
        """Values per token at the site (a one-token forward pass)."""
        return self.rows(torch.zeros(1, 1, dtype=torch.long, device=self.device)).shape[1]

    @torch.no_grad()
    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        captured = []
        with autocast(tokens.device), self.model.hooks([(self.name, lambda activation, hook: captured.append(activation))]):
            self.model.hidden_states(tokens, self.layer + 1)  # a site of block l: the layers above are not needed
        return captured[0].reshape(tokens.numel(), -1).float()


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
