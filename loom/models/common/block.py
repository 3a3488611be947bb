"""The position-wise feed-forward network and the pre-LayerNorm Transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common.attention import Attention, LayerCache
from loom.models.common.moe import MoE
from loom.models.config import ModelConfig


class MLP(nn.Module):
    """Position-wise feed-forward network with GELU (tanh approximation, as GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.ffn, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm Transformer decoder block: x + attn(ln(x)), then x + mlp(ln(x)); with ``moe``
    the feed-forward layer is a sparse Mixture-of-Experts (:class:`~loom.models.common.moe.MoE`)."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MoE(cfg) if moe else MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, cache)
        return x + self.mlp(self.ln_2(x))
