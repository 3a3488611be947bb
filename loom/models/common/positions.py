"""Position encodings the families share, chosen by ``model.positions``.

``learned``     an embedding row per absolute position, trained (GPT-2, BERT): ``nn.Embedding(block_size, C)``
``sinusoidal``  the fixed encoding of Vaswani et al. 2017, section 3.5, added to the token embeddings:
                PE(p, 2i) = sin(p / 10000^(2i/C)), PE(p, 2i+1) = cos(p / 10000^(2i/C)); no weights
``rotary``      RoFormer (Su et al. 2021), as Llama: each query and key vector, seen as C/2 pairs of
                coordinates, is rotated by the angle p·θ^(-2i/hs) of its position p; the score of query
                m and key n then depends on m − n only. Applied inside attention
                (:class:`~loom.models.common.attention.Attention`), after the key/value cache offset,
                so cached decoding sees the same positions as recomputation. No weights.

``relative``    T5's relative position bias (Raffel et al. 2020, section 2.1; Shaw et al. 2018): a learned
                scalar per head and *bucket* of the key's offset from the query, added to the attention
                logits. Offsets 0 .. B/2 − 1 get a bucket each, larger ones share logarithmically wider
                buckets up to ``max_distance``, beyond which all share the last; a causal decoder needs
                only the offsets into the past (unidirectional buckets), an encoder both signs.

Rotary pairs coordinate i with i + hs/2 (the "rotate half" layout of GPT-NeoX and Hugging Face's
Llama), not adjacent coordinates (Meta's original code); the two differ by a fixed permutation of
the query and key projections' rows.

Nothing here has parameters or buffers (the relative bias's table is a weight of each attention):
tables are computed from the positions on each call (in float64, then cast), so a model built on the
meta device needs no extra initialization and every layout computes the same numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("learned", "sinusoidal", "rotary", "relative")
RELATIVE_BUCKETS, RELATIVE_MAX_DISTANCE = 32, 128  # T5's


def resolve(cfg, default: str) -> str:
    """``cfg.positions``, or the family's ``default`` where it says ``auto``."""
    return default if cfg.positions == "auto" else cfg.positions


def sinusoidal(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.'s encoding of ``positions`` (T,) -> (T, dim), float64: sines in the even
    coordinates, cosines in the odd ones, wavelengths from 2π to 2π·base."""
    i = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] / base ** (i / dim)[None, :]  # (T, dim/2)
    out = torch.empty(positions.numel(), dim, dtype=torch.float64, device=positions.device)
    out[:, 0::2] = angles.sin()
    out[:, 1::2] = angles.cos()[:, : dim // 2]
    return out


class SinusoidalPositions(nn.Module):
    """The fixed sinusoidal encoding as a module in the place of a learned position embedding:
    positions (T,) -> (T, C) float64 (the caller casts it to its activations' dtype)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return sinusoidal(positions, self.dim)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles p·θ^(-2i/hs) at ``positions`` (T,) -> two (T, hs) tensors
    in ``dtype``, each frequency repeated for both halves (the rotate-half layout)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)  # (hs/2,)
    inv_freq = theta ** (-i / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the angles of ``cos, sin`` (T, hs): coordinate pairs (i, i + hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def relative_buckets(offsets: torch.Tensor, bidirectional: bool, n_buckets: int = RELATIVE_BUCKETS,
                     max_distance: int = RELATIVE_MAX_DISTANCE) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset (any shape, int64) -> same shape, in [0, n_buckets)
    (Raffel et al. 2020; the reference ``_relative_position_bucket`` of Mesh TensorFlow)."""
    bucket = torch.zeros_like(offsets)
    if bidirectional:  # half the buckets for keys after the query, half for keys before it
        n_buckets //= 2
        bucket = bucket + (offsets > 0).long() * n_buckets
        distance = offsets.abs()
    else:  # a causal decoder: only keys at or before the query
        distance = (-offsets).clamp_min(0)
    exact = n_buckets // 2
    log_scaled = exact + (torch.log(distance.clamp_min(1).double() / exact) / math.log(max_distance / exact)
                          * (n_buckets - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_scaled.clamp_max(n_buckets - 1))


def relative_bias_inputs(q_positions: torch.Tensor, k_positions: torch.Tensor, bidirectional: bool,
                         dtype: torch.dtype, n_buckets: int = RELATIVE_BUCKETS) -> torch.Tensor:
    """One-hot buckets (Tq, Tk, n_buckets) of every (query, key) pair: a Linear(n_buckets, n_head)
    turns them into the bias of each head (a lookup written as a matmul, so that tensor parallelism
    splits the heads of the table as it splits the query heads)."""
    offsets = k_positions[None, :] - q_positions[:, None]  # (Tq, Tk)
    return torch.nn.functional.one_hot(relative_buckets(offsets, bidirectional, n_buckets), n_buckets).to(dtype)
