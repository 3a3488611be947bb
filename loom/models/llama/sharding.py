"""Llama's tensor-parallel strategies (pure data): Megatron-LM's layout of each block (query, key,
value, gate and up projections split by columns; attention output and down projection by rows),
the input embedding and the (untied) output projection split over the vocabulary.

Grouped-query attention splits the key/value heads as it splits the query heads, so tp must divide
``model.n_kv_head`` too (the plan says so before anything starts): each rank then holds whole
groups, the query heads of its key/value heads."""

from __future__ import annotations

from loom.models.common.sharding import block_strategies

TABLE: dict[str, str] = {
    "tok_emb": "vocab",
    **block_strategies("layers.*", mlp="swiglu"),
    "lm_head": "vocab",
}
