"""CRATE-LM: the white-box transformer of Bai & Ma, "Improving Neuron-level Interpretability with White-box
Language Models" (arXiv 2410.16443), as its released code (`crate_overcomplete.py`) defines it.

Each layer compresses the token representations against K subspaces (MSSA) and then sparsifies them against
an overcomplete dictionary D by unrolled ISTA:

    Z^{ℓ+½} = Zˡ + MSSA(LN₁(Zˡ))
    Z^{ℓ+1} = ISTA(LN₂(Z^{ℓ+½}))          — no residual around ISTA: the decoded sparse code replaces the stream

The neurons are the ISTA code A_T of the last step (ista_overcomplete·d per layer); its hook point is
`blocks.{l}.ista.hook_code_{T}`, also named `blocks.{l}.mlp.hook_post` as TransformerLens calls the neurons.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crate.model.config import ModelConfig
from crate.model.hooks import HookPoint, LayerNorm
from crate.model.lm import LanguageModel


class MSSA(nn.Module):
    """Causal multi-head subspace self-attention.

    Head k projects onto its subspace with U_kᵀ and uses that one projection as query, key and value:
        SSA(z | U_k) = softmax(mask((U_kᵀz)ᵀ(U_kᵀz) / √p)) · U_kᵀz,      p = d / K
    The heads are concatenated and mapped back by a learned output projection (with bias), which absorbs
    the paper's p/((N+1)ε²)·[U_1 … U_K].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)  # rows: [U_1ᵀ; …; U_Kᵀ]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.hook_qkv = HookPoint()  # U_kᵀz, the tied query = key = value (B, T, K, p)
        self.hook_z = HookPoint()  # the heads' outputs (B, T, K, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        u = self.hook_qkv(self.c_attn(x).view(B, T, self.n_head, C // self.n_head)).transpose(1, 2)  # (B, K, T, p)
        y = F.scaled_dot_product_attention(u, u, u, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = self.hook_z(y.transpose(1, 2)).reshape(B, T, C)  # heads side by side
        return self.resid_dropout(self.c_proj(y))


class ISTA(nn.Module):
    """Unrolled ISTA on the non-negative LASSO  min_{A≥0} ½‖x − D·A‖² + λ‖A‖₁, from A₀ = 0, with tied decode:

        A₁   = ReLU(η·Dᵀx − ηλ)
        Aₖ₊₁ = ReLU(Aₖ + η·(Dᵀx − DᵀD·Aₖ) − ηλ)
        out  = D·A_T

    Dᵀx is computed once, so T steps cost 2T matmuls (4 for the paper's T = 2, not the reference code's 5).
    The dictionary is stored as its transpose, weight = Dᵀ ∈ R^{(m, d)}, m = ista_overcomplete·d.
    Hook points: hook_dtx (Dᵀx), per step k = 1..T hook_pre_k (the ReLU's input) and hook_code_k (A_k),
    hook_recon (D·A_T).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.ista_overcomplete * config.n_embd, config.n_embd))
        self.step_size = config.ista_step_size  # η
        self.sparsity = config.ista_sparsity  # λ
        self.steps = config.ista_steps
        self.act = nn.ReLU()
        self.hook_dtx = HookPoint()  # Dᵀx (B, T, m)
        self.hook_pre = nn.ModuleList([HookPoint() for _ in range(self.steps)])  # step k's ReLU input (B, T, m)
        self.hook_code = nn.ModuleList([HookPoint() for _ in range(self.steps)])  # A_k; A_T: the neurons
        self.hook_recon = HookPoint()  # D·A_T (B, T, d)

    def init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.weight)  # U(±√(6/d)), as the released code

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse code A_T (B, T, m): the layer's neurons."""
        eta, threshold = self.step_size, self.step_size * self.sparsity  # η, ηλ
        dt_x = self.hook_dtx(F.linear(x, self.weight))  # Dᵀx: (B, T, m)
        pre = eta * dt_x - threshold  # A₁ before its ReLU (A₀ = 0)
        a = self.hook_code[0](self.act(self.hook_pre[0](pre)))
        for k in range(1, self.steps):
            dtd_a = F.linear(F.linear(a, self.weight.t()), self.weight)  # DᵀD·Aₖ
            pre = a + eta * (dt_x - dtd_a) - threshold
            a = self.hook_code[k](self.act(self.hook_pre[k](pre)))
        return a

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return F.linear(code, self.weight.t())  # D·A: (B, T, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_recon(self.decode(self.code(x)))


class CRATEBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = MSSA(config)
        self.ln_2 = LayerNorm(config.n_embd)
        self.ista = ISTA(config)
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_out = HookPoint()

    def init_weights(self) -> None:
        self.ista.init_weights()

    @property
    def neurons(self) -> HookPoint:
        return self.ista.hook_code[-1]

    def hook_aliases(self) -> dict[str, HookPoint]:
        """TransformerLens's names for the ISTA block as the MLP: its last step's ReLU input and output (the
        neurons), and its output D·A_T, which replaces the stream (no residual around it)."""
        return {"mlp.hook_pre": self.ista.hook_pre[-1], "mlp.hook_post": self.ista.hook_code[-1],
                "hook_mlp_out": self.ista.hook_recon}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.hook_resid_pre(z)
        z = self.hook_resid_mid(z + self.hook_attn_out(self.attn(self.ln_1(z))))  # Z^{ℓ+½} = Z + MSSA(LN₁(Z))
        return self.hook_resid_post(self.ista(self.ln_2(z)))  # Z^{ℓ+1} = D·A(LN₂(Z^{ℓ+½})), no residual

    @staticmethod
    def matmul_flops(config: ModelConfig) -> int:
        """Forward FLOPs per token: c_attn + c_proj (2·d² each ×2) and 2·ista_steps matmuls of d×m."""
        d, m = config.n_embd, config.ista_overcomplete * config.n_embd
        return 2 * 2 * d * d + 2 * config.ista_steps * 2 * d * m


class CRATE(LanguageModel):
    block_class = CRATEBlock

    @staticmethod
    def final_norm_bias(config: ModelConfig) -> bool:
        return True  # the released code always keeps LayerNorm biases
