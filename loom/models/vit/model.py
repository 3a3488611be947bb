"""ViT (Dosovitskiy et al. 2020): an image is a sequence of patches read by a Transformer encoder.

The image (B, C, H, W) is cut into non-overlapping P×P patches, each flattened and projected to the
width d (the paper's linear patch embedding, equal to a stride-P convolution); a learned [CLS]
embedding is put first and learned position embeddings added; pre-LayerNorm encoder blocks (no
mask: every image has all its patches); a final LayerNorm and a linear classifier on [CLS].
"""

from __future__ import annotations

import torch
from torch import nn

from loom.models.common import Block, NameSeededInit, param_generator
from loom.models.common.encoder import BidirectionalAttention
from loom.models.config import ModelConfig


def n_patches(cfg: ModelConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


class ViTBlock(Block):
    """The pre-LayerNorm encoder block over all patches: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attn = BidirectionalAttention(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(NameSeededInit, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.n_embd, cfg.patch_size
        self.patch_proj = nn.Linear(cfg.channels * p * p, d)
        self.cls_emb = nn.Embedding(1, d)  # the learned [CLS] input, as a one-row table
        self.pos_emb = nn.Embedding(n_patches(cfg) + 1, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): ViTBlock(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=cfg.bias)
        # n_classes=0 (the data's count) is decided before training; until then 2 rows stand in
        self.cls_head = nn.Linear(d, cfg.n_classes or 2)

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """N(0, 0.02) weights, zero biases, unit LayerNorms; a function of ``seed`` and ``name``."""
        owner_name, _, leaf = name.rpartition(".")
        if isinstance(self.get_submodule(owner_name), nn.LayerNorm):
            return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        if leaf == "bias":
            return torch.zeros(shape)
        return torch.empty(shape).normal_(0.0, 0.02, generator=param_generator(seed, name))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> class logits (B, n_classes)."""
        x = self.embed(images)
        for block in self.layers.values():
            x = block(x)
        return self.head(x)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> [CLS] and patch embeddings (B, 1 + N, C)."""
        b, c, h, w = images.shape
        p = self.cfg.patch_size
        if (c, h, w) != (self.cfg.channels, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"images of {c}x{h}x{w}, but the model reads {self.cfg.channels}x"
                             f"{self.cfg.image_size}x{self.cfg.image_size}")
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        patches = patches.reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C·P·P), rows first
        x = self.patch_proj(patches.to(self.pos_emb.weight.dtype))  # (B, N, d)
        cls = self.cls_emb(torch.zeros(b, 1, dtype=torch.long, device=images.device))  # (B, 1, d)
        pos = torch.arange(x.size(1) + 1, device=images.device)
        return self.drop(torch.cat([cls, x], dim=1) + self.pos_emb(pos))  # (B, 1 + N, d)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, 1 + N, d) -> logits (B, n_classes) from [CLS]."""
        return self.cls_head(self.ln_f(x)[:, 0])
