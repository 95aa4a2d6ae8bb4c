"""The decoder-only skeleton CRATE-LM and its GPT baseline share (nanoGPT's layout).

    x⁰ = Drop(WTE[idx] + WPE[pos])
    xˡ⁺¹ = Block(xˡ)                      (CRATE or GPT block)
    logits = LMHead(LN_f(xᴸ)),  LMHead.weight ≡ WTE.weight   (tied)

Parameter names follow nanoGPT (`transformer.wte`, `transformer.h.N...`, `lm_head`) because they are the
layout of the paper's released checkpoints and the names interpretability hooks address.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from crate.model.config import ModelConfig


class LanguageModel(nn.Module):
    block_class: type[nn.Module]

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([self.block_class(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=self.final_norm_bias(config)),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.init_weights()

    @staticmethod
    def final_norm_bias(config: ModelConfig) -> bool:
        raise NotImplementedError

    def init_weights(self) -> None:
        """N(0, 0.02) on every Linear/Embedding, zero biases; output projections N(0, 0.02/√(2L))."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        for block in self.transformer.h:
            block.init_weights()

    # ----------------------------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
        """The residual stream after the first `n_layers` blocks (all by default), before LN_f."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, d)
        for block in self.transformer.h[:n_layers]:
            x = block(x)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) int64 -> logits (B, T, vocab), loss (mean next-token CE, or None).

        The log-softmax and the loss run in fp32 whatever the logits' precision (bf16 under autocast)."""
        logits = self.lm_head(self.transformer.ln_f(self.hidden_states(idx)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    # ----------------------------------------------------------------------------------------------
    def neuron_module(self, layer: int) -> nn.Module:
        """The module whose output is layer `layer`'s neurons (CRATE: ISTA code A; GPT: MLP hidden)."""
        return self.transformer.h[layer].neurons

    @contextmanager
    def capture_neurons(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, every forward pass stores layer l's neurons (B, T, n_neurons) in the dict."""
        captured: dict[int, torch.Tensor] = {}

        def store(layer):
            def hook(module, inputs, output):
                captured[layer] = output.detach()

            return hook

        handles = [self.neuron_module(l).register_forward_hook(store(l)) for l in layers]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def steer(self, layer: int, neurons: int | Sequence[int], value: float) -> Iterator[None]:
        """Within the block, clamp `neurons` of `layer` to `value` at every position (the paper's neuron editing)."""
        index = [neurons] if isinstance(neurons, int) else list(neurons)
        n = self.config.n_neurons
        if not 0 <= layer < self.config.n_layer or any(not 0 <= i < n for i in index):
            raise ValueError(f"no neuron {neurons} in layer {layer}: the model has {self.config.n_layer} layers of {n} neurons")

        def clamp(module, inputs, output):
            output = output.clone()
            output[..., index] = value
            return output

        handle = self.neuron_module(layer).register_forward_hook(clamp)
        try:
            yield
        finally:
            handle.remove()

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by sampling; temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            hidden = self.hidden_states(context)[:, -1]
            logits = self.lm_head(self.transformer.ln_f(hidden))  # (B, vocab)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    # ----------------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters as nanoGPT counts them: the tied embedding once, the position embedding excluded."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3× forward) of the real matmuls, not 6N.

        Per layer the block's own matmuls (`block_matmul_flops`) plus attention scores and values
        (2·2·T·d, counted for the full T×T as nanoGPT and PaLM do); plus the LM head, 2·d·V.
        """
        c = self.config
        T = seq_len or c.block_size
        per_layer = self.block_class.matmul_flops(c) + 4 * T * c.n_embd
        forward = c.n_layer * per_layer + 2 * c.n_embd * c.vocab_size
        return 3 * forward

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay every ≥2-D tensor (matrices, embeddings, the ISTA dictionary), not biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
