"""PanGu-α (Zeng et al. 2021): the GPT decoder plus a *top query layer*.

After ``n_layer - 1`` decoder blocks and the final LayerNorm, one more Transformer layer runs whose
attention takes its query not from the hidden states but from a separate learned embedding of the
position, while keys and values come from the decoder's output H_L:

    a_h = softmax(p_n W_q (LN(H_L) W_k)^T / sqrt(d_head)) LN(H_L) W_v

Row ``i`` of ``top_query_emb`` is the query that predicts token ``i + 1`` (p_n, "the next position").
The layer keeps its residual path on H_L and its MLP; its output goes straight to the tied output
projection, as in the reference implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.models.common import Block, KVCache, LayerCache
from loom.models.config import ModelConfig
from loom.models.gpt.model import GPT


def n_blocks(cfg: ModelConfig) -> int:
    """Decoder blocks: ``n_layer`` counts the top query layer too, as the reference implementation does."""
    return cfg.n_layer - 1


class TopQueryLayer(Block):
    """A decoder block whose attention takes its query from outside (the position embedding)."""

    def forward(self, h: torch.Tensor, query: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``h``: decoder output (B, T, C); ``query``: position embeddings (T, C) or (B, T, C)."""
        query = query.expand_as(h)
        x = h + self.attn(query, self.ln_1(h), cache)
        return x + self.mlp(self.ln_2(x))


class PanGuAlpha(GPT):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.top_query_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.top_query_layer = TopQueryLayer(cfg)

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.cfg)

    def head_layer(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        top_cache = cache.layers[-1] if cache is not None else None
        return self.top_query_layer(x, self.top_query_emb(pos), top_cache)
