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
from torch.distributed.tensor import DTensor

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


class _SideBySide(torch.autograd.Function):
    """``x`` times three weight matrices side by side (plus their biases), as one matrix multiply,
    returning the three products. Backward keeps what three ``F.linear`` would keep (the input and
    references to the weights), not the concatenated weight: that copy lives only while a multiply
    runs, so a fused projection costs no memory (under ZeRO-3 the gathered weights are still freed
    after forward). Under autocast the multiplies run in the autocast dtype both ways, as ``F.linear``'s
    do; each gradient comes back in its input's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor):
        weights, biases = params[:3], params[3:]
        y = F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)
        ctx.dtype, ctx.x_dtype, ctx.has_bias = y.dtype, x.dtype, bool(biases)
        ctx.save_for_backward(x.to(y.dtype), *weights)
        return y.split([w.size(0) for w in weights], dim=-1)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        grad_y = torch.cat(grads, dim=-1).to(ctx.dtype)  # (..., 3C)
        weight = torch.cat(weights).to(ctx.dtype)
        grad_x = (grad_y @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        sizes = [w.size(0) for w in weights]
        flat_grad, flat_x = grad_y.reshape(-1, grad_y.size(-1)), x.reshape(-1, x.size(-1))
        out: list[torch.Tensor | None] = [grad_x, None, None, None]
        if any(ctx.needs_input_grad[1:4]):  # not for frozen weights
            out[1:] = [g.to(w.dtype) for g, w in zip((flat_grad.t() @ flat_x).split(sizes), weights)]
        if ctx.has_bias:
            out += [g.to(w.dtype) for g, w in zip(flat_grad.sum(0).split(sizes), weights)]
        return tuple(out)


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

    def project(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, n_kv, T, hs). Self-attention on whole weights
        multiplies once by the three projections side by side (as GPT-2's fused ``c_attn``: one larger
        matrix multiply is faster than three, and an autocast casts the input once); the parameters stay
        three, so names, checkpoints, tensor-parallel strategies and LoRA adapters are unchanged. A
        tensor-parallel shard (a DTensor) or an adapted projection takes the three multiplies."""
        if x_q is x_kv and self._fusable():
            projections = (self.q_proj, self.k_proj, self.v_proj)
            biases = [m.bias for m in projections] if self.q_proj.bias is not None else []
            q, k, v = _SideBySide.apply(x_q, *(m.weight for m in projections), *biases)
            return self._heads(q), self._heads(k), self._heads(v)
        return self._heads(self.q_proj(x_q)), self._heads(self.k_proj(x_kv)), self._heads(self.v_proj(x_kv))

    def _fusable(self) -> bool:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return (all(type(m) is nn.Linear and not isinstance(m.weight, DTensor) for m in projections)
                and len({m.bias is None for m in projections}) == 1)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Queries from ``x_q`` (B, T, C), keys and values from ``x_kv`` (B, T, C).

        Query ``i`` attends to key positions ``<= past + i``, where ``past`` is the number of
        positions already in ``cache``.
        """
        b, t, _ = x_q.shape
        q, k, v = self.project(x_q, x_kv)  # (B, nh, T, hs), (B, n_kv, T, hs) twice
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
