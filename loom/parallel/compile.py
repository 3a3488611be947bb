"""``train.compile``: each block compiled by ``torch.compile``, in place.

torchtitan's granularity: a block is the unit every layout keeps whole (a pipeline stage holds whole
blocks, tensor parallelism splits the operators inside them, recomputation checkpoints them, FSDP
gathers their parameters), so compiling block by block composes with all of them, and the identical
blocks of a model share one compiled graph. ``nn.Module.compile`` compiles the module's call where it
stands: parameter names, state dicts and checkpoints are those of the eager model.

Compiled after tensor parallelism and recomputation (the graph then holds the DTensor operators and the
checkpoint regions) and before data parallelism (FSDP's gathers run around each compiled block), the
order torchtitan uses. What dynamo cannot trace (an MoE layer's data-dependent dispatch) runs eagerly
between compiled pieces (graph breaks), with the same numbers.
"""

from __future__ import annotations

from torch import nn


def apply_compile(blocks: nn.ModuleDict, backend: str = "inductor") -> None:
    """``torch.compile`` every block of ``blocks`` with ``backend``, in place (names and parameters
    unchanged)."""
    for block in blocks.values():
        block.compile(backend=backend)
