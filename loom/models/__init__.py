"""Models, written once for a single device. Nothing here imports ``torch.distributed``."""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.models.gpt import GPT
from loom.models.pangu import PanGuAlpha
from loom.presets import PRESETS, PUBLISHED_PARAMS

ARCHS: dict[str, type[GPT]] = {"gpt": GPT, "pangu": PanGuAlpha}

__all__ = ["GPT", "PanGuAlpha", "PRESETS", "PUBLISHED_PARAMS", "build_model", "materialize",
           "count_params", "flops_per_token", "n_moe_layers"]


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> GPT:
    """Construct the model without allocating or initializing weights (on the meta device by
    default), so that any size can be described, planned and parallelized before it exists."""
    with torch.device(device):
        return ARCHS[cfg.arch](cfg)


def materialize(model: GPT, device: torch.device | str, seed: int) -> GPT:
    """Allocate a meta-device model's storage on ``device`` and initialize it from ``seed``."""
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once


def n_moe_layers(cfg: ModelConfig) -> int:
    """Decoder blocks whose feed-forward layer is a Mixture-of-Experts."""
    n_blocks = cfg.n_layer - 1 if cfg.arch == "pangu" else cfg.n_layer
    return sum(cfg.moe.is_moe_block(i) for i in range(n_blocks))


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token: every attention and MLP matrix,
    and the output projection (the input embedding is a lookup and costs no FLOPs). In an MoE
    layer a token meets the router and its ``top_k`` experts only (the *active* parameters)."""
    c, moe = cfg.n_embd, n_moe_layers(cfg)
    attention, dense = 4 * c * c, 2 * c * cfg.ffn
    sparse = c * cfg.moe.experts + cfg.moe.top_k * 2 * c * cfg.expert_ffn
    return cfg.n_layer * attention + (cfg.n_layer - moe) * dense + moe * sparse + c * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token as PaLM defines them (Chowdhery et al. 2022, appendix B):
    6 N for the matrix multiplies forward and backward, plus 12 L H Q T for attention scores,
    where H·Q = n_embd and T the sequence length. Recomputation is not counted (model FLOPs)."""
    t = seq_len or cfg.block_size
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * t
