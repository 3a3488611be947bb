"""A model's cost description: parameters and FLOPs of each block and of the first and last stage's
own modules, read off the modules themselves (on the meta device: nothing is allocated).

FLOPs follow PaLM (Chowdhery et al. 2022, appendix B): a token's forward pass costs 2 FLOPs per
weight of every matrix multiply it meets (an embedding lookup is no multiply; in a Mixture-of-Experts
layer a token meets the router and its ``top_k`` experts only), plus 4·d·T for the attention scores
and the weighted sum of each attention layer of width d over T positions. Training costs three
times that (backward = 2 × forward); recomputation is not counted (model FLOPs, as MFU counts them).

A family whose structure this does not capture (attention over another sequence's length, say) gives
its own ``costs`` in its :class:`~loom.models.spec.ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loom.models.common.attention import Attention
from loom.models.common.moe import MoE


@dataclass(frozen=True)
class PartCost:
    """One part of the model: a block, or the first or last stage's own modules."""

    params: int  # parameters it holds (a weight tied to another part's is counted there)
    matmul_params: int  # weights a token meets in a matrix multiply (the *active* ones in an MoE layer)
    attention_flops: float  # forward FLOPs per token of attention scores and weighted sums
    experts_top_k: int = 0  # experts per token of its MoE layer (0: none)

    @property
    def flops(self) -> float:
        """Forward FLOPs per token."""
        return 2.0 * self.matmul_params + self.attention_flops


@dataclass(frozen=True)
class ModelCosts:
    blocks: tuple[PartCost, ...]
    first: PartCost  # embeddings
    last: PartCost  # final norm, heads (an output projection tied to the embedding counts its matmul here)
    params: int  # distinct parameters of the whole model

    @property
    def forward_flops(self) -> float:
        """Forward FLOPs per token of the whole model."""
        return sum(b.flops for b in self.blocks) + self.first.flops + self.last.flops

    @property
    def training_flops(self) -> float:
        """Training FLOPs per token (PaLM's 6N + 12·L·H·Q·T): forward and a backward of twice its cost."""
        return 3.0 * self.forward_flops

    @property
    def matmul_params(self) -> int:
        return sum(b.matmul_params for b in self.blocks) + self.first.matmul_params + self.last.matmul_params


def part_cost(modules: list[nn.Module], seq: int, counted: set[int]) -> PartCost:
    """The cost of ``modules`` together; parameters whose id is in ``counted`` (held by an earlier
    part: a tied weight) add FLOPs but not parameters. Adds the ids it counts to ``counted``."""
    params = matmul = 0
    attention = 0.0
    top_k = 0
    for root in modules:
        for p in root.parameters():
            if id(p) not in counted:
                counted.add(id(p))
                params += p.numel()
        for m in root.modules():
            if isinstance(m, MoE):
                top_k = m.k
                per_expert = sum(p.numel() for n, p in m.experts.named_parameters() if n.startswith("w"))
                matmul += m.router.gate.weight.numel() + per_expert * m.k // m.n_experts
            elif isinstance(m, nn.Linear) and not _inside_moe(root, m):
                matmul += m.weight.numel()
            if isinstance(m, Attention):
                attention += 4.0 * m.q_proj.out_features * seq
    return PartCost(params, matmul, attention, top_k)


def _inside_moe(root: nn.Module, module: nn.Module) -> bool:
    return any(module is sub for m in root.modules() if isinstance(m, MoE) for sub in m.modules())


def model_costs(model: nn.Module, spec, seq: int) -> ModelCosts:
    """The cost description of ``model`` (a family's model, on any device) split as its ``spec``'s
    pipeline split says, at sequence length ``seq``."""
    split = spec.pipeline
    counted: set[int] = set()
    first = part_cost([getattr(model, n) for n in split.first if hasattr(model, n)], seq, counted)
    blocks = tuple(part_cost([b], seq, counted) for b in getattr(model, split.blocks).values())
    last = part_cost([getattr(model, n) for n in split.last if hasattr(model, n)], seq, counted)
    return ModelCosts(blocks, first, last, sum(p.numel() for p in model.parameters()))
