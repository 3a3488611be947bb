"""The encoder-decoder's attention layers, feed-forward networks and blocks (Vaswani et al. 2017,
section 3.1; T5, Raffel et al. 2020, section 2.1). Single-device PyTorch only.

Every block takes and returns the pipeline *state* ``(stream, src_mask, tgt)``:

- an encoder block reads and writes ``stream``, the source's hidden states (B, S, C), and passes
  ``tgt``, the embedded target (B, T, C), through untouched; the last encoder block normalizes its
  output (pre-norm) so that ``stream`` is then the encoder's output, the *memory*;
- a decoder block reads the memory for cross-attention, passes it on untouched, and writes ``tgt``.

``src_mask`` (B, S), True at real source tokens, hides the source's padding from the encoder's
self-attention and from every cross-attention. With T5's relative positions the state carries a
fourth tensor inside each stack: the position bias (nh, S, S) or (nh, T, T) that the stack's first
self-attention computes from the stack's one table (T5's layout) and every later one adds; the
encoder's last block drops it, the decoder's first computes its own. The state is what passes from one pipeline stage to
the next, so the encoder's output travels with the decoder's hidden states (as in Megatron-LM).

A block hands on what it carries unchanged (the target in the encoder, the memory in the decoder) as
it came, with no copy: data parallelism with sharded parameters (``fully_shard``) passes a block's
inputs through an autograd function of its own and hooks that function's outputs, so each block's
hooks sit on a tensor object of their own and fire once that block's backward is due (proved under
ZeRO-3, alone and inside pipeline stages, by tests/distributed/test_encdec_parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common.attention import Attention, LayerCache
from loom.models.common.block import MLP, Block, SwiGLU, norm
from loom.models.common.dropout import shard_rng
from loom.models.common.moe import MoE
from loom.models.common.positions import relative_bias_inputs
from loom.models.config import ModelConfig

# (stream or memory (B, S, C), src_mask (B, S), tgt (B, T, C)[, the stack's position bias (nh, S or T, S or T)])
State = tuple[torch.Tensor, ...]


class ReluMLP(MLP):
    """The position-wise feed-forward network of Vaswani et al. and T5: proj(relu(fc(x)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.relu(self.fc(x))))


class GatedGelu(SwiGLU):
    """T5 v1.1's gated-GELU feed-forward network (Shazeer 2020): down(gelu(gate(x)) · up(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)))


def feed_forward(cfg: ModelConfig, moe: bool) -> nn.Module:
    if moe:
        return MoE(cfg)
    return GatedGelu(cfg) if cfg.feed_forward == "gated-gelu" else ReluMLP(cfg)


class _Attending(Attention):
    """Shared by the three attentions: the heads' weighted sum through SDPA, then the output projection."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, _, t, _ = q.shape
        dropout = self.attn_dropout if self.training else 0.0
        with shard_rng(self.rng_stream if dropout else None, q.device):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.resid_drop(self.out_proj(y.transpose(1, 2).reshape(b, t, -1)))  # (B, T, C)

    def _bias(self, allowed: torch.Tensor, past: int, t: int, s: int, bidirectional: bool,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``allowed`` (bool, broadcastable to (B, nh, T, S)) as SDPA's mask, plus T5's relative bias
        (nh, T, S) of queries at ``past .. past+t`` over keys ``0 .. s``; that bias). The bias is this
        attention's own when it holds its stack's table (the stack's first), else ``bias``, the one
        the first computed (None: no position bias)."""
        if hasattr(self, "rel_bias"):
            qpos = torch.arange(past, past + t, device=allowed.device)
            kpos = torch.arange(s, device=allowed.device)
            dtype = self.rel_bias.weight.dtype
            buckets = relative_bias_inputs(qpos, kpos, bidirectional=bidirectional, dtype=dtype)  # (T, S, nb)
            # (nh, T, S), contiguous once here: every later block and pipeline stage passes it on as is
            bias = self.rel_bias(buckets).permute(2, 0, 1).contiguous()
        return (allowed, None) if bias is None else (bias.masked_fill(~allowed, float("-inf")), bias)


class EncoderAttention(_Attending):
    """Self-attention over the source: every query sees every real (not padding) key."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None  # type: ignore[override]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, S, C); ``mask`` (B, S), True at real tokens; ``bias``: the stack's position bias
        (nh, S, S), unless this attention computes it -> (output, the position bias)."""
        s = x.size(1)
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, S, hs) each
        scores, bias = self._bias(mask[:, None, None, :], 0, s, s, True, bias)
        return self._attend(q, k, v, scores), bias


class DecoderAttention(_Attending):
    """Masked (causal) self-attention over the target; with ``cache`` the queries continue the cached
    positions and their keys and values are appended to it."""

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,  # type: ignore[override]
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :class:`EncoderAttention`, causal; the position bias (nh, T, past + T)."""
        t = x.size(1)
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs) each
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
        qpos = torch.arange(past, past + t, device=x.device)
        allowed = torch.arange(past + t, device=x.device)[None, :] <= qpos[:, None]  # (T, past + T)
        scores, bias = self._bias(allowed, past, t, past + t, False, bias)
        return self._attend(q, k, v, scores), bias


@dataclass
class CrossCache:
    """A decoder layer's cross-attention keys and values (B, nh, S, hs), computed from the memory once."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class CrossAttention(_Attending):
    """Encoder-decoder attention: queries from the decoder, keys and values from the encoder's output
    (the memory), padding of the source hidden. No position bias (T5 has none here either)."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,  # type: ignore[override]
                cache: CrossCache | None = None) -> torch.Tensor:
        """``x`` (B, T, C), ``memory`` (B, S, C), ``mask`` (B, S); with ``cache`` the keys and values are
        computed on the first call and read from it afterwards."""
        q = self._heads(self.q_proj(x))  # (B, nh, T, hs)
        if cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            k, v = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))  # (B, nh, S, hs)
            if cache is not None:
                cache.k, cache.v = k, v
        return self._attend(q, k, v, mask[:, None, None, :])


def _carried(bias: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The stack's position bias a block received in the state, if any."""
    return bias[0] if bias else None


def _passing(a: torch.Tensor, mask: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> State:
    """The state a block hands on: with the stack's position bias if any (contiguous from where the
    stack's first attention computes it, as a pipeline stage must send it; no copy per block)."""
    return (a, mask, b) if bias is None else (a, mask, b, bias)


class OutputNorm(nn.Module):
    """The encoder's final norm (pre-norm stacks leave the stream unnormalized), held by the last
    encoder block so that it runs on whichever pipeline stage ends the encoder. A module of its own
    (not a direct child of a block): tensor parallelism treats it as a norm of the stream, not one
    feeding an attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = norm(cfg, cfg.norm)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(x))


class PreNormEncoderBlock(Block):
    """x + attn(norm(x)), then x + ffn(norm(x)) (T5; the pre-LN option for Vaswani's)."""

    def __init__(self, cfg: ModelConfig, moe: bool = False, relative: bool = False, last: bool = False):
        super().__init__(cfg, norm_kind=cfg.norm)
        self.attn = EncoderAttention(cfg, relative=relative)
        self.mlp = feed_forward(cfg, moe)
        if last:
            self.out = OutputNorm(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor,  # type: ignore[override]
                *bias: torch.Tensor) -> State:
        a, b = self.attn(self.ln_1(x), mask, bias=_carried(bias))
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        if hasattr(self, "out"):  # the encoder's end: its position bias stays behind
            return self.out(x), mask, tgt
        return _passing(x, mask, tgt, b)


class PostNormEncoderBlock(nn.Module):
    """Vaswani et al.'s block as published: x = LN(x + attn(x)), then x = LN(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool = False, relative: bool = False, last: bool = False):
        super().__init__()
        self.last = last
        self.attn = EncoderAttention(cfg, relative=relative)
        self.ln_1 = norm(cfg, cfg.norm)
        self.mlp = feed_forward(cfg, moe)
        self.ln_2 = norm(cfg, cfg.norm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor, *bias: torch.Tensor) -> State:
        a, b = self.attn(x, mask, bias=_carried(bias))
        x = self.ln_1(x + a)
        return _passing(self.ln_2(x + self.mlp(x)), mask, tgt, None if self.last else b)


class PreNormDecoderBlock(Block):
    """y + self_attn(norm(y)), y + cross(norm(y), memory), y + ffn(norm(y))."""

    def __init__(self, cfg: ModelConfig, moe: bool = False, relative: bool = False):
        super().__init__(cfg, norm_kind=cfg.norm)
        self.attn = DecoderAttention(cfg, relative=relative)
        self.ln_x = norm(cfg, cfg.norm)
        self.cross = CrossAttention(cfg)
        self.mlp = feed_forward(cfg, moe)

    def forward(self, memory: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,  # type: ignore[override]
                *bias: torch.Tensor, cache: tuple[LayerCache, CrossCache] | None = None) -> State:
        self_cache, cross_cache = cache if cache is not None else (None, None)
        a, b = self.attn(self.ln_1(y), self_cache, bias=_carried(bias))
        y = y + a
        y = y + self.cross(self.ln_x(y), memory, mask, cross_cache)
        return _passing(memory, mask, y + self.mlp(self.ln_2(y)), b)


class PostNormDecoderBlock(nn.Module):
    """Vaswani et al.'s decoder block: y = LN(y + self_attn(y)), LN(y + cross(y, memory)), LN(y + ffn(y))."""

    def __init__(self, cfg: ModelConfig, moe: bool = False, relative: bool = False):
        super().__init__()
        self.attn = DecoderAttention(cfg, relative=relative)
        self.ln_1 = norm(cfg, cfg.norm)
        self.cross = CrossAttention(cfg)
        self.ln_x = norm(cfg, cfg.norm)
        self.mlp = feed_forward(cfg, moe)
        self.ln_2 = norm(cfg, cfg.norm)

    def forward(self, memory: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, *bias: torch.Tensor,
                cache: tuple[LayerCache, CrossCache] | None = None) -> State:
        self_cache, cross_cache = cache if cache is not None else (None, None)
        a, b = self.attn(y, self_cache, bias=_carried(bias))
        y = self.ln_1(y + a)
        y = self.ln_x(y + self.cross(y, memory, mask, cross_cache))
        return _passing(memory, mask, self.ln_2(y + self.mlp(y)), b)
