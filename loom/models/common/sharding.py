"""Megatron-LM's tensor-parallel layout of the common Transformer block (Shoeybi et al. 2019), as
module-name pattern -> strategy entries that a family's table includes.

Strategy names (:mod:`loom.parallel.strategy` applies them):

``colwise``    a Linear's output features split over tp; its output stays split and feeds a rowwise one
``rowwise``    a Linear's input features split; the partial sums are all-reduced (or reduce-scattered
               along the sequence under sequence parallelism)
``vocab``      an Embedding's rows (the vocabulary) split and its output reduced; on an output projection
               the logits stay split over the vocabulary for a vocabulary-parallel cross-entropy
``replicate``  every tp rank holds the whole weight

In each attention the query, key and value projections are split by heads and the output projection
by its input, in each MLP the first projection by columns and the second by rows, so that one
all-reduce per block half suffices.
"""

from __future__ import annotations


def block_strategies(prefix: str, mlp: str = "gelu") -> dict[str, str]:
    """The strategies of a :class:`~loom.models.common.block.Block` (or blocks: ``layers.*``) at
    ``prefix``; ``mlp="swiglu"``: its gate and up projections split by columns, down by rows."""
    mlp_table = ({f"{prefix}.mlp.gate_proj": "colwise", f"{prefix}.mlp.up_proj": "colwise",
                  f"{prefix}.mlp.down_proj": "rowwise"} if mlp == "swiglu"
                 else {f"{prefix}.mlp.fc": "colwise", f"{prefix}.mlp.proj": "rowwise"})
    return {
        f"{prefix}.attn.q_proj": "colwise",
        f"{prefix}.attn.k_proj": "colwise",
        f"{prefix}.attn.v_proj": "colwise",
        f"{prefix}.attn.out_proj": "rowwise",
        f"{prefix}.attn.rel_bias": "colwise",  # T5's relative position bias (if any): by heads, as q_proj
        **mlp_table,
    }
