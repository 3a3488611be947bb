"""GPT's tensor-parallel strategies (pure data): Megatron-LM's layout of every block, and the tied
input embedding and output projection split over the vocabulary (a vocabulary-parallel loss)."""

from __future__ import annotations

from loom.models.common.sharding import block_strategies

TABLE: dict[str, str] = {
    "tok_emb": "vocab",
    "pos_emb": "replicate",
    **block_strategies("layers.*"),
    "lm_head": "vocab",  # tied to tok_emb: both hold vocabulary rows, split the same way
}
