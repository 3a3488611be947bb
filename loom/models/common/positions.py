"""Position encodings the families share, chosen by ``model.positions``.

``learned``     an embedding row per absolute position, trained (GPT-2, BERT): ``nn.Embedding(block_size, C)``
``sinusoidal``  the fixed encoding of Vaswani et al. 2017, section 3.5, added to the token embeddings:
                PE(p, 2i) = sin(p / 10000^(2i/C)), PE(p, 2i+1) = cos(p / 10000^(2i/C)); no weights
``rotary``      RoFormer (Su et al. 2021), as Llama: each query and key vector, seen as C/2 pairs of
                coordinates, is rotated by the angle p·θ^(-2i/hs) of its position p; the score of query
                m and key n then depends on m − n only. Applied inside attention
                (:class:`~loom.models.common.attention.Attention`), after the key/value cache offset,
                so cached decoding sees the same positions as recomputation. No weights.

Rotary pairs coordinate i with i + hs/2 (the "rotate half" layout of GPT-NeoX and Hugging Face's
Llama), not adjacent coordinates (Meta's original code); the two differ by a fixed permutation of
the query and key projections' rows.

Nothing here has parameters or buffers: tables are computed from the positions on each call (in
float64, then cast), so a model built on the meta device needs no extra initialization and every
layout computes the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("learned", "sinusoidal", "rotary")


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
