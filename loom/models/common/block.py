"""The position-wise feed-forward networks (GELU; SwiGLU) and the pre-norm Transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common.attention import Attention, LayerCache
from loom.models.common.moe import MoE
from loom.models.config import ModelConfig


def gelu_approximate(cfg: ModelConfig) -> str:
    """``F.gelu``'s ``approximate`` for ``model.activation``: gelu_tanh -> "tanh", gelu -> "none"."""
    return "none" if cfg.activation == "gelu" else "tanh"


class MLP(nn.Module):
    """Position-wise feed-forward network with GELU: its tanh approximation (GPT-2's) or the exact one
    (BERT's and ViT's), as ``model.activation`` says."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.ffn, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = gelu_approximate(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """The gated feed-forward network of PaLM and Llama (Shazeer 2020, "GLU Variants Improve
    Transformer"): down(silu(gate(x)) · up(x)). Three matrices of C × ffn, where GELU's MLP has two."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))  # (B, T, C)


def norm(cfg: ModelConfig, kind: str = "layer") -> nn.Module:
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019: no mean, no bias; Llama, T5)."""
    if kind == "rms":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm Transformer decoder block: x + attn(norm(x)), then x + mlp(norm(x)); with ``moe``
    the feed-forward layer is a sparse Mixture-of-Experts (:class:`~loom.models.common.moe.MoE`).

    GPT's block by default (LayerNorm, GELU MLP); Llama's with ``norm="rms"``, ``mlp="swiglu"`` and
    ``rotary`` attention; ``relative``: T5's relative position bias in its attention."""

    def __init__(self, cfg: ModelConfig, moe: bool = False, norm_kind: str = "layer", mlp: str = "gelu",
                 rotary: bool = False, relative: bool = False):
        super().__init__()
        self.ln_1 = norm(cfg, norm_kind)
        self.attn = Attention(cfg, rotary=rotary, relative=relative)
        self.ln_2 = norm(cfg, norm_kind)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg) if mlp == "swiglu" else MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, cache)
        return x + self.mlp(self.ln_2(x))
