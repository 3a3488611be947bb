"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): a model transformation
applied between building a model and parallelizing it, and merged back into the weights on export.

A target ``nn.Linear`` computing ``y = x Wᵀ + b`` becomes a :class:`LoRALinear` computing

    y = x Wᵀ + b + (α / r) · x Aᵀ Bᵀ,      A: (r, in) Gaussian,  B: (out, r) zeros

so the model starts exactly as it was and only A and B (``<module>.lora_a``, ``.lora_b``) train. The
module keeps its class's parameters and names (``q_proj.weight`` stays ``q_proj.weight``): its class is
swapped for the subclass, so checkpoints, tied weights, shard strategies and the Hugging Face mapping
see the model they know, plus two new parameters per target. Tensor parallelism splits each adapter
with its weight (:attr:`LoRALinear.TP_SPLITS`).
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.common import param_generator

LORA_PARAMS = ("lora_a", "lora_b")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a rank-``r`` update scaled by ``α / r`` (:mod:`loom.models.lora`)."""

    lora_a: nn.Parameter  # (r, in)
    lora_b: nn.Parameter  # (out, r)
    scaling: float
    #: How tensor parallelism splits the adapter beside its weight, by the weight's strategy: each
    #: factor is split along the dimension it shares with W, or whole (None). Column-parallel (and a
    #: vocabulary-split output layer): B's outputs split as W's, A whole on every rank, so B A's
    #: outputs are this rank's columns. Row-parallel: A's inputs split as W's, B whole, so A x is a
    #: partial sum that the base layer's one all-reduce (reduce-scatter under sp) completes.
    TP_SPLITS = {"colwise": {"lora_a": None, "lora_b": 0}, "vocab": {"lora_a": None, "lora_b": 0},
                 "rowwise": {"lora_a": 1, "lora_b": None}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into ``weight`` (W + α/r · B A) and become a plain ``nn.Linear`` again."""
        self.weight += self.scaling * (self.lora_b @ self.lora_a).to(self.weight.dtype)
        del self.lora_a, self.lora_b, self.scaling
        self.__class__ = nn.Linear
        return self


def is_lora_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Give every ``nn.Linear`` whose name matches one of ``targets`` (``fnmatch`` patterns, e.g.
    ``*.q_proj``) a rank-``rank`` adapter; returns the names of the adapted modules. The model's
    ``initial_value`` learns the adapters' (A Gaussian with std 1/√in, B zero)."""
    adapted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and any(fnmatch.fnmatchcase(name, pat) for pat in targets):
            w = module.weight
            module.__class__ = LoRALinear
            module.lora_a = nn.Parameter(torch.empty(rank, module.in_features, device=w.device, dtype=w.dtype))
            module.lora_b = nn.Parameter(torch.empty(module.out_features, rank, device=w.device, dtype=w.dtype))
            module.scaling = alpha / rank
            adapted.append(name)
    if adapted:
        model.initial_value = _with_adapters(model.initial_value)
    return adapted


def _with_adapters(initial_value):
    def value(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "lora_b":
            return torch.zeros(shape)
        if leaf == "lora_a":
            return torch.empty(shape).normal_(0.0, 1.0 / math.sqrt(shape[1]), generator=param_generator(seed, name))
        return initial_value(name, shape, seed)

    return value


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (for export); returns how many were merged."""
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in adapted:
        m.merge()
    return len(adapted)
