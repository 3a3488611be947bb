"""The Transformer *encoder*'s pieces (Vaswani et al. 2017; BERT, Devlin et al. 2018): attention that
sees every position of the sequence but padding, and the block in both LayerNorm placements.

An encoder block takes and returns ``(x, mask)``: the hidden states (B, T, C) and the padding mask
(B, T), True at real tokens. The mask travels with the hidden states from block to block (and from
one pipeline stage to the next), so that a stage needs nothing but what the previous one sent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common.attention import Attention
from loom.models.common.block import MLP, Block
from loom.models.common.dropout import shard_rng
from loom.models.common.moe import MoE
from loom.models.config import ModelConfig


class BidirectionalAttention(Attention):
    """Multi-head self-attention without the causal mask: every query attends to every key that is
    not padding."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``x`` (B, T, C); ``mask`` (B, T), True at real tokens (None: no padding)."""
        b, t, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        keys = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, T): broadcast over heads, queries
        dropout = self.attn_dropout if self.training else 0.0
        with shard_rng(self.rng_stream if dropout else None, q.device):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout, is_causal=False)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, C)
        return self.resid_drop(self.out_proj(y))


class PostLNEncoderBlock(nn.Module):
    """The published BERT block (post-LayerNorm, as in Vaswani et al. 2017):
    x = LN(x + attn(x)), then x = LN(x + mlp(x)). Attention and MLP read the residual stream itself
    (not a LayerNorm's output), which sequence parallelism must gather for them
    (:attr:`~loom.models.spec.Sharding.stream_inputs`)."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.attn = BidirectionalAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MoE(cfg) if moe else MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.ln_1(x + self.attn(x, mask))
        return self.ln_2(x + self.mlp(x)), mask


class PreLNEncoderBlock(Block):
    """The pre-LayerNorm encoder block (as GPT-2's and ViT's): x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__(cfg, moe)
        self.attn = BidirectionalAttention(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x)), mask


def encoder_block(cfg: ModelConfig, moe: bool = False) -> nn.Module:
    """The block ``cfg`` asks for: post-LayerNorm (``model.post_ln=true``) or pre-LayerNorm."""
    return PostLNEncoderBlock(cfg, moe) if cfg.post_ln else PreLNEncoderBlock(cfg, moe)
