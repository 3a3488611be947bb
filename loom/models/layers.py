"""Transformer building blocks, single-device PyTorch only.

Attention keeps separate query, key and value projections (as Megatron-LM and MindSpore's PanGu-α
do) so that an operator-level shard strategy can split each by heads, and so that PanGu-α's top
query layer can take its query from a different input than its keys and values.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.models.moe import Experts, MoE, moe_initial_value


@dataclass
class LayerCache:
    """Keys and values of one attention layer, preallocated to the longest sequence."""

    k: torch.Tensor  # (B, nh, T_max, hs)
    v: torch.Tensor  # (B, nh, T_max, hs)
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, nh, T, hs) after the cached ones; return all cached so far."""
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
        shape = (batch, cfg.n_head, max_len, cfg.head_dim)
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype)) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Positions cached so far (the offset of the next token)."""
        return self.layers[0].length


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017), causal, through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.n_embd
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # The head count is read off the width, not the config: a tensor-parallel shard of the
        # projections holds n_head / tp whole heads, and this code runs unchanged on it.
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Queries from ``x_q`` (B, T, C), keys and values from ``x_kv`` (B, T, C).

        Query ``i`` attends to key positions ``<= past + i``, where ``past`` is the number of
        positions already in ``cache``.
        """
        b, t, _ = x_q.shape
        q, k, v = self._heads(self.q_proj(x_q)), self._heads(self.k_proj(x_kv)), self._heads(self.v_proj(x_kv))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
        mask, causal = None, True
        if past > 0:
            causal = False
            if t > 1:  # a chunk after a prefix: query i sees keys 0 .. past + i
                qpos = torch.arange(past, past + t, device=q.device)[:, None]
                mask = torch.arange(past + t, device=q.device)[None, :] <= qpos  # (T, past + T)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, C)
        return self.resid_drop(self.out_proj(y))


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
    the feed-forward layer is a sparse Mixture-of-Experts (:class:`~loom.models.moe.MoE`)."""

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


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one parameter, seeded by the run's seed and the parameter's name only:
    the same numbers come out whatever else the model or its layout holds."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def gpt_initial_value(module: nn.Module, name: str, shape: torch.Size, n_layer: int,
                      generator: torch.Generator) -> torch.Tensor:
    """GPT-2 initialization of the parameter ``name`` of ``module``: N(0, 0.02) weights, zero biases,
    unit LayerNorms, and the residual output projections scaled by 1/sqrt(2 n_layer) (Radford et al.
    2019, section 2.3). Returns the full tensor (fp32, CPU)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if isinstance(owner, Experts):
        return moe_initial_value(name, shape, n_layer, generator)
    if isinstance(owner, nn.LayerNorm):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    std = 0.02 / math.sqrt(2 * n_layer) if owner_name.endswith(("out_proj", "mlp.proj")) else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=generator)
