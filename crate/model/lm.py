"""The decoder-only skeleton CRATE-LM and its GPT baseline share (nanoGPT's layout).

    x⁰ = Drop(WTE[idx] + WPE[pos])
    xˡ⁺¹ = Block(xˡ)                      (CRATE or GPT block)
    logits = LMHead(LN_f(xᴸ)),  LMHead.weight ≡ WTE.weight   (tied)

Parameter names follow nanoGPT (`transformer.wte`, `transformer.h.N...`, `lm_head`) because they are the
layout of the paper's released checkpoints. Every activation passes a named `HookPoint` (TransformerLens's
names: `hook_embed`, `blocks.{l}.hook_resid_pre`, ..., `ln_final.hook_normalized`; table in docs/model.md),
read and patched with `run_with_cache`, `run_with_hooks` or the `hooks` context manager.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from crate.errors import ConfigError
from crate.model.config import ModelConfig
from crate.model.hooks import NEURONS, HookFn, HookPoint, LayerNorm, NamesFilter, at_layer, hook_name, names_filter_fn


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
                ln_f=LayerNorm(config.n_embd, bias=self.final_norm_bias(config)),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.hook_embed = HookPoint()  # WTE[idx]
        self.hook_pos_embed = HookPoint()  # WPE[pos]
        self.init_weights()
        self.hook_dict = self._name_hook_points()

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
        embed = self.hook_embed(self.transformer.wte(idx))  # (B, T, d)
        pos_embed = self.hook_pos_embed(self.transformer.wpe(pos).expand(B, T, -1))  # (B, T, d)
        x = self.transformer.drop(embed + pos_embed)
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
    def _name_hook_points(self) -> dict[str, HookPoint]:
        """Name every HookPoint from its module path; add the blocks' TransformerLens aliases (CRATE's mlp.*)."""
        points = {}
        for path, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = hook_name(path)
                points[module.name] = module
        for layer, block in enumerate(self.transformer.h):
            points.update({f"blocks.{layer}.{alias}": point for alias, point in block.hook_aliases().items()})
        return points

    def _points(self, name: str | Callable[[str], bool]) -> list[HookPoint]:
        if callable(name):
            return list({id(p): p for n, p in self.hook_dict.items() if name(n)}.values())
        if name not in self.hook_dict:
            raise ValueError(f"no hook point {name!r}: the names are model.hook_dict's keys (docs/model.md)")
        return [self.hook_dict[name]]

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]]) -> Iterator["LanguageModel"]:
        """Within the block, each `fn(activation, hook)` runs at its hook point (a name, or a predicate on
        names) on every forward pass and may return a replacement activation. The one hook mechanism."""
        handles = []
        try:
            for name, fn in fwd_hooks:
                handles.extend(point.add_hook(fn) for point in self._points(name))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_hooks(self, idx: torch.Tensor, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = ()
                       ) -> torch.Tensor:
        """TransformerLens's run_with_hooks: the logits of one forward pass with `fwd_hooks` added."""
        with self.hooks(fwd_hooks):
            return self(idx)[0]

    def run_with_cache(self, idx: torch.Tensor, names_filter: NamesFilter = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TransformerLens's run_with_cache: (logits, {name: activation, detached}) for the hook points that
        `names_filter` selects (None: all; a name; a list of names; a predicate). An alias is cached under
        each of its names (the same tensor)."""
        cache: dict[str, torch.Tensor] = {}

        def store(name):
            def hook(activation, point):
                cache[name] = activation.detach()

            return hook

        keep = names_filter_fn(names_filter)
        with self.hooks([(name, store(name)) for name in self.hook_dict if keep(name)]):
            logits = self(idx)[0]
        return logits, cache

    def neuron_module(self, layer: int) -> nn.Module:
        """The hook point of layer `layer`'s neurons, `blocks.{layer}.mlp.hook_post` (CRATE: ISTA code A_T;
        GPT: MLP hidden)."""
        return self.transformer.h[layer].neurons

    @contextmanager
    def capture_neurons(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, every forward pass stores layer l's neurons (B, T, n_neurons) in the dict."""
        captured: dict[int, torch.Tensor] = {}

        def store(layer):
            def hook(activation, point):
                captured[layer] = activation.detach()

            return hook

        with self.hooks([(at_layer(NEURONS, layer), store(layer)) for layer in layers]):
            yield captured

    def steer_hooks(self, layer: int | Literal["all"], neurons: int | Sequence[int], value: float,
                    site: Literal["neurons", "attn"] = "neurons") -> list[tuple[str, HookFn]]:
        """The hooks that clamp `neurons` to `value` at every position (the paper's neuron editing, its code's
        `enhanced_feature_id`) in `layer` or in every layer ("all", as the released GPT code does).

        site "neurons": the layer's neurons (`blocks.{l}.mlp.hook_post`). site "attn" (CRATE only, the released
        code's `attn` variant): channels 0..d-1 of the tied q = k = v projection U_kᵀz, heads side by side
        (`blocks.{l}.attn.hook_qkv`)."""
        index = [neurons] if isinstance(neurons, int) else list(neurons)
        c = self.config
        if site == "attn" and c.arch != "crate":
            raise ConfigError("site", f"'attn' steering needs CRATE's tied q=k=v projection; a {c.arch} model has none")
        if site not in ("neurons", "attn"):
            raise ConfigError("site", f"must be 'neurons' or 'attn', got {site!r}")
        n, what = (c.n_neurons, "neuron") if site == "neurons" else (c.n_embd, "attention channel")
        if not (layer == "all" or isinstance(layer, int) and 0 <= layer < c.n_layer) or any(
                not 0 <= i < n for i in index):
            raise ValueError(f"no {what} {neurons} in layer {layer}: the model has {c.n_layer} layers of {n} {what}s")
        hook = "mlp.hook_post" if site == "neurons" else "attn.hook_qkv"

        def clamp(activation, point):
            activation = activation.clone(memory_format=torch.contiguous_format)
            activation.view(*activation.shape[:2], -1)[..., index] = value  # attn: (B, T, K, p) as (B, T, d)
            return activation

        layers = range(c.n_layer) if layer == "all" else [layer]
        return [(f"blocks.{l}.{hook}", clamp) for l in layers]

    @contextmanager
    def steer(self, layer: int | Literal["all"], neurons: int | Sequence[int], value: float,
              site: Literal["neurons", "attn"] = "neurons") -> Iterator[None]:
        """Within the block, clamp `neurons` of `layer` (or of every layer) to `value` at every position."""
        with self.hooks(self.steer_hooks(layer, neurons, value, site)):
            yield

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
