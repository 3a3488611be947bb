"""Activation recomputation (Chen et al. 2016; selective: Korthikanti et al. 2022).

``full`` keeps only each block's input and runs its forward again during backward. ``selective``
keeps the outputs of the matrix multiplies, which are expensive to recompute and whose activations
are what a tensor-parallel layer already splits, and recomputes the cheap rest: LayerNorms,
GELU, the attention scores/softmax/dropout (the part whose memory grows with the sequence squared).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from loom.models.common.moe import no_stats

_KEEP = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
         torch.ops.aten.linear.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(blocks: nn.ModuleDict, mode: str, every: int = 1) -> None:
    """Recompute every ``every``-th block of ``blocks`` (by its index in the full model) in
    ``mode`` (``full`` or ``selective``), in place. Module names and parameters are unchanged."""
    if mode == "none":
        return
    for name, block in blocks.items():
        if int(name) % every:
            continue
        context_fn = (functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
                      if mode == "selective" else None)
        block.forward = _checkpointed(block.forward, context_fn)


def _checkpointed(forward, context_fn):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation keep nothing anyway
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        first = [True]

        def once(*a, **kw):  # the recomputation in backward must not count MoE statistics again
            if first[0]:
                first[0] = False
                return forward(*a, **kw)
            with no_stats():
                return forward(*a, **kw)

        return checkpoint(once, *args, use_reentrant=False, **extra, **kwargs)

    return functools.wraps(forward)(run)
