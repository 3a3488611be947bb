"""Multi-head attention with a KV cache, single-device PyTorch only.

Separate query, key and value projections (as Megatron-LM and MindSpore's PanGu-α keep them) so that
an operator-level shard strategy can split each by heads, and so that an attention can take its query
from a different input than its keys and values (PanGu-α's top query layer).

Grouped-query attention (Ainslie et al. 2023; Llama 2 70B, Llama 3): ``model.n_kv_head`` key/value
heads, each shared by ``n_head / n_kv_head`` consecutive query heads; the KV cache holds the
``n_kv_head`` heads only. ``n_kv_head = n_head`` is multi-head attention, 1 multi-query attention.
With ``model.positions=rotary`` queries and keys are rotated by their positions
(:mod:`~loom.models.common.positions`), the cached keys already rotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common.dropout import shard_rng
from loom.models.common.positions import RELATIVE_BUCKETS, apply_rotary, relative_bias_inputs, rotary_angles
from loom.models.config import ModelConfig


@dataclass
class LayerCache:
    """Keys and values of one attention layer, preallocated to the longest sequence."""

    k: torch.Tensor  # (B, n_kv, T_max, hs)
    v: torch.Tensor  # (B, n_kv, T_max, hs)
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, n_kv, T, hs) after the cached ones; return all cached so far."""
        t = k.size(2)
        if self.length + t > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; cannot add {t} to {self.length}")
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class KVCache:
    """One :class:`LayerCache` per attention layer, for incremental decoding."""

    def __init__(self, cfg: ModelConfig, n_layers: int, batch: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Positions cached so far (the offset of the next token)."""
        return self.layers[0].length


class Attention(nn.Module):
    """Multi-head (or grouped-query) scaled dot-product attention (Vaswani et al. 2017), causal,
    through SDPA. ``rotary``: rotate queries and keys by their positions (RoFormer). ``relative``: add
    T5's learned bias per head and bucket of the key's offset (``rel_bias``, split by heads like the
    query projection under tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, rotary: bool = False, relative: bool = False):
        super().__init__()
        d, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.rotary, self.rope_theta = rotary, cfg.rope_theta
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, kv, bias=cfg.bias)
        self.v_proj = nn.Linear(d, kv, bias=cfg.bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.bias)
        if relative:  # (n_head, buckets): a Linear so that it splits by heads as q_proj does
            self.rel_bias = nn.Linear(RELATIVE_BUCKETS, cfg.n_head, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        # set by tensor parallelism when this module holds a shard of the heads (see common.dropout)
        self.rng_stream: int | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # The head count is read off the width, not the config: a tensor-parallel shard of the
        # projections holds n_head / tp whole heads, and this code runs unchanged on it.
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, hs)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Queries from ``x_q`` (B, T, C), keys and values from ``x_kv`` (B, T, C).

        Query ``i`` attends to key positions ``<= past + i``, where ``past`` is the number of
        positions already in ``cache``.
        """
        b, t, _ = x_q.shape
        q = self._heads(self.q_proj(x_q))  # (B, nh, T, hs)
        k, v = self._heads(self.k_proj(x_kv)), self._heads(self.v_proj(x_kv))  # (B, n_kv, T, hs)
        past = cache.length if cache is not None else 0
        if self.rotary:
            cos, sin = rotary_angles(torch.arange(past, past + t, device=q.device), self.head_dim,
                                     self.rope_theta, q.dtype)  # (T, hs) each
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, n_kv, past + T, hs)
        if k.size(1) != q.size(1):  # grouped-query: query head h reads key/value head h // group
            group = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, past + T, hs)
        mask, causal = None, True
        if hasattr(self, "rel_bias"):
            qpos, kpos = torch.arange(past, past + t, device=q.device), torch.arange(k.size(2), device=q.device)
            buckets = relative_bias_inputs(qpos, kpos, bidirectional=False, dtype=q.dtype)  # (T, past + T, nb)
            bias = self.rel_bias(buckets).permute(2, 0, 1)  # (nh, T, past + T)
            mask = bias.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
            causal = False
        elif past > 0:
            causal = False
            if t > 1:  # a chunk after a prefix: query i sees keys 0 .. past + i
                qpos = torch.arange(past, past + t, device=q.device)[:, None]
                mask = torch.arange(past + t, device=q.device)[None, :] <= qpos  # (T, past + T)
        dropout = self.attn_dropout if self.training else 0.0
        with shard_rng(self.rng_stream if dropout else None, q.device):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, C)
        return self.resid_drop(self.out_proj(y))
