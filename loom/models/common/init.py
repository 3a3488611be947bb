"""Initial values of parameters as a function of the seed and the parameter's name alone, so that
every layout that splits a model initializes the numbers one device would; :class:`NameSeededInit`
gives a family's model the ``init_weights`` that applies them."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from loom.models.common.moe import Experts, moe_initial_value


class NameSeededInit:
    """The initialization every family shares, mixed into its ``nn.Module``: the model provides
    ``initial_value(name, shape, seed)`` and, when it ties parameters, ``tie_weights()``."""

    def tie_weights(self) -> None:
        """Nothing is tied (a family whose output projection is its input embedding overrides this)."""

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Tie the pairs again (``to_empty()`` replaces parameters one by one, which unties them), then
        initialize every parameter from ``seed`` and its name; usable after ``to_empty`` from the meta device."""
        self.tie_weights()
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed))


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one parameter, seeded by the run's seed and the parameter's name only:
    the same numbers come out whatever else the model or its layout holds."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def gpt_initial_value(module: nn.Module, name: str, shape: torch.Size, n_layer: int,
                      generator: torch.Generator) -> torch.Tensor:
    """GPT-2 initialization of the parameter ``name`` of ``module``: N(0, 0.02) weights, zero biases,
    unit LayerNorms and RMSNorms, and the residual output projections scaled by 1/sqrt(2 n_layer) (Radford et al.
    2019, section 2.3). Returns the full tensor (fp32, CPU)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if isinstance(owner, Experts):
        return moe_initial_value(name, shape, n_layer, generator)
    if isinstance(owner, (nn.LayerNorm, nn.RMSNorm)):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    residual = owner_name.endswith(("out_proj", "mlp.proj", "mlp.down_proj"))
    std = 0.02 / math.sqrt(2 * n_layer) if residual else 0.02
    return torch.empty(shape).normal_(0.0, std, generator=generator)
