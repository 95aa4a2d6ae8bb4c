"""The GPT baseline of the paper: nanoGPT's GPT-2 on the same skeleton as CRATE-LM.

    x = x + Attn(LN₁(x))                  separate Q, K, V
    x = x + MLP(LN₂(x)),  MLP(x) = W₂·act(W₁x)    act = ReLU in the paper's code (GELU optional)

The neurons are the MLP hidden activations act(W₁x), 4d per layer (hook point `blocks.{l}.mlp.hook_post`).
With `bias=False` (the paper's training setting) neither the linears nor the LayerNorms carry biases.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crate.model.config import ModelConfig
from crate.model.hooks import HookPoint, LayerNorm
from crate.model.lm import LanguageModel


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # (B, T, K, p)
        self.hook_z = HookPoint()  # the heads' outputs (B, T, K, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.c_attn(x).split(C, dim=2))
        q, k, v = (hook(t).transpose(1, 2) for hook, t in ((self.hook_q, q), (self.hook_k, k), (self.hook_v, v)))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = self.hook_z(y.transpose(1, 2)).reshape(B, T, C)  # (B, T, d)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.ReLU() if config.activation == "relu" else nn.GELU(approximate="tanh")  # neurons (hook point)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.hook_pre = HookPoint()  # W₁x
        self.hook_post = HookPoint()  # act(W₁x): the neurons

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.hook_post(self.act(self.hook_pre(self.c_fc(x))))))


class GPTBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out, self.hook_mlp_out = HookPoint(), HookPoint()

    def init_weights(self) -> None:
        pass  # the skeleton's N(0, 0.02) init covers every GPT parameter

    @property
    def neurons(self) -> HookPoint:
        return self.mlp.hook_post

    def hook_aliases(self) -> dict[str, HookPoint]:
        return {}  # every GPT hook point has its TransformerLens name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln_1(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln_2(x))))

    @staticmethod
    def matmul_flops(config: ModelConfig) -> int:
        """Forward FLOPs per token: c_attn (d→3d), c_proj (d→d), c_fc (d→4d), mlp c_proj (4d→d)."""
        d = config.n_embd
        return 2 * (3 * d * d + d * d + 4 * d * d + 4 * d * d)


class GPT(LanguageModel):
    block_class = GPTBlock

    @staticmethod
    def final_norm_bias(config: ModelConfig) -> bool:
        return config.bias
