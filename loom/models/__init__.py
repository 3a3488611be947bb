"""Models, written once for a single device; nothing here imports ``torch.distributed``.

Each family lives in its own folder (``gpt/``, ``pangu/``, ``llama/``) with its model, presets, shard strategies
and pipeline split, and registers a :class:`~loom.models.spec.ModelSpec`; shared building blocks are
in ``common/``. Everything outside this package reads a family through its spec.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.models import bert, encdec, gpt, llama, pangu, vit  # noqa: F401  (each registers its family)
from loom.models.config import DEFAULT_PRESET, ModelConfig, MoEConfig
from loom.models.costs import ModelCosts, PartCost
from loom.models.costs import model_costs as _model_costs
from loom.models.registry import families, presets, published_params, register, spec_of
from loom.models.spec import ModelSpec, PipelineSplit, Sharding

__all__ = ["DEFAULT_PRESET", "ModelConfig", "ModelCosts", "ModelSpec", "MoEConfig", "PartCost", "PipelineSplit",
           "Sharding", "build_model", "costs", "count_params", "families", "flops_per_token", "materialize",
           "matmul_params", "n_blocks", "n_moe_layers", "presets", "published_params", "register", "spec_of"]


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> nn.Module:
    """Construct the model without allocating or initializing weights (on the meta device by
    default), so that any size can be described, planned and parallelized before it exists."""
    with torch.device(device):
        return spec_of(cfg).build(cfg)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate a meta-device model's storage on ``device`` and initialize it from ``seed``."""
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared one once


def costs(cfg: ModelConfig, seq: int | None = None) -> ModelCosts:
    """The cost description of ``cfg``'s model at sequence length ``seq`` (default: its block size):
    parameters and forward FLOPs per token of each block and of the first and last stage's modules."""
    spec = spec_of(cfg)
    fn = spec.costs or _model_costs
    return fn(build_model(cfg), spec, seq or cfg.block_size)


def n_blocks(cfg: ModelConfig) -> int:
    """Blocks in the model's block container (what pipeline stages share out)."""
    return spec_of(cfg).n_blocks(cfg)


def n_moe_layers(cfg: ModelConfig) -> int:
    """Blocks whose feed-forward layer is a Mixture-of-Experts."""
    return sum(cfg.moe.is_moe_block(i) for i in range(n_blocks(cfg)))


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply per token: every attention and MLP matrix and
    the output projection (an embedding lookup multiplies nothing); in an MoE layer a token meets
    the router and its ``top_k`` experts only (the *active* parameters)."""
    return costs(cfg).matmul_params


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token as PaLM defines them (Chowdhery et al. 2022, appendix B): 6 N for the
    matrix multiplies forward and backward, plus 12 L H Q T for attention scores, where H·Q = n_embd
    and T the sequence length. Recomputation is not counted (model FLOPs)."""
    return costs(cfg, seq_len).training_flops
